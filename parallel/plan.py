"""What every rank of a layout will hold, before anything is submitted: `launchers/slurm.py --plan`.

    python launchers/slurm.py --nodes 16 --plan config=owt_1b

Parameters are exact: the model is built once, full size (TP = PP = 1, the vocabulary padded as the TP size
pads it), on the meta device (no memory, no initialisation) through `mdm_scale.model.build_model`, the function
training uses. megatron-core 0.16's TransformerBlock reads its process groups from `parallel_state` even at
TP = 1, so the build runs inside a private one-process gloo group (an in-memory store, no port), torn down
afterwards; no rank of the planned layout is simulated. A rank's share follows from each tensor's TP partition
dimension (`parallel.consolidate.model_layout`, the same record checkpoints store): split tensors contribute
numel / TP (megatron splits evenly, so all TP ranks are equal), replicated ones their whole numel; pipeline stage
p holds blocks [p L/PP, (p+1) L/PP) (megatron's uniform split), the first stage also the embeddings, the last the
final norm, output head and scheduler heads, every stage the schedule's own parameters. tests/parallel/
test_plan.py checks the counts against built models at TP = 1 and against real TP = 2 and PP = 2 shards.

Bytes per rank (P = this rank's parameters, D = DP size), from what parallel/engine.py really keeps:
  weights    4 P: fp32 parameters (bf16 autocast on GPU keeps fp32 weights, and a bf16 copy of each weight for
             the step: + 2 P)
  gradients  fp32 .grad, 4 P; ZeRO 1 adds DeepSpeed's fp32 gradient partition of the update (4 P / D); ZeRO 2
             keeps only partitions (4 P / D reduced + 4 P / D fp32 for the update)
  optimizer  torch AdamW (one process, or ZeRO 0): exp_avg + exp_avg_sq = 8 P. ZeRO 1/2: DeepSpeed's fp32
             master partition + the two moments of it = 12 P / D (it copies fp32 parameters too)
  buffers    the gradient-reduction bucket when D > 1: DeepSpeed's reduce_bucket_size default, 5e8 elements
             fp32 = 2 GB allocated on a GPU (ZeRO 1/2; engine.py does not lower it); on CPU only its touched
             part, 4 min(P, 5e8)
  activations  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", per
             block at 16-bit: s b h (34 + 5 a s / h) bytes; with TP t: s b h (10 + 24 / t + 5 a s / (h t));
             with sequence parallelism s b h (34 + 5 a s / h) / t; selective recomputation (megatron's
             core_attn) drops the a s / h term; full recomputation keeps each block's input and one block's
             working set. Adapted to this denoiser (`activation_bytes`): no dropout masks at dropout 0 (34 -> 32,
             5 -> 2), the residual stream is fp32 under autocast (the norms' saved inputs are 4-byte), fused
             attention (Transformer Engine) keeps no s x s term, everything is 4-byte on CPU (no autocast), plus
             the final features, the loss head's masked rows and LoMDM's clean features and scheduler heads;
             a pipeline stage p holds min(PP - p, micro-batches) micro-batches in flight (1F1B).
  checkpoint data-parallel rank 0 of each TP x PP place writes its weights (4 P) and the per-parameter moments
             (8 P, parallel/checkpoint.py: once per place, layout-independent); every rank its small trainer file
  communication  parallel/comm.py, per optimizer step.
Not modelled: the CUDA context and allocator fragmentation (GPU), the Python / torch / megatron / DeepSpeed
runtime (CPU: bench/scaling.py measures it and adds it), NCCL buffers, checkpoint-time host copies.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field

import torch

from parallel.comm import StepBytes, step_bytes

GIB = 2 ** 30
REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default `reduce_bucket_size` (elements); parallel/engine.py's config does not set it."""
TRAINER_FILE_BYTES = 1 << 20
"""A rank's trainer-*.pt (RNG states, step, data position): well under this bound."""
RECOMPUTE = ("none", "selective", "full")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Layout:
    nodes: int
    tasks_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    zero_stage: int
    gpu: bool

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def data_parallel(self) -> int:
        return self.world // (self.tensor_parallel * self.pipeline_parallel)


