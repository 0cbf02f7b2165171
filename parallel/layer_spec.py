"""The one place that chooses megatron-core layer implementations (local or Transformer Engine).

The denoiser is bidirectional: megatron's GPT specs hard-code a causal mask, so we switch the self-attention
mask type to `padding` and always pass a mask (all False, or document boundaries of packed sequences).
"""

from __future__ import annotations

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec


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
