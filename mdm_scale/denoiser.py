"""The denoiser: a bidirectional megatron-core transformer over z_t, with SUBS output and scheduler heads.

    tokens z_t [b, l] (mask id = vocab_size) -> vocab-parallel embedding (+ time embedding) -> TransformerBlock
    (rotary, bidirectional, TP/PP-ready) -> final norm -> hidden [b, l, h]
        -> vocab-parallel output head over the real vocabulary only: the mask token is never predicted (SUBS)
        -> scheduler heads (LoMDM): one logit per position from detached hidden states (an MLP, optionally
           after transformer layers of the backbone's spec)

The choice of local vs Transformer Engine layers lives in parallel/layer_spec.py; this file reads the same at
TP = 1 and TP = 8.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from mdm_scale.config import ModelConfig
from mdm_scale.kernels import BACKENDS as KERNEL_BACKENDS
from mdm_scale.kernels.linear_cross_entropy import denoiser_weighted_nll
from parallel.distributed import current_process_groups, group_rank
from parallel.layer_spec import denoiser_block_spec, denoiser_layer_spec, transformer_engine_available
from parallel.sequence_parallel import mark_sequence_parallel

PAD_LOGIT = -1e9
"""Logit given to padded vocabulary columns, so they get zero probability in fp32."""


def padded_size(n: int, tensor_parallel_size: int, multiple: int = 128) -> int:
    """Round a vocabulary size up to a GEMM-friendly multiple that every TP size divides. Unlike Megatron-LM
    (multiple x TP) the padded size does not depend on TP, so checkpoints move between TP layouts as they are."""
    step = math.lcm(multiple, tensor_parallel_size)
    return int(math.ceil(n / step) * step)


def transformer_config(cfg: ModelConfig, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                       on_gpu: bool = False, sequence_parallel: bool = False) -> TransformerConfig:
    """megatron-core TransformerConfig for the denoiser (fusions only where they exist: GPU)."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,  # same full weights for every TP layout and seed
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_sync=on_gpu,
        pipeline_dtype=torch.float32,  # activations sent between stages (autocast keeps parameters fp32)
        **_recompute_settings(cfg.recompute),
    )


