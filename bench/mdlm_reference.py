"""MDLM's reference training step, reimplemented for side-by-side benchmarks (bench/step.py).

What is reproduced (kuleshov-group/mdlm, `models/dit.py` + `diffusion.py` + `noise_schedule.py`, default config
`parameterization=subs`, `backbone=dit`, `noise=loglinear`, `T=0`, `time_conditioning=False`):

* DIT backbone: vocabulary embedding (a [V+1, h] parameter, kaiming-uniform, mask id = V), a sigma embedder
  (sinusoidal features of size 256 -> Linear -> SiLU -> Linear to cond_dim = 128) whose output goes through SiLU
  to give the conditioning vector c, rotary embeddings (rotate-half / GPT-NeoX layout, on q and k only), and
  `n_blocks` DDiT blocks:

      shift1, scale1, gate1, shift2, scale2, gate2 = adaLN(c)                  (zero-initialised Linear)
      x = x + gate1 * dropout(W_o attn(rope(W_qkv modulate(LN(x), shift1, scale1))))   (no biases in attention)
      x = x + gate2 * dropout(MLP(modulate(LN(x), shift2, scale2)))            (GELU-tanh, 4h, with biases)

  LN is a weight-only LayerNorm computed in fp32; `modulate(x, shift, scale) = x (1 + scale) + shift`. The final
  layer is an adaLN-modulated LN followed by a zero-initialised Linear(h, V+1) with bias (untied). Blocks and the
  final layer run under bf16 autocast in MDLM; here under the autocast the benchmark asks for (same for both).
* Attention: MDLM calls flash-attn's varlen kernel (non-causal, dropout 0). We call torch's
  `scaled_dot_product_attention`, which dispatches to a flash / memory-efficient kernel on GPU and to the fused
  CPU kernel on CPU: the honest stand-in where flash-attn is not installed.
* Forward process: log-linear noise with eps = 1e-3, sigma(t) = -log1p(-(1 - eps) t), dsigma = (1 - eps) /
  (1 - (1 - eps) t); t = (1 - 1e-3) u + 1e-3 with antithetic u_b = (u / B + b / B) mod 1; each position is masked
  with probability 1 - exp(-sigma). With time_conditioning False the backbone is fed sigma = 0 (the embedder and
  the adaLN layers still run, as in MDLM).
* SUBS parameterisation on the full [b, l, V+1] logits: the mask column gets -1e6, log-softmax over the vocabulary,
  and every unmasked position's row is replaced by the one-hot log-distribution of its input (0 at x_t, -1e6
  elsewhere). Loss = mean over all b * l tokens of -log p(x0) * dsigma / expm1(sigma) (unmasked positions give 0).
* Optimiser step as Lightning runs it: backward, clip the global gradient norm to 1.0, AdamW (lr 3e-4, betas
  (0.9, 0.999), eps 1e-8, weight decay 0), constant-with-warm-up LR schedule (2500 steps), then the EMA update of
  the parameters (decay 0.9999 with MDLM's num_updates warm-up; `ema=0` disables it), and `loss.item()` for the
  logger.

Not reproduced: Lightning's own per-step overhead (hooks, metric objects), the JIT-scripted fused
bias-dropout-add (the eager ops compute the same), and flash-attn's fused rotary kernel.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG_INFINITY = -1_000_000.0
"""MDLM's stand-in for -inf in the SUBS parameterisation."""


# ------------------------------------------------------------------------------------------------ backbone (DIT)


class WeightOnlyLayerNorm(nn.Module):
    """LayerNorm without bias, computed in fp32 outside autocast, then scaled by a learned weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            normed = F.layer_norm(x.float(), [self.dim])
        return normed * self.weight[None, None, :]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation; shift and scale are [b, 1, h]."""
    return x * (1 + scale) + shift


def gated_residual(x: Tensor, gate: Tensor, residual: Tensor, p: float, training: bool) -> Tensor:
    """residual + gate * dropout(x): MDLM's bias_dropout_add_scale without a bias."""
    return residual + gate * F.dropout(x, p=p, training=training)


