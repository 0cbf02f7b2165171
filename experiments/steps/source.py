"""The synthetic source of the steps study: a sparse order-1 Markov chain with forbidden transitions.

Choice (documented in experiments/steps/README.md). V symbols (default 8, byte ids 'a', 'b', ... in the model);
every state has K allowed successors (default 3, chosen at random, transition probabilities Dirichlet(1) over
them), the other V - K transitions have probability exactly 0. x_1 is drawn from the stationary distribution pi, so
the chain is stationary. Then:

* exact likelihood: log p(x) = log pi(x_1) + sum_i log P(x_i, x_{i+1}) (one gather; -inf iff a forbidden
  transition or a symbol outside the alphabet occurs);
* entropy rate H = -sum_a pi_a sum_b P_ab log P_ab, and E[-log p(x)] / L = (H(pi) + (L - 1) H) / L exactly
  (`expected_nll_per_token`);
* "correct" sequence: every symbol in the alphabet and no forbidden transition (`is_correct`); every sample of the
  source is correct, and a parallel sampler that draws two adjacent masked tokens independently from their
  marginals produces a forbidden pair with probability ~ (V - K) / V, so sequence errors measure the sampler's
  factorisation error directly;
* the exact denoiser: given any partially masked sequence, x_i depends only on its nearest visible neighbours a
  (distance d1 to the left) and b (d2 to the right): p(x_i = v | z) ∝ P^{d1}[a, v] P^{d2}[v, b] (pi[v] when nothing is
  visible to the left, no right factor when nothing is visible to the right). `OracleDenoiser` wraps it for
  `mdm_scale.sampling.generate`: the sampler's own error with a perfect model, the setting of the theory.
  Positions far from any visible token have exactly the same conditional (pi), and the sampler's confidence /
  entropy / EB rankings break exact ties leftmost-first, which would reveal a contiguous block at once; `jitter`
  (the study uses 1e-4) multiplies every probability by exp(jitter * N(0, 1)) and renormalises: the conditionals
  change by ~0.01 % relative (negligible for the metrics) and ties between positions are broken at random.

A sample's true per-token NLL is infinite as soon as it has one forbidden transition; `true_nll_per_token` therefore
charges every forbidden transition (or out-of-alphabet symbol) a fixed penalty of -log(FLOOR) nats (FLOOR = 1e-3,
6.9 nats) and reports it next to the exact error rates (token level: fraction of forbidden transitions; sequence
level: fraction of samples with any).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FLOOR = 1e-3
"""Probability charged to a forbidden transition / out-of-alphabet symbol in `true_nll_per_token`."""


@dataclass
class MarkovSource:
    P: np.ndarray
    """[V, V] transition matrix; zeros are the forbidden transitions."""
    pi: np.ndarray
    """[V] stationary distribution (the law of x_1)."""

    @property
    def num_symbols(self) -> int:
        return self.P.shape[0]

    @property
    def allowed(self) -> np.ndarray:
        return self.P > 0

    def entropy_rate(self) -> float:
        """H = -sum_a pi_a sum_b P_ab log P_ab (nats per token)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(self.P > 0, self.P * np.log(self.P), 0.0)
        return float(-(self.pi * terms.sum(1)).sum())

    def initial_entropy(self) -> float:
        return float(-(self.pi * np.log(self.pi)).sum())

    def expected_nll_per_token(self, seq_len: int) -> float:
        """E[-log p(x)] / L for x of length L drawn from the source (the floor any model's samples are compared to)."""
        return (self.initial_entropy() + (seq_len - 1) * self.entropy_rate()) / seq_len

    def sample(self, num: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """[num, seq_len] int64 sequences (stationary start)."""
        v = self.num_symbols
        cdf = np.cumsum(self.P, axis=1)
        x = np.empty((num, seq_len), dtype=np.int64)
        x[:, 0] = rng.choice(v, size=num, p=self.pi)
        for i in range(1, seq_len):
            u = rng.random(num)
            x[:, i] = np.minimum((u[:, None] > cdf[x[:, i - 1]]).sum(1), v - 1)
        return x

    def log_likelihood(self, x: np.ndarray) -> np.ndarray:
        """[n] exact log p(x) (-inf for incorrect sequences)."""
        x = np.asarray(x)
        ok = ((x >= 0) & (x < self.num_symbols)).all(1)
        xc = np.clip(x, 0, self.num_symbols - 1)
        with np.errstate(divide="ignore"):
            logp = np.log(self.pi[xc[:, 0]]) + np.log(self.P[xc[:, :-1], xc[:, 1:]]).sum(1)
        return np.where(ok, logp, -np.inf)

    def token_errors(self, x: np.ndarray) -> np.ndarray:
        """[n, L] bool: position 0 is an error iff out of the alphabet; position i > 0 iff x_i is out of the
        alphabet or (x_{i-1}, x_i) is a forbidden transition."""
        x = np.asarray(x)
        out = (x < 0) | (x >= self.num_symbols)
        xc = np.clip(x, 0, self.num_symbols - 1)
        err = out.copy()
        err[:, 1:] |= ~self.allowed[xc[:, :-1], xc[:, 1:]] | out[:, :-1]
        return err

    def is_correct(self, x: np.ndarray) -> np.ndarray:
        """[n] bool: in the alphabet and no forbidden transition (the source's support)."""
        return ~self.token_errors(x).any(1)

    def true_nll_per_token(self, x: np.ndarray, floor: float = FLOOR) -> np.ndarray:
        """[n] -log p(x) / L with every erroneous position (see token_errors) charged -log(floor) instead of inf."""
        x = np.asarray(x)
        err = self.token_errors(x)
        xc = np.clip(x, 0, self.num_symbols - 1)
        with np.errstate(divide="ignore"):
            step = np.concatenate([np.log(self.pi[xc[:, :1]]), np.log(self.P[xc[:, :-1], xc[:, 1:]])], axis=1)
        step = np.where(err, np.log(floor), step)
        return -step.sum(1) / x.shape[1]

    def metrics(self, x: np.ndarray) -> dict:
        """Per-token true NLL (mean, floor-charged), its gap to the source's expectation, token error rate (fraction
        of positions in error), sequence error rate (fraction of samples with any error)."""
        x = np.asarray(x)
        err = self.token_errors(x)
        nll = float(self.true_nll_per_token(x).mean())
        return {"nll": nll, "nll_gap": nll - self.expected_nll_per_token(x.shape[1]),
                "token_error": float(err.mean()), "seq_error": float(err.any(1).mean()), "num_samples": len(x)}


def make_source(num_symbols: int = 8, allowed: int = 3, seed: int = 0) -> MarkovSource:
    """Random sparse chain: K = `allowed` successors per state, Dirichlet(1) probabilities; redrawn until it is
    irreducible and aperiodic (some power of P strictly positive)."""
    if not 1 <= allowed <= num_symbols:
        raise ValueError("allowed must be in [1, num_symbols]")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        P = np.zeros((num_symbols, num_symbols))
        for a in range(num_symbols):
            succ = rng.choice(num_symbols, size=allowed, replace=False)
            P[a, succ] = rng.dirichlet(np.ones(allowed))
        if (np.linalg.matrix_power((P > 0).astype(float), num_symbols ** 2) > 0).all():
            w, vecs = np.linalg.eig(P.T)
            pi = np.real(vecs[:, np.argmin(np.abs(w - 1))])
            pi = np.abs(pi) / np.abs(pi).sum()
            return MarkovSource(P, pi)
    raise RuntimeError("no irreducible aperiodic chain found")


# ------------------------------------------------------------------------------------------- exact denoiser
class OracleDenoiser:
    """The source's exact conditional p(x_i | z) as a drop-in `denoiser` for `mdm_scale.sampling.generate`.

    Token ids are `offset + symbol` in a vocabulary of `vocab_size` (mask id = vocab_size, as in the project's
    Denoiser). `__call__(z, t)` returns "features" that are already log-probabilities [b, l, vocab_size] (-inf off
    the alphabet); `output_logits` and `vocab_logits` are the identity. Visible tokens outside the alphabet are
    treated as unknown."""

    def __init__(self, source: MarkovSource, *, vocab_size: int, offset: int, max_seq_len: int = 1024,
                 jitter: float = 0.0, seed: int = 0):
        self.source, self.vocab_size, self.offset = source, vocab_size, offset
        self.jitter = jitter
        self.noise = torch.Generator().manual_seed(seed)
        self.mask_id = vocab_size
        self.training = False
        self.scheduler_heads: dict = {}
        v = source.num_symbols
        powers = [np.eye(v)]
        for _ in range(max_seq_len):
            powers.append(powers[-1] @ source.P)
        self.powers = torch.tensor(np.stack(powers))  # [max_seq_len + 1, V, V] float64
        self.pi = torch.tensor(source.pi)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def output_logits(self, features: torch.Tensor) -> torch.Tensor:
        return features

    vocab_logits = output_logits  # one process: the whole vocabulary already

    def __call__(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        b, l = z.shape
        v = self.source.num_symbols
        sym = z - self.offset
        visible = (sym >= 0) & (sym < v)
        idx = torch.arange(l).expand(b, l)
        # nearest visible index to the left (strictly) and right (strictly); -1 / l when none
        left_pos = torch.where(visible, idx, torch.full_like(idx, -1)).cummax(1).values
        left_pos = torch.cat([torch.full((b, 1), -1, dtype=idx.dtype), left_pos[:, :-1]], 1)
        right_src = torch.where(visible, idx, torch.full_like(idx, l)).flip(1).cummin(1).values.flip(1)
        right_pos = torch.cat([right_src[:, 1:], torch.full((b, 1), l, dtype=idx.dtype)], 1)
        symc = sym.clamp(0, v - 1)
        has_left = left_pos >= 0
        a = torch.gather(symc, 1, left_pos.clamp(0, l - 1))
        d1 = (idx - left_pos).clamp(0, self.powers.shape[0] - 1)
        prior = torch.where(has_left[..., None], self.powers[d1, a], self.pi.expand(b, l, v))  # [b, l, V]
        has_right = right_pos < l
        c = torch.gather(symc, 1, right_pos.clamp(0, l - 1))
        d2 = (right_pos - idx).clamp(0, self.powers.shape[0] - 1)
        like = self.powers[d2, :, c]  # [b, l, V]: P^{d2}[v, c]
        post = prior * torch.where(has_right[..., None], like, torch.ones_like(like))
        post = post / post.sum(-1, keepdim=True).clamp_min(1e-300)
        out = torch.full((b, l, self.vocab_size), -torch.inf, dtype=torch.float64)
        logp = post.clamp_min(1e-300).log()
        if self.jitter > 0:  # random tie-breaking between positions (module doc); p changes by a factor ~1 +- jitter
            logp = logp + self.jitter * torch.randn(b, l, v, generator=self.noise, dtype=torch.float64)
            logp = logp - logp.logsumexp(-1, keepdim=True)
        out[..., self.offset:self.offset + v] = logp
        return out