def _recompute_settings(recompute: str) -> dict:
    """megatron-core's recomputation fields for model.recompute: full = every block recomputed from its input
    (method uniform, one layer per checkpoint), selective = the attention core only."""
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {}


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t -> MLP -> a vector added at every position (zero-initialised output)."""

    def __init__(self, hidden_size: int, frequencies: int = 128):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: Tensor) -> Tensor:  # [b] -> [b, h]
        freqs = torch.exp(-math.log(10_000) * torch.arange(self.frequencies, device=t.device) / self.frequencies)
        angles = 1000 * t.float()[:, None] * freqs[None, :]  # [b, f]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class SchedulerHead(nn.Module):
    """A scheduler (LoMDM): (detached) backbone features -> optional transformer layers -> a light MLP -> one
    logit per position, plus an optional learned bias per position.

    The bias carries the state-independent part of a schedule (MDM-LS's logits): with rotary attention the
    features hold no absolute position, so without it a LoMDM scheduler could express an order only through the
    content. The layers (the paper's "one transformer layer + MLP") are megatron-core TransformerLayers built
    from the backbone's layer spec, so they shard under TP like the backbone; they run without dropout (the
    pipeline path recomputes the forward scheduler's logits and must get the same values). Zero-initialised
    output and bias: a fresh head gives the same logit everywhere (MDLM's w = 1, or c1 for the normsig family).

    Args:
        hidden_size, head_size: the features' width and the MLP's hidden width.
        max_seq_len: length of the position bias.
        config, layer_spec: the backbone's TransformerConfig and layer spec (needed when layers > 0).
        layers: transformer layers before the MLP (0: the MLP alone).
        position_bias: add the learned per-position bias.
        process_groups: the backbone's process groups, for the layers (None: megatron's parallel_state's).
    """

    def __init__(self, hidden_size: int, head_size: int, max_seq_len: int, *, config: TransformerConfig | None = None,
                 layer_spec=None, layers: int = 0, position_bias: bool = True,
                 process_groups: ProcessGroupCollection | None = None):
        super().__init__()
        if layers:
            config = dataclasses.replace(config, hidden_dropout=0.0, attention_dropout=0.0)
        self.layers = nn.ModuleList(build_module(layer_spec, config=config, layer_number=i + 1,
                                                 pg_collection=process_groups) for i in range(layers))
        self.net = nn.Sequential(nn.Linear(hidden_size, head_size), nn.GELU(), nn.Linear(head_size, 1))
        self.position_bias = nn.Parameter(torch.zeros(max_seq_len)) if position_bias else None
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: Tensor, rotary_pos_emb: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:  # [b, l, h] -> [b, l]
        """rotary_pos_emb and attention_mask ([b, 1, l, l], True = may not attend) feed the layers, as in the
        backbone."""
        if len(self.layers):
            x = hidden.transpose(0, 1)  # [l, b, h], megatron's layout
            for layer in self.layers:
                x, _ = layer(x, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
            hidden = x.transpose(0, 1)  # [b, l, h]
        logits = self.net(hidden).squeeze(-1)
        return logits if self.position_bias is None else logits + self.position_bias[: hidden.shape[1]]


class Denoiser(MegatronModule):
    """Transformer denoiser, bidirectional (or causal over its shifted input: `causal`).

    Args:
        cfg: model sizes.
        vocab_size: real tokens (EOS included); the mask token gets id `vocab_size`.
        max_seq_len: longest sequence (rotary tables are built on the fly, this only bounds inputs).
        scheduler_heads: names of per-position heads to build ("forward_scheduler", "backward_scheduler" for LoMDM).
        scheduler_layers: transformer layers at the start of each scheduler head (0: an MLP head).
        scheduler_position_bias: give each scheduler head a learned bias per position.
        tensor_parallel_size: TP size (to pad the vocabulary evenly).
        pipeline_parallel_size: PP size; with PP > 1 each stage builds its share of the blocks, the first
            stage the embedding and the last stage the final norm, output head and scheduler heads.
        on_gpu: enable fused kernels / Transformer Engine where available.
        kernels: the loss head's kernels, "auto" | "triton" | "torch" (mdm_scale/kernels).
        sequence_parallel: megatron's sequence parallelism inside the blocks (parallel.sequence_parallel); the
            final features are gathered to the full sequence for the heads.
        causal: causal attention over the input shifted one slot right (slot 0 holds the mask id), so output i
            is a function of z_t^(<i) only: the left-to-right denoiser of every slice at once (objective.causal).
        process_groups: megatron-core's process groups (ParallelDims.groups); None = those megatron's
            parallel_state holds now (parallel.distributed.current_process_groups), or one process.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, max_seq_len: int, scheduler_heads: tuple[str, ...] = (),
                 scheduler_layers: int = 0, scheduler_position_bias: bool = True,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, on_gpu: bool = False,
                 causal: bool = False, kernels: str = "auto", sequence_parallel: bool = False,
                 process_groups: ProcessGroupCollection | None = None):
        config = transformer_config(cfg, tensor_parallel_size=tensor_parallel_size,
                                    pipeline_parallel_size=pipeline_parallel_size, on_gpu=on_gpu,
                                    sequence_parallel=sequence_parallel)
        # The heads read gathered, full-sequence features: their layers are plain TP layers.
        head_config = dataclasses.replace(config, sequence_parallel=False) if sequence_parallel else config
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.process_groups = process_groups if process_groups is not None else current_process_groups()
        # megatron's layers get our groups too (None: one process, or its parallel_state's, as before)
        tp_group = self.process_groups.tp if self.process_groups is not None else None
        stage = group_rank(self.process_groups, "pp")
        self.pre_process = pipeline_parallel_size == 1 or stage == 0
        self.post_process = pipeline_parallel_size == 1 or stage == pipeline_parallel_size - 1
        if pipeline_parallel_size > 1 and cfg.tie_embeddings:
            raise ValueError("model.tie_embeddings is not supported with pipeline parallelism yet")
        use_te = on_gpu and cfg.transformer_engine != "off" and transformer_engine_available()
        if cfg.transformer_engine == "on" and not use_te:
            raise RuntimeError("model.transformer_engine=on but Transformer Engine is not usable here (needs GPU)")
        self.vocab_size, self.mask_id, self.max_seq_len = vocab_size, vocab_size, max_seq_len
        # One padded table for input (real tokens + mask) and output; the output's mask and padding columns
        # get PAD_LOGIT, so the two can share weights.
        padded_vocab = padded_size(vocab_size + 1, tensor_parallel_size)
        self.embedding = self.time_embedding = None
        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=padded_vocab, max_sequence_length=max_seq_len, position_embedding_type="rope",
                tp_group=tp_group,
            )
            self.time_embedding = TimeEmbedding(cfg.hidden_size) if cfg.time_conditioning else None
            if sequence_parallel and self.time_embedding is not None:  # added to this rank's positions only
                mark_sequence_parallel(self.time_embedding)
        self.rotary = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                      use_cpu_initialization=True)
        layer_spec = denoiser_layer_spec(use_transformer_engine=use_te, causal=causal)
        self.decoder = TransformerBlock(config, denoiser_block_spec(config, use_transformer_engine=use_te, causal=causal),
                                        pre_process=self.pre_process, post_process=self.post_process,
                                        pg_collection=self.process_groups)
        self.tie_embeddings = cfg.tie_embeddings
        self.output_layer = None
        self.scheduler_heads = nn.ModuleDict()
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                cfg.hidden_size, padded_vocab, config=head_config,
                init_method=config.init_method, bias=False, gather_output=False,
                skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp_group,
            )
            self.scheduler_heads.update({
                name: SchedulerHead(cfg.hidden_size, cfg.scheduler_head_size, max_seq_len, config=head_config,
                                    layer_spec=layer_spec, layers=scheduler_layers,
                                    position_bias=scheduler_position_bias, process_groups=self.process_groups)
                for name in scheduler_heads})
        self.causal = causal
        if kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels={kernels!r}; valid: {', '.join(KERNEL_BACKENDS)}")
        self.kernels = kernels

    def _vocab_slice(self, shard_width: int) -> tuple[int, int]:
        rank = group_rank(self.process_groups, "tp") if self.config.tensor_model_parallel_size > 1 else 0
        return rank * shard_width, (rank + 1) * shard_width

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input from the previous stage (megatron's schedules)."""
        self.decoder.set_input_tensor(input_tensor[0] if isinstance(input_tensor, list) else input_tensor)

    def forward(self, tokens: Tensor, t: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Final-norm features [b, l, h] of z_t (the output head and the scheduler heads read these); on a
        pipeline stage that is not the last, its output activations [l, b, h] for the next stage.

        Args:
        tokens: [b, l] ids in [0, vocab_size] (vocab_size = mask).
        t: [b] times, used only when the model is time-conditioned.
        attention_mask: [b, 1, l, l] bool, True = may not attend (document boundaries); None = full attention.
        """
        b, l = tokens.shape
        if l > self.max_seq_len:
            raise ValueError(f"sequence length {l} exceeds the model's max_seq_len {self.max_seq_len}")
        hidden = None  # later pipeline stages take theirs from set_input_tensor
        if self.causal and attention_mask is not None:  # megatron's causal softmax would drop the causal mask
            raise ValueError("a causal denoiser takes no attention mask (document packing is not supported with "
                             "objective.causal=true)")
        if self.pre_process and self.causal:  # slot i reads z_t^(i-1) (slot 0 the mask id): output i sees z_t^(<i)
            tokens = torch.cat([torch.full_like(tokens[:, :1], self.mask_id), tokens[:, :-1]], dim=1)
        if self.pre_process:
            positions = torch.arange(l, device=tokens.device)[None, :].expand(b, -1)
            hidden = self.embedding(input_ids=tokens, position_ids=positions)  # [l, b, h]
            if self.time_embedding is not None:
                if t is None:
                    raise ValueError("a time-conditioned denoiser needs t")
                hidden = hidden + self.time_embedding(t)[None, :, :].to(hidden.dtype)
        if attention_mask is None and not self.causal:
            attention_mask = torch.zeros(b, 1, l, l, dtype=torch.bool, device=tokens.device)
        hidden = self.decoder(hidden, attention_mask=attention_mask, rotary_pos_emb=self.rotary(l))  # [l, b, h]
        if not self.post_process:
            return hidden  # [l (/ TP with sequence parallelism), b, h] for the next stage
        if self.config.sequence_parallel:  # [l / TP, b, h] -> [l, b, h]; the heads' input gradient is already
            hidden = tensor_parallel.gather_from_sequence_parallel_region(  # summed over TP: split it back
                hidden, tensor_parallel_output_grad=False)
        return hidden.transpose(0, 1)

    def output_logits(self, hidden: Tensor) -> Tensor:
        """[n, h] features (e.g. only the masked positions: the loss needs no others) -> [n, v_shard] logits over
        this TP rank's slice of the padded real vocabulary. The mask id is not a column (SUBS); padded columns
        get PAD_LOGIT so they never carry probability."""
        weight = self.embedding.word_embeddings.weight if self.tie_embeddings else None
        logits, _ = self.output_layer(hidden[:, None, :], weight=weight)  # [n, 1, v_shard] (megatron wants 3-D)
        logits = logits[:, 0, :]
        lo, hi = self._vocab_slice(logits.shape[-1])
        if hi > self.vocab_size:
            pad = torch.arange(lo, hi, device=logits.device) >= self.vocab_size
            logits = logits.masked_fill(pad, PAD_LOGIT)
        return logits

    def vocab_logits(self, hidden: Tensor) -> Tensor:
        """[n, h] features -> [n, vocab_size] logits over the whole real vocabulary, gathered across TP ranks: what
        sampling and analysis read (the loss stays vocab-parallel: `weighted_nll`, `token_nll`)."""
        logits = self.output_logits(hidden)
        if self.config.tensor_model_parallel_size > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.process_groups.tp)
        return logits[:, : self.vocab_size]

    def token_nll(self, logits: Tensor, targets: Tensor) -> Tensor:
        """-log p(target) per row of `output_logits`' [n, v_shard], [n], in fp32, reduced across TP shards."""
        logits = logits.float()
        if self.config.tensor_model_parallel_size > 1:
            return tensor_parallel.vocab_parallel_cross_entropy(logits[:, None, :], targets[:, None])[:, 0]
        return F.cross_entropy(logits, targets, reduction="none")

    def weighted_nll(self, hidden: Tensor, targets: Tensor, row_weight: Tensor) -> tuple[Tensor, Tensor]:
        """sum_i row_weight_i * (-log p(targets_i)) from [n, h] features (the masked positions: SUBS needs no
        others) through the output head, fused and chunked so no [n, V] logits tensor exists at once; vocab-parallel
        under TP. Returns (that sum, with gradients for the features, the head and the row weights; per-row NLL [n],
        detached)."""
        return denoiser_weighted_nll(self, hidden, targets, row_weight, backend=self.kernels)

    def scheduler_logits(self, name: str, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[b, l] logits of scheduler head `name` from features [b, l, h]; gradients stop at the backbone.
        attention_mask: as in `forward` (document boundaries), for heads with transformer layers."""
        head = self.scheduler_heads[name]
        hidden = hidden.detach().float()
        if not len(head.layers):
            return head(hidden)
        b, l = hidden.shape[:2]
        if attention_mask is None and not self.causal:
            attention_mask = torch.zeros(b, 1, l, l, dtype=torch.bool, device=hidden.device)
        return head(hidden, self.rotary(l), attention_mask)


def document_attention_mask(document_ids: Tensor) -> Tensor:
    """[b, l] document index of each position (packed sequences) -> [b, 1, l, l] bool attention mask, True where
    query and key belong to different documents (megatron's convention: True = may not attend)."""
    return (document_ids[:, None, :, None] != document_ids[:, None, None, :])