class RotaryTables(nn.Module):
    """cos / sin tables [l, d/2] of rotary embeddings (base 10000), cached per sequence length."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = (seq_len, device, angles.cos(), angles.sin())
        return self._cache[2], self._cache[3]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding (flash-attn's non-interleaved layout). x: [b, l, heads, d]; cos, sin: [l, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class SigmaEmbedder(nn.Module):
    """MDLM's TimestepEmbedder: sinusoidal features (cos | sin, max period 10000) -> Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: Tensor) -> Tensor:  # [b] -> [b, cond_dim]
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class DDiTBlock(nn.Module):
    """One adaLN-modulated transformer block (pre-LN attention and MLP, gated residuals)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1 = WeightOnlyLayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = WeightOnlyLayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], c: Tensor) -> Tensor:
        b, l, h = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift1, scale1)).view(b, l, 3, self.n_heads, h // self.n_heads)
        cos, sin = rotary
        q, k, v = apply_rotary(qkv[:, :, 0], cos, sin), apply_rotary(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              dropout_p=0.0, is_causal=False)  # [b, heads, l, d]
        attn = attn.transpose(1, 2).reshape(b, l, h)
        x = gated_residual(self.attn_out(attn), gate1, x, self.dropout, self.training)
        mlp = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return gated_residual(mlp, gate2, x, self.dropout, self.training)


class DDiTFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = WeightOnlyLayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DIT(nn.Module):
    """MDLM's diffusion transformer. `vocab_size` counts the mask token (MDLM: tokenizer vocabulary + 1)."""

    def __init__(self, vocab_size: int, hidden_size: int, n_heads: int, n_blocks: int, cond_dim: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.vocab_size = vocab_size
        self.vocab_embed = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.kaiming_uniform_(self.vocab_embed, a=math.sqrt(5))
        self.sigma_map = SigmaEmbedder(cond_dim)
        self.rotary = RotaryTables(hidden_size // n_heads)
        self.blocks = nn.ModuleList(DDiTBlock(hidden_size, n_heads, cond_dim, dropout=dropout) for _ in range(n_blocks))
        self.output_layer = DDiTFinalLayer(hidden_size, vocab_size, cond_dim)

    def forward(self, indices: Tensor, sigma: Tensor) -> Tensor:
        """[b, l] ids, [b] sigma -> [b, l, V+1] logits (in the autocast dtype, if any)."""
        x = self.vocab_embed[indices]
        c = F.silu(self.sigma_map(sigma))
        rotary = self.rotary(indices.shape[1], indices.device)
        for block in self.blocks:
            x = block(x, rotary, c)
        return self.output_layer(x, c)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """total, and non-embedding = total minus the input embedding table (the output head is a matmul: counted)."""
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "non_embedding": total - model.vocab_embed.numel()}


# ------------------------------------------------------------------------------------------------ diffusion step


def loglinear_noise(t: Tensor, eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(sigma(t), dsigma/dt) of MDLM's log-linear schedule: 1 - exp(-sigma) = (1 - eps) t."""
    return -torch.log1p(-(1 - eps) * t), (1 - eps) / (1 - (1 - eps) * t)


def sample_t(n: int, device: torch.device, sampling_eps: float = 1e-3, antithetic: bool = True) -> Tensor:
    u = torch.rand(n, device=device)
    if antithetic:
        u = (u / n + torch.arange(n, device=device) / n) % 1
    return (1 - sampling_eps) * u + sampling_eps


def subs_log_probs(logits: Tensor, xt: Tensor, mask_index: int) -> Tensor:
    """SUBS parameterisation: [b, l, V+1] logits -> log-probabilities (fp32) that never put mass on the mask and
    copy unmasked inputs (their row is 0 at x_t and NEG_INFINITY elsewhere)."""
    logits[:, :, mask_index] += NEG_INFINITY
    logits = logits - torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # fp32 by promotion, as MDLM's autocast
    unmasked = xt != mask_index
    logits[unmasked] = NEG_INFINITY
    logits[unmasked, xt[unmasked]] = 0.0
    return logits


@dataclass
class ReferenceConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    grad_clip: float = 1.0
    ema: float = 0.9999
    """EMA decay (0 disables the EMA update)."""
    noise_eps: float = 1e-3
    sampling_eps: float = 1e-3
    antithetic: bool = True
    time_conditioning: bool = False


class ExponentialMovingAverage:
    """MDLM's parameter EMA: decay min(decay, (1 + n) / (10 + n)), shadow -= (1 - decay) (shadow - param)."""

    def __init__(self, parameters, decay: float):
        self.decay, self.num_updates = decay, 0
        self.shadow = [p.detach().clone() for p in parameters if p.requires_grad]

    @torch.no_grad()
    def update(self, parameters) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = [p for p in parameters if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)  # = shadow - (1 - decay) (shadow - param)


class MDLMReferenceTrainer:
    """The DIT plus MDLM's continuous-time SUBS loss and optimiser step.

    Args:
        model: a DIT whose last vocabulary id is the mask token.
        cfg: optimiser and forward-process settings (MDLM's defaults).
        autocast_dtype: run the backbone under autocast to this dtype (None: no autocast).
    """

    def __init__(self, model: DIT, cfg: ReferenceConfig | None = None, autocast_dtype: torch.dtype | None = None):
        self.model, self.cfg = model, cfg or ReferenceConfig()
        self.mask_index = model.vocab_size - 1
        self.autocast_dtype = autocast_dtype
        c = self.cfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=tuple(c.betas), eps=c.eps,
                                           weight_decay=c.weight_decay)
        # transformers.get_constant_schedule_with_warmup: s / warmup during the warm-up, then 1
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: s / max(1, c.warmup_steps) if s < c.warmup_steps else 1.0)
        self.ema = ExponentialMovingAverage(model.parameters(), c.ema) if c.ema > 0 else None
        self.last_masked_fraction: float | Tensor = float("nan")

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def loss(self, x0: Tensor) -> Tensor:
        """Per-token NELBO estimate of a batch [b, l] of clean ids (MDLM's `_loss` with an all-ones mask)."""
        c = self.cfg
        t = sample_t(x0.shape[0], x0.device, c.sampling_eps, c.antithetic)
        sigma, dsigma = loglinear_noise(t, c.noise_eps)
        move_chance = 1 - torch.exp(-sigma[:, None])
        xt = torch.where(torch.rand(x0.shape, device=x0.device) < move_chance, self.mask_index, x0)
        self.last_masked_fraction = (xt == self.mask_index).float().mean()  # read after the step's .item() sync
        conditioning = sigma if c.time_conditioning else torch.zeros_like(sigma)
        with self._autocast(x0.device):
            logits = self.model(xt, conditioning)
        log_p = subs_log_probs(logits, xt, self.mask_index).gather(-1, x0[:, :, None])[:, :, 0]
        nll = -log_p * (dsigma / torch.expm1(sigma))[:, None]
        return nll.sum() / nll.numel()

    def step(self, x0: Tensor) -> float:
        """One training step (forward, backward, clip, AdamW, LR schedule, EMA); returns the loss."""
        self.model.train()
        loss = self.loss(x0)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model.parameters())
        value = loss.item()
        self.last_masked_fraction = float(self.last_masked_fraction)
        return value
