"""One sampler loop with pluggable pieces (docs/sampling.md): a Beta time grid, an order policy, optional
ReMDM-style remasking; plus generation perplexity under an autoregressive checkpoint of this project.

Time grid (Chen et al., "Masked Diffusion Models as Energy Minimization"): t_k = 1 - I_{k/N}(a, b), k = 0..N,
with I the regularized incomplete beta function; Beta(1, 1) is the uniform grid 1 - k/N.

Policies (which masked positions a step reveals; the token is then drawn from p_theta(. | z_t)):
    ancestral      each masked i revealed with the schedule's (alpha_i(s) - alpha_i(t)) / (1 - alpha_i(t))
                   (LoMDM: its backward scheduler's 1 - (s/t)^{w_hat_i}; MDM-LS: its learned exponents)
    random | left_to_right | confidence (max prob first) | entropy (lowest entropy first)
                   a fixed count per step, round(n_masked (t_k - t_{k+1}) / t_k), at least 1, all at the last step
    eb             EB-sampler (Ben-Hamu et al., arXiv 2505.24857): the longest prefix of the masked positions sorted
                   by error proxy e with sum(e) - max(e) <= gamma; runs until no mask is left (adaptive NFE)

    python -m mdm_scale.sampling runs/tiny/checkpoints/step_00000600 --num-samples 4 --nfe 64 --top-p 0.9
    python -m mdm_scale.sampling CKPT --prompt "In the beginning"        # prefix conditioning
    python -m mdm_scale.sampling CKPT --policy eb --eb-gamma 0.5 --scorer runs/ar/checkpoints/step_00000600
    python -m mdm_scale.sampling CKPT --nfe 16 --beta 2 1 --remask-rate 0.02
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import betainc
from torch import Tensor

from mdm_scale.cli import expected_errors
from mdm_scale.config import EB_PROXIES, POLICIES
from mdm_scale.denoiser import Denoiser
from mdm_scale.evaluation import exact_ar_nll
from mdm_scale.model import load_for_inference
from mdm_scale.schedules import Schedule
from mdm_scale.schedules.block import BlockSchedule

TUNED_FILE = "tuned_schedule.json"


@dataclass
class Sample:
    tokens: Tensor
    """[num_samples, seq_len] token ids, no mask token."""
    nfe: int
    """Denoiser steps taken (for `eb` the adaptive count; otherwise at most the requested nfe)."""
    evaluations: int
    """Forward passes actually run: <= nfe, since a step whose input equals the previous step's (nothing was
    revealed) reuses that output when the denoiser is not time-conditioned, as MDLM's sampler does."""


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """[n, V] probabilities renormalised over each row's smallest top set with mass >= top_p (the top token is
    always kept)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------- time grid


def beta_time_grid(nfe: int, beta: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """[nfe + 1] float64 times t_k = 1 - I_{k/nfe}(a, b), from 1 down to 0. Beta(1, 1) returns the uniform grid
    torch.linspace(1, 0, nfe + 1) bit for bit."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    a, b = float(beta[0]), float(beta[1])
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"Beta parameters must be positive, got ({a}, {b})")
    if a == 1.0 and b == 1.0:
        return torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)
    times = torch.from_numpy(1.0 - betainc(a, b, np.arange(nfe + 1) / nfe)).to(torch.float64)  # scipy
    times[0], times[-1] = 1.0, 0.0
    return times


def reveal_counts(num_masked: Tensor, t: float, s: float, last: bool) -> Tensor:
    """[b] positions a fixed-count policy reveals from t to s < t: what a uniform (log-linear) schedule reveals on
    average, round(n (t - s) / t), at least 1 while positions remain, all of them at the last step."""
    n = num_masked.to(torch.float64)
    if last or t <= 0:
        return num_masked.clone()
    count = torch.floor(n * (t - s) / t + 0.5).long()
    return torch.minimum(count.clamp_min(1), num_masked)


# ------------------------------------------------------------------------------------------------- sampler


def _probabilities(denoiser: Denoiser, features: Tensor, temperature: float, top_p: float) -> Tensor:
    """[n, h] features -> [n, V] token probabilities (TP logits gathered; temperature, nucleus)."""
    logits = denoiser.vocab_logits(features).float()  # [n, V]
    probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
    return nucleus(probs, top_p) if top_p < 1.0 else probs


