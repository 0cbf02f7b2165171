"""Export a training checkpoint (any TP / PP / ZeRO layout) to a serving directory:

    python -m mdm_scale.export runs/owt_small/checkpoints/step_00100000 exported/owt_small

    exported/owt_small/
        config.json            sizes, vocabulary, mask token, schedule; auto_map for transformers
        model.safetensors      the denoiser's full (consolidated) weights, megatron-free names
        schedule.safetensors   learned schedule parameters (MDM-LS position logits), when the schedule has any
        modeling_mdm.py        self-contained PyTorch model + transformers wrappers (mdm_scale/export_files/)
        mdm_tokenizer.json     tokenizer name, fingerprint, EOS and mask ids
        vocab.json, merges.txt, tokenizer_config.json   GPT-2 BPE files (for AutoTokenizer), when gpt2

`AutoModel.from_pretrained(dir, trust_remote_code=True)` and `modeling_mdm.load_plain(dir)` both rebuild the
denoiser; their logits equal the training model's (tests/mdm_scale/test_export.py, from a TP=2 checkpoint).
The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.tokenizer import Gpt2Tokenizer, gpt2_data_dir, load_tokenizer
from mdm_scale.cli import expected_errors
from mdm_scale.config import RunConfig
from mdm_scale.model import load_for_inference, run_config_of  # noqa: F401 (load_for_inference: re-export)
from parallel.consolidate import consolidate

MODELING_FILE = Path(__file__).parent / "export_files" / "modeling_mdm.py"
TIME_FREQUENCIES = 128  # mdm_scale.denoiser.TimeEmbedding's default

# Training names (consolidated, global) -> exported names; `None` drops the tensor (megatron's _extra_state).
_RENAMES = [
    (r"denoiser\.embedding\.word_embeddings\.weight", "word_embeddings.weight"),
    (r"denoiser\.time_embedding\.mlp\.(\d)\.(weight|bias)", r"time_embedding.\1.\2"),
    (r"denoiser\.decoder\.layers\.(\d+)\.(input_layernorm|pre_mlp_layernorm)\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"denoiser\.decoder\.layers\.(\d+)\.self_attention\.(linear_qkv|linear_proj)\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"denoiser\.decoder\.layers\.(\d+)\.mlp\.(linear_fc1|linear_fc2)\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"denoiser\.decoder\.final_layernorm\.(weight|bias)", r"final_layernorm.\1"),
    (r"denoiser\.output_layer\.weight", "output_layer.weight"),
    (r"denoiser\.scheduler_heads\.(\w+)\.layers\.(\d+)\.(input_layernorm|pre_mlp_layernorm)\.(weight|bias)",
     r"scheduler_heads.\1.layers.\2.\3.\4"),
    (r"denoiser\.scheduler_heads\.(\w+)\.layers\.(\d+)\.self_attention\.(linear_qkv|linear_proj)\.(weight|bias)",
     r"scheduler_heads.\1.layers.\2.\3.\4"),
    (r"denoiser\.scheduler_heads\.(\w+)\.layers\.(\d+)\.mlp\.(linear_fc1|linear_fc2)\.(weight|bias)",
     r"scheduler_heads.\1.layers.\2.\3.\4"),
    (r"denoiser\.scheduler_heads\.(\w+)\.net\.(\d)\.(weight|bias)", r"scheduler_heads.\1.net.\2.\3"),
    (r"denoiser\.scheduler_heads\.(\w+)\.position_bias", r"scheduler_heads.\1.position_bias"),
    (r".*\._extra_state", None),
]


def export_name(name: str) -> str | None:
    """The exported (plain-PyTorch) name of a consolidated training tensor; None = not exported."""
    for pattern, target in _RENAMES:
        if re.fullmatch(pattern, name):
            return None if target is None else re.sub(pattern, target, name)
    raise ValueError(f"no export name for training tensor {name!r}")


def export(checkpoint: str | Path, out_dir: str | Path, *, cfg: RunConfig | None = None,
           overwrite: bool = False) -> Path:
    """Write the serving directory for `checkpoint` (verified first) into `out_dir`; returns `out_dir`."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite)")
    cfg = cfg or run_config_of(checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    weights, schedule = {}, {}
    for name, tensor in consolidate(checkpoint).items():
        if name.startswith("schedule."):
            schedule[name] = tensor.contiguous()
        elif (target := export_name(name)) is not None:
            weights[f"denoiser.{target}"] = tensor.contiguous()
    model = cfg.model
    heads = sorted({re.match(r"denoiser\.scheduler_heads\.(\w+)\.", k).group(1)
                    for k in weights if k.startswith("denoiser.scheduler_heads.")})
    config = {
        "model_type": "mdm_scale_denoiser",
        "architectures": ["MdmDenoiser"],
        "auto_map": {"AutoConfig": "modeling_mdm.MdmConfig", "AutoModel": "modeling_mdm.MdmDenoiser"},
        "hidden_size": model.hidden_size,
        "num_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "ffn_hidden_size": model.ffn_hidden_size or 4 * model.hidden_size,
        "vocab_size": tokenizer.vocab_size,
        "padded_vocab_size": int(weights["denoiser.word_embeddings.weight"].shape[0]),
        "mask_token_id": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_id,
        "layernorm_epsilon": 1e-5,
        "rotary_base": 10000,
        "tie_embeddings": model.tie_embeddings,
        "time_conditioning": model.time_conditioning,
        "time_frequencies": TIME_FREQUENCIES,
        "scheduler_heads": heads,
        "scheduler_head_size": model.scheduler_head_size,
        "scheduler_layers": cfg.objective.schedule.scheduler_layers if heads else 0,
        "scheduler_position_bias": cfg.objective.schedule.scheduler_position_bias,
        "max_position_embeddings": cfg.data.seq_len,
        "objective": asdict(cfg.objective),
        "tokenizer": cfg.data.tokenizer,
        "source_checkpoint": str(checkpoint.resolve()),
        "torch_dtype": "float32",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if schedule:
            save_file(schedule, str(tmp / "schedule.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        shutil.copy(MODELING_FILE, tmp / "modeling_mdm.py")
        (tmp / "mdm_tokenizer.json").write_text(json.dumps(
            {"name": cfg.data.tokenizer, "fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
             "eos_id": tokenizer.eos_id, "mask_id": tokenizer.vocab_size}, indent=1))
        if isinstance(tokenizer, Gpt2Tokenizer):
            shutil.copy(gpt2_data_dir() / "encoder.json", tmp / "vocab.json")
            shutil.copy(gpt2_data_dir() / "vocab.bpe", tmp / "merges.txt")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": cfg.data.seq_len,
                 "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@expected_errors
def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mdm_scale.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory (runs/<name>/checkpoints/step_N)")
    parser.add_argument("out", help="the directory to write")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"exported {args.checkpoint} -> {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main(sys.argv[1:]))
