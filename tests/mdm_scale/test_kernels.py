"""Fused kernels (issue 4) against their torch references: counter RNG, polynomial masking, linear cross-entropy.

The Triton cases run on CPU through the Triton interpreter: TRITON_INTERPRET=1 must be set before triton.jit
decorates the kernels, i.e. before mdm_scale.kernels._triton is first imported (it is imported lazily, on the first
Triton call), so it is set here at import time. The spawned TP ranks inherit it through the environment.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mdm_scale.kernels import resolve_backend, triton_available  # noqa: E402
from mdm_scale.kernels.linear_cross_entropy import weighted_linear_cross_entropy  # noqa: E402
from mdm_scale.kernels.masking import fused_polynomial_masking  # noqa: E402
from mdm_scale.kernels.rng import counter_uniforms  # noqa: E402

needs_triton = pytest.mark.skipif(
    not triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- backend


def test_resolve_backend(monkeypatch):
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if triton_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_backend("triton", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert resolve_backend("triton", "cpu") == "triton"


# ----------------------------------------------------------------------------------------------------------- RNG

INDICES = torch.tensor([0, 1, 2, 3, 7, 2**31 - 1, 2**32 + 5, 2**40 + 3, 2**62 + 11], dtype=torch.int64)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**33 + 17, 2**64 - 1])
def test_counter_uniforms_torch_and_triton_are_bit_identical(seed, dtype):
    a = counter_uniforms(seed, INDICES, 37, dtype=dtype, backend="torch")
    b = counter_uniforms(seed, INDICES, 37, dtype=dtype, backend="triton")
    assert a.dtype == b.dtype == dtype and a.shape == (len(INDICES), 37)
    assert torch.equal(a, b)


def test_counter_uniforms_golden_values():
    """Pins the hash: a changed constant or operation would silently change every run's masks."""
    u = counter_uniforms(1234, torch.tensor([0, 5]), 3, backend="torch")
    assert u.tolist() == [[0.8106941670173843, 0.27628471956001266, 0.9198540977753403],
                          [0.20725613559926803, 0.4300507164124622, 0.6762197584719496]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_uniforms_depend_only_on_global_index(backend):
    full = counter_uniforms(5, torch.arange(8), 29, backend=backend)
    halves = torch.cat([counter_uniforms(5, torch.arange(4), 29, backend=backend),
                        counter_uniforms(5, torch.arange(4, 8), 29, backend=backend)])
    assert torch.equal(full, halves)  # DP slices
    strided = counter_uniforms(5, torch.arange(1, 8, 2), 29, backend=backend)
    assert torch.equal(full[1::2], strided)  # the data loader's strided DP slices
    perm = torch.tensor([6, 2, 7, 0])
    assert torch.equal(counter_uniforms(5, perm, 29, backend=backend), full[perm])
    assert torch.equal(counter_uniforms(5, torch.arange(8), 13, backend=backend), full[:, :13])  # prefix of positions
    assert not torch.equal(counter_uniforms(6, torch.arange(8), 29, backend=backend), full)  # the seed matters


def test_counter_uniforms_look_uniform_and_independent():
    u = counter_uniforms(3, torch.arange(400), 500)  # 200k draws
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.003 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=20, min=0, max=1)
    chi2 = ((hist - u.numel() / 20) ** 2 / (u.numel() / 20)).sum().item()
    assert chi2 < 45  # 19 dof: p ~ 1e-3
    for a, b in [(u[:, :-1], u[:, 1:]), (u[:-1], u[1:])]:  # neighbouring positions, neighbouring sequences
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01
    assert len(torch.unique(u)) == u.numel()


# ------------------------------------------------------------------------------------------------------- masking