def _ranked_prefix(score: Tensor, candidates: Tensor, count: Tensor) -> Tensor:
    """[b, l] bool: in each row the `count` candidate positions of smallest score (ties: leftmost first)."""
    score = score.masked_fill(~candidates, float("inf"))
    order = score.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(score.shape[1], device=score.device)
                                             .expand_as(order).contiguous())
    return candidates & (rank < count[:, None])


def eb_counts(proxy: Tensor, candidates: Tensor, gamma: float) -> Tensor:
    """[b] EB-sampler counts: sorting each row's candidates by proxy e (ascending), the largest k with
    e_(1) + ... + e_(k) - e_(k) <= gamma (the sum minus the max bounds the mutual information of the revealed
    tokens); at least 1 while candidates remain."""
    sorted_proxy = proxy.masked_fill(~candidates, float("inf")).sort(dim=-1).values
    finite = torch.isfinite(sorted_proxy)
    before = torch.where(finite, sorted_proxy, torch.zeros_like(sorted_proxy)).cumsum(-1) - \
        torch.where(finite, sorted_proxy, torch.zeros_like(sorted_proxy))  # sum of the smaller ones
    count = (finite & (before <= gamma)).sum(-1)
    return torch.where(candidates.any(-1), count.clamp_min(1), torch.zeros_like(count))


@dataclass
class PolicyStep:
    """What an order policy sees at one denoising step."""

    denoiser: Denoiser
    schedule: Schedule
    hidden: Tensor
    """[b, l, h] the denoiser's features of z."""
    masked: Tensor
    """[b, l] bool: still masked."""
    t: Tensor
    """[b] the current time (for `eb`: the fraction of free positions still masked)."""
    s: Tensor | None
    """[b] the next time on the grid (None for `eb`)."""
    last: bool
    generator: torch.Generator
    temperature: float
    top_p: float
    eb_gamma: float
    eb_proxy: str

    def probabilities(self, where: Tensor) -> Tensor:
        return _probabilities(self.denoiser, self.hidden[where], self.temperature, self.top_p)


def _ancestral(step: PolicyStep) -> tuple[Tensor, Tensor | None]:
    """Reveal each masked position with the schedule's probability from t to s (LoMDM: its learned backward
    velocities), then sample the revealed tokens."""
    backward_logits = None
    if "backward_scheduler" in step.denoiser.scheduler_heads:
        backward_logits = step.denoiser.scheduler_logits("backward_scheduler", step.hidden)
    b, l = step.masked.shape
    reveal_prob = step.schedule.reveal_probability(step.t, step.s, l, backward_logits)
    if step.last:
        reveal_prob = torch.ones_like(reveal_prob)  # s = 0: everything is clean
    uniforms = torch.rand(b, l, generator=step.generator, dtype=torch.float64).to(step.masked.device)
    reveal = step.masked & (uniforms < reveal_prob)
    return reveal, (step.probabilities(reveal) if reveal.any() else None)


def _ranked(score: Callable[[PolicyStep, Tensor], Tensor], count: Callable[[PolicyStep, Tensor], Tensor]):
    """A policy that reveals, in each row, the `count` masked positions of smallest `score` (ties: leftmost)."""

    def policy(step: PolicyStep) -> tuple[Tensor, Tensor | None]:
        all_probs = step.probabilities(step.masked)  # [n_masked, V]
        scores = score(step, all_probs)
        reveal = _ranked_prefix(scores, step.masked, count(step, scores))
        return reveal, (all_probs[reveal[step.masked]] if reveal.any() else None)

    return policy


def _on_masked(step: PolicyStep, values: Tensor) -> Tensor:
    """[n_masked] values -> [b, l] float64 scores (0 elsewhere; only masked positions are ranked)."""
    return torch.zeros(step.masked.shape, dtype=torch.float64, device=step.masked.device).masked_scatter(
        step.masked, values.double())


def _random_score(step: PolicyStep, probs: Tensor) -> Tensor:
    return torch.rand(step.masked.shape, generator=step.generator, dtype=torch.float64).to(step.masked.device)


def _position_score(step: PolicyStep, probs: Tensor) -> Tensor:
    return torch.arange(step.masked.shape[1], device=step.masked.device, dtype=torch.float64).expand_as(step.masked)


