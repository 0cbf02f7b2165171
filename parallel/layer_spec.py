"""The one place that chooses megatron-core layer implementations (local or Transformer Engine).

The denoiser is bidirectional: megatron's GPT specs hard-code a causal mask, so we switch the self-attention
mask type to `padding` and always pass a mask (all False, or document boundaries of packed sequences).

Sequence parallelism on the local spec: megatron-core's torch norm wrapper refuses it (only its Apex and TE norms
support it), so `denoiser_block_spec` puts `SequenceParallelLayerNorm` in the norms' places.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def denoiser_layer_spec(*, use_transformer_engine: bool, causal: bool = False) -> ModuleSpec:
    """Layer spec for one transformer block of the denoiser.

    Args:
        use_transformer_engine: TE fused layers (GPU) instead of megatron-core's local torch layers.
        causal: causal self-attention (only for reference models and tests; the denoiser is bidirectional).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    spec = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec() if use_transformer_engine
            else gpt_layer_specs.get_gpt_layer_local_spec())
    # padding = an explicit [b, 1, l, l] mask: all False for full attention, or document boundaries.
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.causal if causal else AttnMaskType.padding
    return spec


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with megatron's norm signature for sequence parallelism. Each TP rank normalises its own
    l / TP positions, so its weight and bias gradients are partial sums over the sequence: the `sequence_parallel`
    attribute marks them for the all-reduce over the TP group before the step (parallel/sequence_parallel.py), as
    megatron marks its fused norms' parameters."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        if config.normalization != "LayerNorm":
            raise ValueError(f"sequence parallelism on the local spec supports LayerNorm, not {config.normalization}")
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            param.sequence_parallel = True


def denoiser_block_spec(config: TransformerConfig, *, use_transformer_engine: bool,
                        causal: bool = False) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder's spec: the layer spec, or with sequence parallelism on the local spec, this stage's layers
    and final norm with `SequenceParallelLayerNorm` in every norm's place."""
    layer = denoiser_layer_spec(use_transformer_engine=use_transformer_engine, causal=causal)
    if use_transformer_engine or not config.sequence_parallel:
        return layer
    layer.submodules.input_layernorm = SequenceParallelLayerNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelLayerNorm)
