"""Time samples for the NELBO estimator (`objective.t_sampler`): uniform, antithetic, or the P-POTS proposal.

Every sampler returns t in (t_min, 1] with an importance weight that keeps the estimator unbiased for
(1 - t_min)^-1 * integral_{t_min}^1 of the per-t loss (the NELBO when t_min = 0). Write v = (t - t_min)/(1 - t_min)
and s = v^c with c = min(time_power, p_pots_power): statistics and proposals are binned in s, finely near t = 0
where the weights A_i(t) = w_i / t make the loss heavy-tailed.

* uniform / antithetic, time_power k = 1 (MDLM): v = s, weight 1; antithetic stratifies s over the batch,
  s_b = (s + b/B) mod 1 (MDLM's low-discrepancy sampler).
* k < 1 (learned schedules): half the batch draws v = s, half v = s^(1/k) (density k v^(k-1), mass near 0), each
  group stratified, and every sample gets the balance-heuristic weight 1 / (f_u + f_k k v^(k-1)).
  Position i's term has finite variance iff w_i > k (docs/objective.md).
* p_pots: s is drawn from a piecewise-constant density q over `p_pots_bins` equal bins, v = s^(1/c), weight
  c(s) / q(s) with c(s) = dv/ds. (With equal bins in t itself, MDLM's 1/t weight would keep the variance
  log-divergent inside the first bin; in s = t^(1/2) the density near 0 grows like t^(-1/2), which makes it
  finite.) The estimator's variance is integral m2(s) / q(s) ds - NELBO^2, where m2(s) is
  the second moment of g(s) = L(t(s)) c(s) (L: the per-sequence loss at t, over masks and data); among
  piecewise-constant densities the minimiser is q_j proportional to sqrt(mean of m2 over bin j) (Cauchy-Schwarz).
  m2 is estimated online from the training losses (`observe`: decayed per-bin sums, reduced over every rank, so
  all ranks hold the same proposal), mixed with a uniform part so that weights stay <= 1/mix; the proposal used at
  a step depends only on earlier steps, so every step's estimator is unbiased. Draws are stratified through the
  proposal's inverse CDF.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mdm_scale.config import P_POTS_STATISTICS, T_SAMPLERS



def _stratified(n: int, generator: torch.Generator, antithetic: bool) -> Tensor:
    """n uniforms in (0, 1], stratified over [0, 1) when antithetic (MDLM's low-discrepancy sampler)."""
    if antithetic:
        u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n) / max(n, 1)) % 1
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    return 1 - u  # never exactly 0


def _times_and_weights(u_uniform: Tensor, u_power: Tensor, t_min: float, power: float) -> tuple[Tensor, Tensor]:
    n_u, n_p = len(u_uniform), len(u_power)
    log_v = torch.cat([u_uniform.log(), u_power.log() / power])  # [B]
    v = log_v.exp()
    if n_p == 0:
        weight = torch.ones_like(v)
    else:
        density_power = power * torch.exp((power - 1) * log_v)  # k v^(k-1)
        weight = 1 / ((n_u * 1.0 + n_p * density_power) / (n_u + n_p))
    return t_min + (1 - t_min) * v, weight


def sample_times(
    batch_size: int,
    *,
    generator: torch.Generator,
    t_min: float = 1e-3,
    power: float = 1.0,
    antithetic: bool = True,
) -> tuple[Tensor, Tensor]:
    """Draw one time per sequence from the fixed (stateless) proposals.

    Args:
        batch_size: B sequences.
        generator: the CPU generator all training randomness comes from (checkpointed).
        t_min: lower end of the time range (MDLM 1e-3; 0 for an untruncated NELBO).
        power: k of the heavy-tailed proposal; 1 = uniform only (MDLM).
        antithetic: stratify each group over [0, 1).

    Returns:
        t [B] float64 in (t_min, 1], t_weight [B] float64 importance weights.
    """
    if not 0 < power <= 1:
        raise ValueError(f"time_power must be in (0, 1], got {power}")
    n_power = batch_size // 2 if power < 1 else 0
    u_uniform = _stratified(batch_size - n_power, generator, antithetic)
    u_power = _stratified(n_power, generator, antithetic) if n_power else u_uniform[:0]
    return _times_and_weights(u_uniform, u_power, t_min, power)