def _confidence_score(step: PolicyStep, probs: Tensor) -> Tensor:  # 1 - max prob: most confident first
    return _on_masked(step, 1.0 - probs.max(-1).values.double())


def _entropy_score(step: PolicyStep, probs: Tensor) -> Tensor:  # lowest predictive entropy first
    return _on_masked(step, torch.special.entr(probs.double()).sum(-1))


def _eb_score(step: PolicyStep, probs: Tensor) -> Tensor:
    return (_confidence_score if step.eb_proxy == "confidence" else _entropy_score)(step, probs)


def _grid_count(step: PolicyStep, scores: Tensor) -> Tensor:
    return reveal_counts(step.masked.sum(-1), float(step.t[0]), float(step.s[0]), step.last)


def _eb_count(step: PolicyStep, scores: Tensor) -> Tensor:
    return eb_counts(scores, step.masked, step.eb_gamma)


POLICY_STEPS: dict[str, Callable[[PolicyStep], tuple[Tensor, Tensor | None]]] = {
    "ancestral": _ancestral,
    "random": _ranked(_random_score, _grid_count),
    "left_to_right": _ranked(_position_score, _grid_count),
    "confidence": _ranked(_confidence_score, _grid_count),
    "entropy": _ranked(_entropy_score, _grid_count),
    "eb": _ranked(_eb_score, _eb_count),
}
"""Order policies (config.POLICIES): one step's reveal set [b, l] and the probabilities of its tokens."""
ADAPTIVE_POLICIES = ("eb",)
"""Policies that ignore the time grid: they stop when nothing is masked (t = the fraction still masked)."""


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    schedule: Schedule,
    *,
    num_samples: int,
    seq_len: int,
    nfe: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompt: Tensor | None = None,
    device: torch.device | str = "cpu",
    policy: str = "ancestral",
    beta: tuple[float, float] = (1.0, 1.0),
    eb_gamma: float = 1.0,
    eb_proxy: str = "entropy",
    remask_rate: float = 0.0,
    reuse_unchanged: bool = True,
) -> Sample:
    """Generate [num_samples, seq_len] token ids with no mask token left (module doc, docs/sampling.md).

    Args:
        nfe: time steps of the Beta grid (denoiser calls; `eb` ignores the grid and stops when nothing is masked,
            and remasks only during its first nfe - 1 steps).
        temperature: divides the logits; top_p: nucleus sampling (1 = the full distribution, -> 0 = greedy).
            Confidence, entropy and the EB proxies are computed on this processed distribution.
        prompt: optional [num_samples, seq_len] ids with -1 where the sampler should generate; other positions
            are fixed (infilling / prefix conditioning) and never remasked.
        policy: one of POLICIES (`POLICY_STEPS`). beta: (a, b) of the time grid. eb_gamma, eb_proxy: the `eb`
            policy's budget and error proxy (entropy | confidence = 1 - max prob).
        remask_rate: after each step but the last, every token generated at an earlier step is masked again with
            this probability (0: no random number is drawn for it, so outputs equal the plain sampler's).
        reuse_unchanged: skip the forward pass of a step whose input is unchanged, if the denoiser ignores t (no
            time embedding): the output is identical, so samples do not change; only `evaluations` drops.
    Returns a Sample (tokens, nfe = denoiser steps, evaluations = forward passes run).
    """
    if policy not in POLICY_STEPS:
        raise ValueError(f"unknown sampling policy '{policy}'; valid: {', '.join(POLICIES)}")
    if eb_proxy not in EB_PROXIES:
        raise ValueError(f"unknown eb_proxy '{eb_proxy}'; valid: {', '.join(EB_PROXIES)}")
    if not 0.0 <= remask_rate < 1.0:
        raise ValueError(f"remask_rate must be in [0, 1), got {remask_rate}")
    if eb_gamma < 0:
        raise ValueError(f"eb_gamma must be >= 0, got {eb_gamma}")
    policy_step, adaptive = POLICY_STEPS[policy], policy in ADAPTIVE_POLICIES
    times = beta_time_grid(nfe, beta)
    was_training = denoiser.training
    denoiser.eval()
    mask_id = denoiser.mask_id
    z = torch.full((num_samples, seq_len), mask_id, dtype=torch.long, device=device)
    if prompt is not None:
        z = torch.where(prompt.to(device) >= 0, prompt.to(device), z)
        free = prompt.to(device) < 0  # positions the sampler generates
    else:
        free = torch.ones_like(z, dtype=torch.bool)
    k, evaluations = 0, 0  # k: steps taken (Sample.nfe)
    reusable = reuse_unchanged and getattr(denoiser, "time_embedding", None) is None
    hidden, z_of_hidden = None, None
    while True:
        masked = z == mask_id
        if not masked.any() or (k == nfe and not adaptive):
            break
        if adaptive:
            t, s, last = masked.sum(-1).double() / free.sum(-1).clamp_min(1).double(), None, False
        else:
            t, s, last = times[k].expand(num_samples).to(device), times[k + 1].expand(num_samples).to(device), k == nfe - 1
        if hidden is None or not reusable or not torch.equal(z, z_of_hidden):
            hidden, z_of_hidden = denoiser(z, t.float()), z  # [b, l, h]
            evaluations += 1
        reveal, probs = policy_step(PolicyStep(denoiser, schedule, hidden, masked, t, s, last, generator,
                                               temperature, top_p, eb_gamma, eb_proxy))
        if probs is not None:
            tokens = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
            z = z.masked_scatter(reveal, tokens)
        if remask_rate > 0 and k < nfe - 1:
            previously_generated = free & ~masked  # clean before this step and not prompt
            uniforms = torch.rand(num_samples, seq_len, generator=generator, dtype=torch.float64).to(device)
            z = z.masked_fill(previously_generated & (uniforms < remask_rate), mask_id)
        k += 1
    denoiser.train(was_training)
    return Sample(z, k, evaluations)


