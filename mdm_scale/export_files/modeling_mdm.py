"""A masked-diffusion denoiser exported by mdm_scale, in plain PyTorch (no megatron-core), plus transformers wrappers.

    from modeling_mdm import load_plain                      # serving without transformers
    model = load_plain("exported/")                          # MdmDenoiserCore in eval mode
    logits = model.logits(tokens)                            # [b, l, vocab_size]; tokens may hold mask_token_id

    from transformers import AutoModel                       # or through transformers
    model = AutoModel.from_pretrained("exported/", trust_remote_code=True)
    logits = model(input_ids=tokens).logits

The network is the training denoiser exactly: token embedding (the mask token is id vocab_size) + optional time
embedding, pre-LayerNorm transformer blocks with bidirectional attention and rotary position embeddings
(non-interleaved halves, base 10000), GELU MLP, final LayerNorm, linear head over the real vocabulary (SUBS: the
mask token is never predicted). Fused QKV weights keep megatron's layout: per head [q, k, v], each head_dim rows.
This file is copied verbatim by `python -m mdm_scale.export` and must stay self-contained.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.linear_qkv = nn.Linear(hidden, 3 * hidden)
        self.linear_proj = nn.Linear(hidden, hidden)
        self.pre_mlp_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.linear_fc1 = nn.Linear(hidden, ffn)
        self.linear_fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention_mask: Tensor | None) -> Tensor:
        b, l, h = x.shape
        d = h // self.heads
        qkv = self.linear_qkv(self.input_layernorm(x)).view(b, l, self.heads, 3 * d)
        q, k, v = (z.transpose(1, 2) for z in qkv.split(d, dim=-1))  # [b, heads, l, d]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if attention_mask is not None:  # True = may not attend (megatron's convention and fill value)
            scores = scores.masked_fill(attention_mask, -10000.0)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, l, h)
        x = x + self.linear_proj(attn)
        return x + self.linear_fc2(F.gelu(self.linear_fc1(self.pre_mlp_layernorm(x))))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SchedulerHead(nn.Module):
    """LoMDM's scheduler head: optional transformer blocks (as the backbone's), an MLP on the features, and an
    optional learned bias per position; one logit per position."""

    def __init__(self, hidden: int, head_size: int, max_positions: int, *, layers: int = 0, heads: int = 1,
                 ffn: int = 0, eps: float = 1e-5, position_bias: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, heads, ffn, eps) for _ in range(layers))
        self.net = nn.Sequential(nn.Linear(hidden, head_size), nn.GELU(), nn.Linear(head_size, 1))
        self.position_bias = nn.Parameter(torch.zeros(max_positions)) if position_bias else None

    def forward(self, hidden: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:  # [b, l, h] -> [b, l]
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attention_mask)
        logits = self.net(hidden).squeeze(-1)
        return logits if self.position_bias is None else logits + self.position_bias[: hidden.shape[1]]


class MdmDenoiserCore(nn.Module):
    """The denoiser from its config.json dict."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        h, self.vocab_size = config["hidden_size"], config["vocab_size"]
        self.mask_token_id = config["mask_token_id"]
        self.word_embeddings = nn.Embedding(config["padded_vocab_size"], h)
        self.time_embedding = None
        if config["time_conditioning"]:
            f = config["time_frequencies"]
            self.time_embedding = nn.Sequential(nn.Linear(2 * f, h), nn.SiLU(), nn.Linear(h, h))
        self.layers = nn.ModuleList(Block(h, config["num_attention_heads"], config["ffn_hidden_size"],
                                          config["layernorm_epsilon"]) for _ in range(config["num_layers"]))
        self.final_layernorm = nn.LayerNorm(h, eps=config["layernorm_epsilon"])
        self.output_layer = None if config["tie_embeddings"] else nn.Linear(h, config["padded_vocab_size"], bias=False)
        self.scheduler_heads = nn.ModuleDict({  # exports before scheduler layers existed lack the last two keys
            name: SchedulerHead(h, config["scheduler_head_size"], config["max_position_embeddings"],
                                layers=config.get("scheduler_layers", 0), heads=config["num_attention_heads"],
                                ffn=config["ffn_hidden_size"], eps=config["layernorm_epsilon"],
                                position_bias=config.get("scheduler_position_bias", True))
            for name in config["scheduler_heads"]})

    def _time_features(self, t: Tensor) -> Tensor:
        f = self.config["time_frequencies"]
        freqs = torch.exp(-math.log(10_000) * torch.arange(f, device=t.device) / f)
        angles = 1000 * t.float()[:, None] * freqs[None, :]
        return self.time_embedding(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def forward(self, tokens: Tensor, t: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """[b, l] ids (mask_token_id where masked) -> final-norm features [b, l, h].

        Args:
            t: [b] diffusion times (only time-conditioned models use them).
            attention_mask: [b, 1, l, l] bool, True where a query may not attend to a key (document boundaries).
        """
        b, l = tokens.shape
        x = self.word_embeddings(tokens)
        if self.time_embedding is not None:
            if t is None:
                raise ValueError("this model is time-conditioned: pass t")
            x = x + self._time_features(t)[:, None, :].to(x.dtype)
        cos, sin = self._rotary(l, x)
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask)
        return self.final_layernorm(x)

    def _rotary(self, l: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin [l, head_dim] of the rotary embedding (non-interleaved halves)."""
        d = self.config["hidden_size"] // self.config["num_attention_heads"]
        inv = 1.0 / (self.config["rotary_base"] ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                                  device=like.device) / d))
        angles = torch.outer(torch.arange(l, device=like.device, dtype=torch.float32), inv)
        emb = torch.cat([angles, angles], dim=-1)  # [l, d]
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)

    def logits(self, tokens: Tensor, t: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """[b, l, vocab_size] logits over the real vocabulary (the mask token is not a class)."""
        hidden = self.forward(tokens, t, attention_mask)
        weight = self.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        return hidden @ weight[: self.vocab_size].t()

    def scheduler_logits(self, name: str, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[b, l] logits of a scheduler head (LoMDM's forward/backward schedulers) from features [b, l, h];
        attention_mask as in `forward`, for heads with transformer blocks."""
        hidden = hidden.float()
        cos, sin = self._rotary(hidden.shape[1], hidden)
        return self.scheduler_heads[name](hidden, cos, sin, attention_mask)


def load_plain(directory: str | os.PathLike, device: str | torch.device = "cpu") -> MdmDenoiserCore:
    """config.json + model.safetensors -> MdmDenoiserCore (eval mode), with no transformers or megatron needed."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    model = MdmDenoiserCore(config)
    state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device))
    model.load_state_dict({k.removeprefix("denoiser."): v for k, v in state.items()}, strict=True)
    return model.to(device).eval()


try:  # transformers wrappers (AutoConfig / AutoModel with trust_remote_code=True)
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import MaskedLMOutput
except ImportError:  # serving with load_plain only
    PretrainedConfig = PreTrainedModel = None

if PreTrainedModel is not None:

    class MdmConfig(PretrainedConfig):
        model_type = "mdm_scale_denoiser"

    class MdmDenoiser(PreTrainedModel):
        config_class = MdmConfig
        base_model_prefix = "denoiser"

        def __init__(self, config: MdmConfig) -> None:
            super().__init__(config)
            keys = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                    "padded_vocab_size", "mask_token_id", "layernorm_epsilon", "rotary_base", "tie_embeddings",
                    "time_conditioning", "time_frequencies", "scheduler_heads", "scheduler_head_size",
                    "max_position_embeddings")
            optional = {"scheduler_layers": 0, "scheduler_position_bias": True}  # absent from older exports
            self.denoiser = MdmDenoiserCore({**{k: getattr(config, k) for k in keys},
                                             **{k: getattr(config, k, v) for k, v in optional.items()}})

        def _init_weights(self, module: nn.Module) -> None:  # weights always come from the checkpoint
            pass

        def forward(self, input_ids: Tensor, t: Tensor | None = None, attention_mask: Tensor | None = None,
                    **kwargs) -> MaskedLMOutput:
            hidden = self.denoiser(input_ids, t, attention_mask)
            weight = (self.denoiser.word_embeddings.weight if self.denoiser.output_layer is None
                      else self.denoiser.output_layer.weight)
            return MaskedLMOutput(logits=hidden @ weight[: self.denoiser.vocab_size].t(), hidden_states=(hidden,))