def _noise_inputs(b=6, l=37):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (b, l), generator=g)
    t = torch.tensor([1e-30, 0.05, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)[:b]
    t_weight = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    return x0, t, t_weight


def test_masking_matches_polynomial_masking_and_apply_noise():
    from mdm_scale.objective import apply_noise
    from mdm_scale.schedules.base import polynomial_masking
    from mdm_scale.schedules.univariate import UnivariateSchedule

    x0, t, t_weight = _noise_inputs()
    b, l = x0.shape
    index = torch.arange(b) + 40
    uniforms = counter_uniforms(9, index, l)
    denoiser = types.SimpleNamespace(mask_id=50, causal=False)
    # Univariate polynomial schedule (w = 2): the objective's own path.
    noised = apply_noise(denoiser, UnivariateSchedule("polynomial", exponent=2.0), x0, t, t_weight, uniforms)
    out = fused_polynomial_masking(x0, t, t_weight, torch.full((l,), 2.0), seed=9, sequence_index=index, mask_id=50,
                                   backend="torch")
    assert torch.equal(out.masked, noised.masked) and torch.equal(out.z_t, noised.z_t)
    expected = (noised.masking.weight * t_weight[:, None]).to(torch.float32) * noised.masked
    torch.testing.assert_close(out.weight, expected, rtol=1e-6, atol=0)
    # Per-position exponents [b, l] (MDM-LS / LoMDM).
    w = 0.25 + 1.5 * torch.rand(b, l, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    masking = polynomial_masking(t, w)
    out = fused_polynomial_masking(x0, t, t_weight, w, seed=9, sequence_index=index, mask_id=50, backend="torch")
    assert torch.equal(out.masked, uniforms < masking.mask_prob)
    torch.testing.assert_close(out.weight, (masking.weight * t_weight[:, None]).float() * out.masked, rtol=1e-6,
                               atol=0)
    # MDLM's log-linear schedule: w = 1 with mask_scale = 1 - eps.
    noised = apply_noise(denoiser, UnivariateSchedule("loglinear", eps=1e-3), x0, t, t_weight, uniforms)
    out = fused_polynomial_masking(x0, t, t_weight, torch.ones(l), seed=9, sequence_index=index, mask_id=50,
                                   mask_scale=1 - 1e-3, backend="torch")
    assert torch.equal(out.masked, noised.masked)
    torch.testing.assert_close(out.weight, (noised.masking.weight * t_weight[:, None]).float() * noised.masked,
                               rtol=1e-6, atol=0)
    # Edge times: nothing masked at t = 1e-30, everything at t = 1, something in between.
    assert not out.masked[0].any() and out.masked[-1].all() and 0 < out.masked[2:5].float().mean() < 1
    # Caller-given uniforms (draw_noise's generator stream) instead of the counter RNG.
    rand = torch.rand(b, l, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noised = apply_noise(denoiser, UnivariateSchedule("polynomial", exponent=0.5), x0, t, t_weight, rand)
    out = fused_polynomial_masking(x0, t, t_weight, torch.full((l,), 0.5), uniforms=rand, mask_id=50, backend="torch")
    assert torch.equal(out.masked, noised.masked) and torch.equal(out.z_t, noised.z_t)


@needs_triton
@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("mask_scale", [1.0, 1 - 1e-3])
def test_masking_triton_matches_torch(per_position, mask_scale):
    x0, t, t_weight = _noise_inputs()
    b, l = x0.shape
    g = torch.Generator().manual_seed(2)
    w = 0.25 + 1.5 * torch.rand(b, l, generator=g, dtype=torch.float64) if per_position else torch.rand(l) + 0.5
    kw = dict(seed=2**40 + 3, sequence_index=torch.arange(b) * 3 + 1, mask_id=50, mask_scale=mask_scale)
    ref = fused_polynomial_masking(x0, t, t_weight, w, backend="torch", **kw)
    out = fused_polynomial_masking(x0, t, t_weight, w, backend="triton", **kw)
    assert out.z_t.dtype == torch.int64 and out.masked.dtype == torch.bool and out.weight.dtype == torch.float32
    assert torch.equal(out.masked, ref.masked) and torch.equal(out.z_t, ref.z_t)
    torch.testing.assert_close(out.weight, ref.weight, rtol=1e-6, atol=0)
    assert torch.equal(out.z_t == 50, out.masked) and torch.equal(out.z_t[~out.masked], x0[~out.masked])
    assert 0 < out.masked.float().mean() < 1
    rand = torch.rand(b, l, generator=g, dtype=torch.float64)
    kw = dict(uniforms=rand, mask_id=50, mask_scale=mask_scale)
    ref = fused_polynomial_masking(x0, t, t_weight, w, backend="torch", **kw)
    out = fused_polynomial_masking(x0, t, t_weight, w, backend="triton", **kw)
    assert torch.equal(out.masked, ref.masked) and torch.equal(out.z_t, ref.z_t) and 0 < out.masked.float().mean() < 1
    torch.testing.assert_close(out.weight, ref.weight, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------- cross-entropy


def reference_loss(hidden, weight, targets, row_weight, vocab_size):
    """The unfused loss: full logits, PAD_LOGIT on columns >= vocab_size (as output_logits), F.cross_entropy."""
    from mdm_scale.denoiser import PAD_LOGIT

    logits = hidden @ weight.t()
    logits = logits.masked_fill(torch.arange(weight.shape[0]) >= vocab_size, PAD_LOGIT)
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    return (row_weight * nll).sum(), nll


def _head(n, h, v_shard, vocab, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).requires_grad_()
    weight = (torch.randn(v_shard, h, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    row_weight = (torch.rand(n, generator=g) * 3 + 0.1).requires_grad_()
    return hidden, weight, targets, row_weight


def _compare(inputs, vocab, upstream=1.7, **kw):
    hidden, weight, targets, row_weight = inputs
    ref_loss, ref_nll = reference_loss(hidden, weight, targets, row_weight, vocab)
    ref_grads = torch.autograd.grad(upstream * ref_loss, (hidden, weight, row_weight))
    loss, nll = weighted_linear_cross_entropy(hidden, weight, targets, row_weight, vocab_size=vocab, **kw)
    grads = torch.autograd.grad(upstream * loss, (hidden, weight, row_weight))
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(nll, ref_nll.detach(), **TOL)
    for name, g, r in zip(("hidden", "weight", "row_weight"), grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"grad {name}: {m}")
    return loss, nll, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [8, None, 64])
def test_linear_cross_entropy_odd_shapes_with_padding_columns(backend, chunk_rows):
    """n = 37 rows in chunks of 8 (last one partial), h = 24, vocab 301 padded to 384 (the mask column 301 and 82
    padding columns excluded), vocabulary blocks of 128 that do not divide 301."""
    _compare(_head(37, 24, 384, 301), 301, chunk_rows=chunk_rows, backend=backend, block_v=128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_unpadded_vocab_and_large_logits(backend):
    # 301 columns, no padding (vocab_size=None): the last 128-block is partial; logits of order 100 need the max.
    inputs = _head(19, 24, 301, 301, seed=1, scale=8.0)
    hidden, weight, targets, row_weight = inputs
    loss, nll = weighted_linear_cross_entropy(hidden, weight, targets, row_weight, chunk_rows=5, backend=backend,
                                              block_v=128)
    ref_loss, ref_nll = reference_loss(hidden, weight, targets, row_weight, 301)
    assert ref_nll.max() > 20  # the test really exercises large logits
    torch.testing.assert_close(nll, ref_nll.detach(), **TOL)
    _compare(inputs, 301, chunk_rows=5, backend=backend, block_v=128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_all_masked_and_none_masked(backend):
    """Rows selected by the masking kernel: t = 1 masks every position, t ~ 0 none; loss as nelbo_from_features."""
    b, l, h, vocab, v_shard = 3, 11, 16, 130, 256
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, vocab, (b, l), generator=g)
    t = torch.tensor([1.0, 1e-30, 0.5], dtype=torch.float64)
    t_weight = torch.tensor([1.0, 2.0, 0.7], dtype=torch.float64)
    noise = fused_polynomial_masking(x0, t, t_weight, torch.ones(l), seed=1, sequence_index=torch.arange(b),
                                     mask_id=vocab, backend=backend)
    assert noise.masked[0].all() and not noise.masked[1].any()
    hidden = torch.randn(b, l, h, generator=g, requires_grad=True)
    weight = (torch.randn(v_shard, h, generator=g) * 0.5).requires_grad_()
    m = noise.masked
    # reference: nll at every masked position, weighted, summed (objective.nelbo_from_features' reconstruction)
    nll_full = torch.zeros(b, l)
    nll_full[m] = reference_loss(hidden[m], weight, x0[m], torch.ones(int(m.sum())), vocab)[1]
    ref = (noise.weight * nll_full).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss, nll = weighted_linear_cross_entropy(hidden[m], weight, x0[m], noise.weight[m], vocab_size=vocab,
                                              chunk_rows=4, backend=backend, block_v=128)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(nll, nll_full[m], **TOL)
    for g_, r in zip(grads, ref_grads):
        torch.testing.assert_close(g_, r, **TOL)
    assert grads[0][1].abs().sum() == 0 and grads[0][0].abs().min() > 0  # none-masked row: no gradient

    # No masked position at all: n = 0 rows, an exact zero that still backpropagates zeros.
    empty = torch.zeros(0, dtype=torch.bool).new_zeros(b, l)
    rw = noise.weight.clone().requires_grad_()
    loss, nll = weighted_linear_cross_entropy(hidden[empty], weight, x0[empty], rw[empty], vocab_size=vocab,
                                              backend=backend)
    assert loss.item() == 0 and nll.shape == (0,)
    gh, gw, grw = torch.autograd.grad(loss, (hidden, weight, rw))
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0 and grw.abs().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_without_grad_and_zero_weights(backend):
    hidden, weight, targets, row_weight = _head(10, 8, 128, 100, seed=4)
    with torch.no_grad():
        loss, nll = weighted_linear_cross_entropy(hidden, weight, targets, row_weight, vocab_size=100,
                                                  backend=backend, block_v=32)
    ref_loss, ref_nll = reference_loss(hidden, weight, targets, row_weight, 100)
    torch.testing.assert_close(nll, ref_nll.detach(), **TOL)
    assert not loss.requires_grad
    zeroed = (row_weight * (torch.arange(10) % 2)).detach().requires_grad_()
    _, _, grads = _compare((hidden, weight, targets, zeroed), 100, backend=backend, block_v=32, chunk_rows=3)
    assert grads[0][0::2].abs().sum() == 0 and grads[0][1::2].abs().sum() > 0
    assert grads[2][0::2].abs().min() > 0  # d/d row_weight = nll even where the weight is 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_low_precision(backend):
    """bf16 inputs, and fp32 parameters under bf16 autocast (fp32 weight-gradient accumulation): bf16 tolerance."""
    hidden, weight, targets, row_weight = _head(21, 32, 256, 200, seed=6)
    ref_loss, _ = reference_loss(hidden, weight, targets, row_weight, 200)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight))
    h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    loss, _ = weighted_linear_cross_entropy(h16, w16, targets, row_weight.detach(), vocab_size=200, chunk_rows=8,
                                            backend=backend, block_v=64)
    grads = torch.autograd.grad(loss, (h16, w16))
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss32, _ = weighted_linear_cross_entropy(hidden, weight, targets, row_weight.detach(), vocab_size=200,
                                                  chunk_rows=8, backend=backend, block_v=64)
    grads32 = torch.autograd.grad(loss32, (hidden, weight))
    assert loss32.dtype == grads32[0].dtype == grads32[1].dtype == torch.float32
    for value, gs in ((loss, grads), (loss32, grads32)):
        torch.testing.assert_close(value.float(), ref_loss.detach(), rtol=2e-2, atol=0)
        for g_, r in zip(gs, ref_grads):
            assert (g_.float() - r).norm() < 2e-2 * r.norm()


def test_denoiser_weighted_nll_matches_full_logits_cross_entropy(dims):
    """The Denoiser helper (tied and untied heads, vocab 97 padded to 128 with the mask column) against full
    logits from the denoiser's output head and its token_nll (mask and padding columns at PAD_LOGIT)."""
    from mdm_scale.config import ModelConfig
    from mdm_scale.denoiser import Denoiser
    from mdm_scale.kernels.linear_cross_entropy import denoiser_weighted_nll

    for tie in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, tie_embeddings=tie, init_std=0.5)
        denoiser = Denoiser(cfg, vocab_size=97, max_seq_len=8)
        hidden = torch.randn(13, 32, requires_grad=True)
        targets = torch.randint(0, 97, (13,))
        rw = torch.rand(13) + 0.5
        ref = (rw * denoiser.token_nll(denoiser.output_logits(hidden), targets)).sum()
        params = [hidden, *[p for p in denoiser.parameters() if p.requires_grad]]
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
        loss, _ = denoiser_weighted_nll(denoiser, hidden, targets, rw, chunk_rows=4)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        torch.testing.assert_close(loss, ref, **TOL)
        assert sum(g is not None for g in ref_grads) == 2  # hidden and the output (or tied embedding) matrix
        for g_, r in zip(grads, ref_grads):
            assert (g_ is None) == (r is None)
            if r is not None:
                torch.testing.assert_close(g_, r, **TOL)


# ------------------------------------------------------------------------------------------- tensor parallelism

TP_CASES = [(301, 384), (150, 384)]  # (vocab, padded): with 150 rank 1's shard [192, 384) is all padding


def tp_worker(rank: int, backends: list[str]) -> dict:
    """On each of 2 ranks (TP = 2, gloo): the fused loss on this rank's vocabulary shard."""
    from megatron.core import parallel_state, tensor_parallel

    from parallel.distributed import init_distributed

    init_distributed(tensor_parallel=2, device="cpu", seed=0)
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for backend in backends:
        for vocab, padded in TP_CASES:
            hidden, weight, targets, row_weight = _head(23, 16, padded, vocab, seed=5)
            shard = padded // 2
            w = weight.detach()[rank * shard:(rank + 1) * shard].clone().requires_grad_()
            loss, nll = weighted_linear_cross_entropy(
                tensor_parallel.copy_to_tensor_model_parallel_region(hidden), w, targets, row_weight,
                vocab_start=rank * shard, vocab_size=vocab, tp_group=group, chunk_rows=6, backend=backend,
                block_v=64)
            (1.7 * loss).backward()
            out[backend, vocab] = dict(loss=loss.detach(), nll=nll, hidden=hidden.grad, weight=w.grad,
                                       row_weight=row_weight.grad)
    return out


def test_linear_cross_entropy_tensor_parallel_matches_single_rank():
    from tests.spawn import run_ranks

    backends = ["torch", "triton"] if triton_available() else ["torch"]
    ranks = run_ranks(2, tp_worker, backends)
    for backend in backends:
        for vocab, padded in TP_CASES:
            hidden, weight, targets, row_weight = _head(23, 16, padded, vocab, seed=5)
            ref_loss, ref_nll = reference_loss(hidden, weight, targets, row_weight, vocab)
            ref = dict(zip(("hidden", "weight", "row_weight"),
                           torch.autograd.grad(1.7 * ref_loss, (hidden, weight, row_weight))))
            r0, r1 = ranks[0][backend, vocab], ranks[1][backend, vocab]
            for r in (r0, r1):
                torch.testing.assert_close(r["loss"], ref_loss.detach(), **TOL)
                torch.testing.assert_close(r["nll"], ref_nll.detach(), **TOL)
                torch.testing.assert_close(r["hidden"], ref["hidden"], **TOL)  # all-reduced by copy_to_...
                torch.testing.assert_close(r["row_weight"], ref["row_weight"], **TOL)
            torch.testing.assert_close(torch.cat([r0["weight"], r1["weight"]]), ref["weight"], **TOL)


# ------------------------------------------------------------------------------------ compiled (non-interpreted)


def compile_kernels_for_cuda() -> dict:
    """Compile every Triton kernel to PTX for sm_90 (no GPU needed): catches typing and lowering errors (int64
    hash arithmetic, fp64 exp/log, loop-carried types) that the interpreter does not see. Run with
    TRITON_INTERPRET=0 (a subprocess), so that triton.jit builds compilable kernels."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mdm_scale.kernels import _triton as K

    target = GPUTarget("cuda", 90, 32)
    ce = {"logits_ptr": "*fp32", "stride_row": "i32", "target_ptr": "*i64", "row_weight_ptr": "*fp32"}
    specs = [
        (K._uniforms_kernel, {"index_ptr": "*i64", "out_ptr": "*fp64", "seq_len": "i32", "seed_lo": "i32",
                              "seed_hi": "i64"}, {"F64": True, "BLOCK": 1024}),
        (K._uniforms_kernel, {"index_ptr": "*i64", "out_ptr": "*fp32", "seq_len": "i32", "seed_lo": "i64",
                              "seed_hi": "i32"}, {"F64": False, "BLOCK": 1024}),
        *[(K._polynomial_masking_kernel, {
            "x0_ptr": "*i64", "t_ptr": "*fp64", "t_weight_ptr": "*fp64", "w_ptr": "*fp64", "w_row_stride": "i32",
            "index_ptr": "*i64", "uniforms_ptr": "*fp64", "scale_ptr": "*fp64", "z_ptr": "*i64", "masked_ptr": "*i8",
            "weight_ptr": "*fp32", "seq_len": "i32", "seed_lo": "i64", "seed_hi": "i32", "mask_id": "i32"},
         {"GIVEN_UNIFORMS": given, "BLOCK": 1024}) for given in (False, True)],
        *[(K._ce_forward_kernel, {**ce, "m_ptr": "*fp32", "s_ptr": "*fp32", "target_logit_ptr": "*fp32",
                                  "nll_ptr": "*fp32", "n_valid": "i32", "n_cols": "i32"},
           {"FUSED": fused, "WRITE_GRAD": grad, "BLOCK_V": 4096}) for fused, grad in [(True, True), (False, False)]],
        (K._ce_grad_kernel, {**ce, "m_ptr": "*fp32", "s_ptr": "*fp32", "n_valid": "i32", "n_cols": "i32"},
         {"BLOCK_V": 4096}),
    ]
    sizes = {}
    for fn, signature, constexprs in specs:
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
        sizes[f"{fn.__name__}{sorted(constexprs.items())}"] = len(kernel.asm["ptx"])
    return sizes


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_kernels_compile_for_cuda():
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = "import tests.mdm_scale.test_kernels as t; print(len(t.compile_kernels_for_cuda()), 'compiled')"
    try:
        import triton.backends

        if "nvidia" not in triton.backends.backends:
            pytest.skip("triton has no CUDA backend here")
    except ImportError:
        pytest.skip("triton has no backends module")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 compiled" in result.stdout