def sampler_options(sampling) -> dict:
    """`generate` keyword arguments from a SamplingConfig (nfe, temperature, top_p, policy, beta, eb, remask)."""
    return {"nfe": sampling.nfe, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "policy": sampling.policy, "beta": tuple(float(v) for v in sampling.beta), "eb_gamma": sampling.eb_gamma,
            "eb_proxy": sampling.eb_proxy, "remask_rate": sampling.remask_rate}


# ------------------------------------------------------------------------------- generation perplexity


@dataclass
class ArScorer:
    """An `objective=ar` checkpoint of this project, loaded to score generated token ids."""

    denoiser: Denoiser
    schedule: Schedule
    tokenizer: object
    device: torch.device
    checkpoint: str


def load_scorer(checkpoint: str | Path) -> ArScorer:
    """Load an autoregressive (left-to-right or right-to-left, block size 1) checkpoint for `generation_nll`."""
    cfg, tokenizer, model, dims = load_for_inference(checkpoint)
    schedule = model["schedule"]
    if not (isinstance(schedule, BlockSchedule) and schedule.block_size == 1):
        raise ValueError(f"{checkpoint}: the scorer must be an autoregressive checkpoint (objective=ar), "
                         f"its schedule is {type(schedule).__name__}")
    return ArScorer(model["denoiser"], schedule, tokenizer, dims.device, str(checkpoint))


@torch.no_grad()
def generation_nll(tokens: Tensor, scorer: ArScorer, tokenizer=None) -> dict[str, float]:
    """Mean NLL per token (nats) of [b, l] generated ids under the AR scorer (exact causal likelihood; one pass for
    a causal scorer, l copies per sequence otherwise), its standard error over the b sequences (each sequence one
    draw; None for b = 1) and the perplexity exp(NLL). `tokenizer`: the generator's, checked against the
    scorer's."""
    if tokenizer is not None and tokenizer.fingerprint() != scorer.tokenizer.fingerprint():
        raise ValueError(f"the scorer {scorer.checkpoint} uses another tokenizer than the sampled model")
    if tokens.shape[1] > scorer.denoiser.max_seq_len:
        raise ValueError(f"sequences of length {tokens.shape[1]} exceed the scorer's max_seq_len "
                         f"{scorer.denoiser.max_seq_len}")
    if tokens.min() < 0 or tokens.max() >= scorer.denoiser.vocab_size:
        raise ValueError("token ids outside the scorer's vocabulary (mask tokens left?)")
    per_sequence = exact_ar_nll(scorer.denoiser, scorer.schedule, tokens.to(scorer.device))  # [b] nats/sequence
    nll = per_sequence.sum().item() / tokens.numel()
    per_token = per_sequence / tokens.shape[1]
    stderr = (per_token.std() / math.sqrt(len(per_token))).item() if len(per_token) > 1 else None
    return {"nll": nll, "nll_stderr": stderr, "ppl": math.exp(min(nll, 700.0)), "tokens": tokens.numel()}