@dataclass
class RankPlan:
    """One distinct rank: a pipeline stage (all its TP ranks hold the same sizes; DP ranks are copies)."""

    stage: int
    params: int
    layers: int
    micro_batches_in_flight: int
    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: dict[tuple[str, bool], float] = field(default_factory=dict)
    """{(recompute, sequence_parallel): bytes} for every variant; `configured` picks the run's."""
    configured: tuple[str, bool] = ("none", False)
    checkpoint_dp0: float = 0.0
    checkpoint_other: float = 0.0
    comm: StepBytes | None = None

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations[self.configured]


@contextlib.contextmanager
def _one_process_group():
    """megatron's parallel_state at TP = PP = 1 on a private in-memory gloo group, unless one exists already."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def full_model(cfg, vocab_size: int) -> torch.nn.Module:
    """The whole model (TP = PP = 1 shapes, vocabulary padded for cfg's TP size) on the meta device, built by the
    training code's `build_model`."""
    from mdm_scale.model import build_model
    from parallel.distributed import ParallelDims

    cfg = copy.deepcopy(cfg)
    cfg.parallel.pipeline_parallel = 1
    meta = torch.device("meta")
    with _one_process_group(), meta:
        return build_model(cfg, vocab_size, ParallelDims(1, 0, 0, cfg.parallel.tensor_parallel, 1, meta))


def stage_params(model: torch.nn.Module, tensor_parallel: int, pipeline_parallel: int,
                 num_layers: int) -> list[int]:
    """Parameters of one TP rank of each pipeline stage, from the full model's partition dimensions."""
    from parallel.consolidate import model_layout

    layout = model_layout(model)
    per_stage = num_layers // pipeline_parallel
    counts = [0] * pipeline_parallel
    for name, param in model.named_parameters():
        place = layout[name]
        n = param.numel()
        if place.partition_dim >= 0:
            if param.shape[place.partition_dim] % tensor_parallel:
                raise ValueError(f"{name}: {tuple(param.shape)} not divisible by TP {tensor_parallel} along "
                                 f"dim {place.partition_dim}")
            n //= tensor_parallel
        layer = _LAYER.search(place.global_name)
        if name.startswith("denoiser.") and layer:
            stages = [int(layer.group(1)) // per_stage]
        elif name.startswith(("denoiser.embedding.", "denoiser.time_embedding.")):
            stages = [0]
        elif name.startswith("denoiser."):  # final norm, output head, scheduler heads
            stages = [pipeline_parallel - 1]
        else:  # the schedule's parameters (MDM(LS) logits): every stage holds them
            stages = range(pipeline_parallel)
        for s in stages:
            counts[s] += n
    return counts


def block_activation_bytes(*, s: int, b: int, h: int, a: int, t: int, recompute: str, sequence_parallel: bool,
                           dropout: bool, fused_attention: bool, gpu: bool) -> tuple[float, float]:
    """(bytes kept per block until its backward, bytes of one block's full working set) on one TP rank.

    Korthikanti et al.'s s b h (34 + 5 a s / h) at 16-bit, split into the terms TP shards (24: Q, K, V, the
    projection's input, GeLU's input and output) and the ones it replicates (10: the QKV and FC1 inputs 2 + 2,
    the two norms' inputs 2 + 2, two dropout masks 1 + 1), with what differs here: no masks at dropout 0; the
    norms' inputs are the fp32 residual stream under autocast (4 + 4 bytes, not 2 + 2); 4 bytes everywhere on
    CPU; the s x s term 5 a s / h (softmax output 2, dropout mask 1, dropout output 2) is 2 a s / h without
    dropout and 0 with fused attention. Sequence parallelism shards the replicated terms too.
    """
    scale = 1 if gpu else 2  # CPU trains in fp32: every 2-byte activation is 4 bytes
    replicated = (4 + (2 if dropout else 0)) * scale + 8  # + the two norms' inputs, 4-byte in both cases
    sharded = 24 * scale
    attention = 0.0 if fused_attention else (5 if dropout else 2) * scale * a * s / h
    if sequence_parallel:
        working = s * b * h * ((replicated + sharded) / t + attention / t)
    else:
        working = s * b * h * (replicated + sharded / t + attention / t)
    if recompute == "selective":
        return working - s * b * h * attention / t, working
    if recompute == "full":  # the block's input only (fp32 residual stream), sharded over TP by SP
        return 4 * s * b * h / (t if sequence_parallel else 1), working
    return working, working


def activation_bytes(cfg, *, tp: int, stage: int, pp: int, micro_batches: int, recompute: str,
                     sequence_parallel: bool, gpu: bool) -> tuple[float, int]:
    """(peak activation bytes of one rank of pipeline stage `stage`, micro-batches it holds in flight)."""
    m, s, b = cfg.model, cfg.data.seq_len, cfg.data.micro_batch_size
    h, a, layers = m.hidden_size, m.num_attention_heads, m.num_layers // pp
    fused = gpu and m.transformer_engine == "on"
    kept, working = block_activation_bytes(s=s, b=b, h=h, a=a, t=tp, recompute=recompute,
                                           sequence_parallel=sequence_parallel and tp > 1,
                                           dropout=m.dropout > 0, fused_attention=fused, gpu=gpu)
    in_flight = min(pp - stage, micro_batches) if pp > 1 else 1
    total = in_flight * layers * kept + (working if recompute == "full" else 0.0)
    if stage == pp - 1:  # last stage: final norm input, gathered features, masked rows for the head
        half = 2 if gpu else 4
        total += 4 * s * b * h / (tp if sequence_parallel and tp > 1 else 1) + 4 * s * b * h + half * s * b * h
        heads = 2 if _needs_clean_features(cfg) else 0
        if heads:  # LoMDM: clean features kept for the step + two scheduler heads with gradients
            sched_layers = cfg.objective.schedule.scheduler_layers
            head_kept, _ = block_activation_bytes(s=s, b=b, h=h, a=a, t=tp, recompute=recompute if recompute
                                                  == "selective" else "none", sequence_parallel=False,
                                                  dropout=False, fused_attention=fused, gpu=gpu)
            mlp = s * b * (4 * h + half * h + 2 * half * m.scheduler_head_size)  # fp32 input, its cast, GeLU
            total += 4 * s * b * h + heads * (sched_layers * head_kept + mlp)
    return total, in_flight


def _needs_clean_features(cfg) -> bool:
    from mdm_scale.schedules import build_schedule

    with torch.device("meta"):
        return build_schedule(cfg.objective.schedule, max_seq_len=cfg.data.seq_len).needs_clean_features


def plan(cfg, layout: Layout, vocab_size: int) -> list[RankPlan]:
    """One RankPlan per pipeline stage of `layout` for run config `cfg`."""
    tp, pp, dp, zero = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel, layout.zero_stage
    counts = stage_params(full_model(cfg, vocab_size), tp, pp, cfg.model.num_layers)
    micro = cfg.data.grad_accumulation
    clean = _needs_clean_features(cfg)
    configured = (cfg.model.recompute, bool(cfg.parallel.sequence_parallel and tp > 1))
    ranks = []
    for stage, p in enumerate(counts):
        weights = 4 * p + (2 * p if layout.gpu else 0)
        if zero == 0:
            gradients, optimizer = 4 * p, 8 * p
        else:
            gradients = (4 * p if zero == 1 else 4 * p / dp) + 4 * p / dp
            optimizer = 12 * p / dp
        distributed = layout.world > 1 or zero > 0
        if not distributed:
            buffers = 0.0
        elif layout.gpu and zero > 0:
            buffers = 4.0 * REDUCE_BUCKET_ELEMENTS
        else:
            buffers = 4.0 * min(p, REDUCE_BUCKET_ELEMENTS)
        rank = RankPlan(stage, p, cfg.model.num_layers // pp, 0, weights, gradients, optimizer, buffers,
                        configured=configured)
        for recompute in RECOMPUTE:
            for sp in (False, True):
                rank.activations[(recompute, sp)], rank.micro_batches_in_flight = activation_bytes(
                    cfg, tp=tp, stage=stage, pp=pp, micro_batches=micro, recompute=recompute,
                    sequence_parallel=sp, gpu=layout.gpu)
        rank.checkpoint_dp0 = 12 * p + TRAINER_FILE_BYTES
        rank.checkpoint_other = TRAINER_FILE_BYTES
        rank.comm = step_bytes(params=p, tp=tp, pp=pp, dp=dp, layers=cfg.model.num_layers,
                               seq_len=cfg.data.seq_len, micro_batch=cfg.data.micro_batch_size,
                               hidden=cfg.model.hidden_size, micro_batches=micro, clean_forward=clean,
                               sequence_parallel=configured[1])
        ranks.append(rank)
    return ranks


def node_totals(ranks: list[RankPlan], layout: Layout) -> list[float]:
    """Bytes per node: megatron orders ranks TP fastest, then DP, then PP, and a node holds consecutive ranks."""
    tp, dp = layout.tensor_parallel, layout.data_parallel
    return [sum(ranks[r // (tp * dp)].total for r in range(n * layout.tasks_per_node,
                                                           (n + 1) * layout.tasks_per_node))
            for n in range(layout.nodes)]


def format_plan(cfg, layout: Layout, ranks: list[RankPlan]) -> str:
    """The plan as markdown tables: per distinct rank, the activation variants, and the totals."""
    g = lambda x: f"{x / GIB:.2f}"  # noqa: E731
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    recompute, sp = ranks[0].configured
    device = "GPU, bf16 autocast" if layout.gpu else "CPU, fp32"
    attention = ("fused (Transformer Engine: no s x s term)" if layout.gpu and cfg.model.transformer_engine == "on"
                 else "megatron's local attention (s x s scores kept; model.transformer_engine=on drops them)")
    lines = [
        f"# plan: {cfg.name}, objective schedule {cfg.objective.schedule.kind}, {layout.nodes} node(s) x "
        f"{layout.tasks_per_node} ranks = TP {tp} x PP {pp} x DP {dp}, ZeRO {layout.zero_stage}, {device}",
        f"# micro-batch {cfg.data.micro_batch_size} x seq {cfg.data.seq_len}, {cfg.data.grad_accumulation} "
        f"micro-batch(es) per step; recompute={recompute}, sequence_parallel={sp}; attention: {attention}",
        "# GiB per rank; ranks of one row are the TP ranks of that stage (equal shards) and their DP copies",
        "",
        "| ranks | params | weights | grads | optimizer | buffers | activations | total | ckpt dp0 / other "
        "| comm per step DP / TP / PP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ranks:
        c = r.comm
        lines.append(
            f"| tp 0-{tp - 1} pp {r.stage} | {r.params / 1e6:,.1f} M | {g(r.weights)} | {g(r.gradients)} | "
            f"{g(r.optimizer)} | {g(r.buffers)} | {g(r.activations[r.configured])} | **{g(r.total)}** | "
            f"{g(r.checkpoint_dp0)} / {g(r.checkpoint_other)} | {g(c.dp)} / {g(c.tp)} / {g(c.pp)} |")
    lines += ["", "Activations (GiB per rank) by model.recompute x parallel.sequence_parallel:", "",
              "| ranks | in flight | " + " | ".join(f"{rc}{', SP' if s else ''}" for rc in RECOMPUTE
                                                    for s in (False, True)) + " |",
              "|---|---|" + "---|" * 6]
    for r in ranks:
        lines.append(f"| tp 0-{tp - 1} pp {r.stage} | {r.micro_batches_in_flight} | "
                     + " | ".join(g(r.activations[(rc, s)]) for rc in RECOMPUTE for s in (False, True)) + " |")
    nodes = node_totals(ranks, layout)
    per_rank = [ranks[r // (tp * dp)] for r in range(layout.world)]
    ckpt = sum(r.checkpoint_dp0 if (i // tp) % dp == 0 else r.checkpoint_other for i, r in enumerate(per_rank))
    comm = sum(r.comm.total for r in per_rank)
    lines += ["", f"total: largest node {g(max(nodes))} GiB ({layout.tasks_per_node} ranks), job "
                  f"{g(sum(nodes))} GiB over {layout.world} ranks; checkpoint {g(ckpt)} GiB per save; "
                  f"{g(comm)} GiB sent per optimizer step (all ranks)"]
    return "\n".join(lines)


def print_plan(cfg, layout: Layout) -> str:
    from data_pipeline.tokenizer import load_tokenizer

    return format_plan(cfg, layout, plan(cfg, layout, load_tokenizer(cfg.data.tokenizer).vocab_size))