def grid_times(num: int, *, t_min: float = 0.0, power: float = 1.0) -> tuple[Tensor, Tensor]:
    """Midpoint-rule counterpart of `sample_times` (u = (j + 1/2) / n in each group), for deterministic checks."""
    n_power = num // 2 if power < 1 else 0

    def mid(n: int) -> Tensor:
        return (torch.arange(n, dtype=torch.float64) + 0.5) / max(n, 1)

    return _times_and_weights(mid(num - n_power), mid(n_power), t_min, power)


class TimeSampler:
    """The configured time proposal plus, when something needs them, online per-bin loss statistics.

    Statistics (decayed sums over steps, per bin of s): count, sum of L (the per-sequence loss without importance
    weight, for `time_binned` score-function baselines) and sum of g^2 = (L c(s))^2 (for the P-POTS proposal;
    with statistic `token`, g^2 = c(s)^2 sum_i l_i^2 over the sequence's per-position terms l_i instead).
    They are the sampler's whole state: `state_dict` goes into the checkpoint.
    """

    def __init__(self, t_sampler: str = "antithetic", *, t_min: float = 1e-3, power: float = 1.0, bins: int = 32,
                 decay: float = 0.99, uniform_mix: float = 0.1, bin_power: float = 0.5,
                 statistic: str = "sequence", track_statistics: bool = False):
        if t_sampler not in T_SAMPLERS:
            raise ValueError(f"objective.t_sampler must be one of {', '.join(T_SAMPLERS)}, got {t_sampler!r}")
        if not 0 < power <= 1:
            raise ValueError(f"time_power must be in (0, 1], got {power}")
        if bins < 1 or not 0 <= decay < 1 or not 0 < uniform_mix <= 1:
            raise ValueError(f"p_pots needs bins >= 1, 0 <= decay < 1, 0 < uniform_mix <= 1; got {bins}, {decay}, "
                             f"{uniform_mix}")
        if not 0 < bin_power <= 1:
            raise ValueError(f"p_pots_power must be in (0, 1], got {bin_power}")
        if statistic not in P_POTS_STATISTICS:
            raise ValueError(f"objective.p_pots_statistic must be one of {', '.join(P_POTS_STATISTICS)}, "
                             f"got {statistic!r}")
        self.statistic = statistic
        self.t_sampler, self.t_min, self.power = t_sampler, t_min, power
        self.bin_power = min(power, bin_power)  # c: bins are equal in s = v^c
        self.bins, self.decay, self.uniform_mix = bins, decay, uniform_mix
        self.track_statistics = track_statistics or t_sampler == "p_pots"
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.loss_sum = torch.zeros(bins, dtype=torch.float64)
        self.square_sum = torch.zeros(bins, dtype=torch.float64)

    @classmethod
    def from_config(cls, cfg, *, evaluation: bool = False) -> TimeSampler:
        """From an ObjectiveConfig. Evaluation keeps MDLM's protocol: p_pots becomes the antithetic sampler."""
        kind = "antithetic" if evaluation and cfg.t_sampler == "p_pots" else cfg.t_sampler
        return cls(kind, t_min=cfg.t_min, power=cfg.time_power, bins=cfg.p_pots_bins, decay=cfg.p_pots_decay,
                   uniform_mix=cfg.p_pots_uniform_mix, bin_power=cfg.p_pots_power, statistic=cfg.p_pots_statistic,
                   track_statistics=not evaluation and cfg.score_baseline == "time_binned")

    # -- drawing ------------------------------------------------------------------------------------------------
    def proposal(self) -> Tensor:
        """[bins] probability mass of each bin of s (uniform until every bin has been observed)."""
        uniform = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        if self.t_sampler != "p_pots" or (self.count <= 0).any():
            return uniform
        root = (self.square_sum / self.count).sqrt()
        if not torch.isfinite(root).all() or root.sum() <= 0:
            return uniform
        return (1 - self.uniform_mix) * root / root.sum() + self.uniform_mix * uniform

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """t [n] (float64) and their importance weights [n]."""
        if self.t_sampler != "p_pots":
            return sample_times(n, generator=generator, t_min=self.t_min, power=self.power,
                                antithetic=self.t_sampler == "antithetic")
        mass = self.proposal()
        r = _stratified(n, generator, antithetic=True)  # stratified over the proposal's quantiles
        upper = mass.cumsum(0)
        upper[-1] = 1.0
        j = torch.searchsorted(upper, r).clamp(max=self.bins - 1)
        lower = upper[j] - mass[j]
        s = ((j + ((r - lower) / mass[j]).clamp(0.0, 1.0)) / self.bins).clamp_min(torch.finfo(torch.float64).tiny)
        log_v = s.log() / self.bin_power  # weight (dv/ds) / q(s), q(s) = bins * mass_j
        weight = self._dv_ds(s) / (self.bins * mass[j])
        return self.t_min + (1 - self.t_min) * log_v.exp(), weight

    def coordinate(self, t: Tensor) -> Tensor:
        """s = v^c of times t: the coordinate the bins are equal in (recomputed from t wherever needed)."""
        v = ((t.to(torch.float64) - self.t_min) / (1 - self.t_min)).clamp(torch.finfo(torch.float64).tiny, 1.0)
        return v ** self.bin_power

    def bin_of(self, t: Tensor) -> Tensor:
        return (self.coordinate(t) * self.bins).long().clamp(0, self.bins - 1)

    # -- statistics ---------------------------------------------------------------------------------------------
    def baseline(self, t: Tensor, t_weight: Tensor) -> Tensor | None:
        """Expected per-sequence loss at each t from earlier steps (t_weight x the bin's mean L), or None while
        some bin has no data. Independent of this step's masks, so it is a valid score-function baseline."""
        if (self.count <= 0).any():
            return None
        mean = self.loss_sum / self.count
        return t_weight.to(torch.float64) * mean.to(t_weight.device)[self.bin_of(t).to(t_weight.device)]

    def observe(self, t: Tensor, per_sequence: Tensor, t_weight: Tensor, token_square: Tensor | None = None,
                group=None) -> None:
        """Fold one step's per-sequence losses into the statistics (no-op unless tracked). Every rank must call it
        once per step (possibly with empty tensors, e.g. non-last pipeline stages): the per-bin sums are reduced
        over `group` (default: all ranks; tensor-parallel copies scale sums and counts alike). `token_square`
        ([b], NelboTerms.token_square) is required by the `token` statistic."""
        if not self.track_statistics:
            return
        t, per_sequence, t_weight = (x.detach().to("cpu", torch.float64) for x in (t, per_sequence, t_weight))
        loss = per_sequence / t_weight  # L(t)
        dv_ds = self._dv_ds(self.coordinate(t))
        if self.statistic == "token":
            if token_square is None:
                raise ValueError("p_pots_statistic=token needs the per-sequence token_square of NelboTerms")
            g2 = token_square.detach().to("cpu", torch.float64) / t_weight.square() * dv_ds.square()
        else:
            g2 = (loss * dv_ds).square()  # g = L(t) c(s): what P-POTS integrates over s
        j = self.bin_of(t)
        stats = torch.zeros(3, self.bins, dtype=torch.float64)
        stats[0].index_add_(0, j, torch.ones_like(loss))
        stats[1].index_add_(0, j, loss)
        stats[2].index_add_(0, j, g2)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            stats = stats.to(backend_device)
            dist.all_reduce(stats, group=group)
            stats = stats.cpu()
        for total, new in zip((self.count, self.loss_sum, self.square_sum), stats):
            total.mul_(self.decay).add_(new)

    def _dv_ds(self, s: Tensor) -> Tensor:
        """dv/ds = (1/c) s^(1/c - 1) of the map v = s^(1/c)."""
        return torch.exp((1 / self.bin_power - 1) * s.log()) / self.bin_power

    def state_dict(self) -> dict:
        return {"t_sampler": self.t_sampler, "count": self.count.clone(), "loss_sum": self.loss_sum.clone(),
                "square_sum": self.square_sum.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["count"].shape != self.count.shape:
            raise ValueError(f"time-sampler state has {state['count'].numel()} bins, the config asks for {self.bins} "
                             f"(objective.p_pots_bins)")
        self.count.copy_(state["count"])
        self.loss_sum.copy_(state["loss_sum"])
        self.square_sum.copy_(state["square_sum"])