def token_entropy(tokens: Tensor) -> float:
    """Mean over sequences of the entropy (nats) of each sequence's token histogram (low = repetitive text)."""
    out = []
    for row in tokens.cpu():
        counts = torch.bincount(row).double()
        p = counts[counts > 0] / row.numel()
        out.append(float(-(p * p.log()).sum()))
    return sum(out) / max(len(out), 1)


def read_tuned(checkpoint: str | Path) -> dict | None:
    """The checkpoint's tuned_schedule.json (written by `python -m mdm_scale tune-schedule`), or None."""
    path = Path(checkpoint) / TUNED_FILE
    return json.loads(path.read_text()) if path.exists() else None


@expected_errors
def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m mdm_scale.sampling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument("--nfe", type=int, default=None,
                   help=f"time steps (denoiser calls); default: the nfe of {TUNED_FILE} if present, else 64")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--prompt", default=None, help="text the samples start with (prefix conditioning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="ancestral", choices=POLICIES)
    p.add_argument("--beta", type=float, nargs=2, default=None, metavar=("A", "B"),
                   help=f"Beta(a, b) time grid; default: {TUNED_FILE} when its nfe matches, else 1 1 (uniform)")
    p.add_argument("--eb-gamma", type=float, default=1.0, help="eb: budget of sum(proxy) - max(proxy) per step")
    p.add_argument("--eb-proxy", default="entropy", choices=EB_PROXIES)
    p.add_argument("--remask-rate", type=float, default=0.0, help="ReMDM-style remasking probability per step")
    p.add_argument("--scorer", default=None, help="an objective=ar checkpoint: print the generation NLL / PPL")
    args = p.parse_args(argv)
    cfg, tokenizer, model, dims = load_for_inference(args.checkpoint)
    seq_len = args.seq_len or cfg.data.seq_len
    tuned = read_tuned(args.checkpoint)
    nfe = args.nfe or (int(tuned["nfe"]) if tuned else 64)
    beta, source = (1.0, 1.0), "uniform"
    if args.beta is not None:
        beta, source = tuple(args.beta), "--beta"
    elif tuned and int(tuned["nfe"]) == nfe:
        beta, source = (float(tuned["beta"][0]), float(tuned["beta"][1])), TUNED_FILE
    prompt = None
    if args.prompt:
        ids = tokenizer.encode(args.prompt)[:seq_len]
        prompt = torch.full((args.num_samples, seq_len), -1, dtype=torch.long)
        prompt[:, : len(ids)] = torch.tensor(ids)
    start = time.perf_counter()
    out = generate(model["denoiser"], model["schedule"], num_samples=args.num_samples, seq_len=seq_len, nfe=nfe,
                   generator=torch.Generator().manual_seed(args.seed), temperature=args.temperature,
                   top_p=args.top_p, prompt=prompt, device=dims.device, policy=args.policy, beta=beta,
                   eb_gamma=args.eb_gamma, eb_proxy=args.eb_proxy, remask_rate=args.remask_rate)
    seconds = time.perf_counter() - start
    for i, row in enumerate(out.tokens.cpu()):
        print(f"--- sample {i} ---\n{tokenizer.decode(row.tolist())}")
    print(f"NFE {out.nfe}, {out.evaluations} forward passes, {out.tokens.numel() / seconds:,.0f} tokens/s "
          f"({args.num_samples} x {seq_len} in {seconds:.2f} s; policy {args.policy}, "
          f"Beta({beta[0]:g}, {beta[1]:g}) time grid from {source})")
    if args.scorer:
        score = generation_nll(out.tokens, load_scorer(args.scorer), tokenizer)
        print(f"generation NLL {score['nll']:.4f} nats/token, PPL {score['ppl']:.2f} under {args.scorer}; "
              f"token entropy {token_entropy(out.tokens):.3f} nats")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
