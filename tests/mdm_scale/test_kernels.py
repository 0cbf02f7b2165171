"""Fused kernels (issue 4) against their torch references: linear + weighted cross-entropy.

The Triton cases run on CPU through the Triton interpreter: TRITON_INTERPRET=1 must be set before triton.jit
decorates the kernels, i.e. before mdm_scale.kernels._triton is first imported (it is imported lazily, on the first
Triton call), so it is set here at import time. The spawned TP ranks inherit it through the environment.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mdm_scale.kernels import resolve_backend, triton_available  # noqa: E402
from mdm_scale.kernels.linear_cross_entropy import weighted_linear_cross_entropy  # noqa: E402

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
    """Rows selected by the training path's own masking (polynomial_masking on uniforms, as apply_noise): t = 1
    masks every position, t ~ 0 none; loss weights and loss as nelbo_from_features."""
    from mdm_scale.schedules.base import polynomial_masking

    b, l, h, vocab, v_shard = 3, 11, 16, 130, 256
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, vocab, (b, l), generator=g)
    t = torch.tensor([1.0, 1e-30, 0.5], dtype=torch.float64)
    t_weight = torch.tensor([1.0, 2.0, 0.7], dtype=torch.float64)
    masking = polynomial_masking(t, torch.ones(l))  # w = 1: mask probability t
    m = torch.rand(b, l, generator=g, dtype=torch.float64) < masking.mask_prob
    assert m[0].all() and not m[1].any() and 0 < m[2].sum() < l
    row_weight = (masking.weight * t_weight[:, None]).float() * m  # A_i(t) t_weight at masked positions
    hidden = torch.randn(b, l, h, generator=g, requires_grad=True)
    weight = (torch.randn(v_shard, h, generator=g) * 0.5).requires_grad_()
    # reference: nll at every masked position, weighted, summed (objective.nelbo_from_features' reconstruction)
    nll_full = torch.zeros(b, l)
    nll_full[m] = reference_loss(hidden[m], weight, x0[m], torch.ones(int(m.sum())), vocab)[1]
    ref = (row_weight * nll_full).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss, nll = weighted_linear_cross_entropy(hidden[m], weight, x0[m], row_weight[m], vocab_size=vocab,
                                              chunk_rows=4, backend=backend, block_v=128)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(nll, nll_full[m], **TOL)
    for g_, r in zip(grads, ref_grads):
        torch.testing.assert_close(g_, r, **TOL)
    assert grads[0][1].abs().sum() == 0 and grads[0][0].abs().min() > 0  # none-masked row: no gradient

    # No masked position at all: n = 0 rows, an exact zero that still backpropagates zeros.
    empty = torch.zeros(0, dtype=torch.bool).new_zeros(b, l)
    rw = row_weight.clone().requires_grad_()
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
    """Compile every Triton kernel to PTX for sm_90 (no GPU needed): catches typing and lowering errors (mixed
    int64 / int32 offsets, loop-carried types) that the interpreter does not see. Run with TRITON_INTERPRET=0
    (a subprocess), so that triton.jit builds compilable kernels."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mdm_scale.kernels import _triton as K

    target = GPUTarget("cuda", 90, 32)
    ce = {"logits_ptr": "*fp32", "stride_row": "i32", "target_ptr": "*i64", "row_weight_ptr": "*fp32"}
    specs = [
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
    assert "3 compiled" in result.stdout
