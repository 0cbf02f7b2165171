"""Layout-independent names for checkpointed tensors, and consolidation of a sharded checkpoint into one.

Checkpoints store every tensor under its *global* name (pipeline stages renumber their blocks from 0; we store
`decoder.layers.<global index>`) together with its tensor-parallel partition dimension (-1 = replicated) in the
safetensors header. That is all that is needed to rebuild the full weights of any TP x PP layout offline:

    python -m parallel.consolidate runs/owt_1b/checkpoints/step_00002000 runs/owt_1b/full.safetensors
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from parallel.checkpoint import CheckpointError, verify_checkpoint

LAYOUT_KEY = "tp_partition_dims"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorPlace:
    global_name: str
    partition_dim: int
    """Dimension split across tensor-parallel ranks, -1 when every TP rank holds the whole tensor."""


def model_layout(model: nn.Module) -> dict[str, TensorPlace]:
    """{local state-dict name: TensorPlace} for every tensor of this rank's model."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    layout = {}
    for name in model.state_dict():
        global_name = name
        match = _LAYER.search(name)
        if match:
            layers = modules[name[: match.start(1) - 1]]  # the ModuleList holding this stage's blocks
            number = layers[int(match.group(1))].layer_number - 1
            global_name = name[: match.start(1)] + str(number) + name[match.end(1):]
        param = params.get(name)
        split = param is not None and getattr(param, "tensor_model_parallel", False)
        layout[name] = TensorPlace(global_name, int(param.partition_dim) if split else -1)
    return layout


def to_global(state: dict[str, torch.Tensor], layout: dict[str, TensorPlace]) -> dict[str, torch.Tensor]:
    return {layout[k].global_name: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def to_local(state: dict[str, torch.Tensor], layout: dict[str, TensorPlace]) -> dict[str, torch.Tensor]:
    return {k: state[place.global_name] for k, place in layout.items() if place.global_name in state}


def partition_dims(layout: dict[str, TensorPlace]) -> dict[str, str]:
    """safetensors header metadata recording the TP partition dimension of each global name."""
    return {LAYOUT_KEY: json.dumps({p.global_name: p.partition_dim for p in layout.values()})}


def consolidate(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full (TP = PP = 1) weights from the model shards of a checkpoint (one file per TP x PP place): TP-split
    tensors are concatenated along their partition dimension, stages are merged by name.

    Every file is checked against the manifest first (CheckpointError naming the bad file): evaluation, sampling
    and export all read weights through here, so none of them computes with corrupt weights."""
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    shards: dict[int, dict[int, Path]] = {}  # pp -> tp -> file
    for path in checkpoint.glob("model-*.safetensors"):
        match = re.fullmatch(r"model-tp(\d+)-pp(\d+)(?:-dp(\d+))?\.safetensors", path.name)
        if match is None:
            raise ValueError(f"{path}: not a model shard of this project's naming (model-tpX-ppY)")
        tp, pp, dp = (int(g or 0) for g in match.groups())  # -dpZ: checkpoints written before one copy per place
        if dp == 0:
            shards.setdefault(pp, {})[tp] = path
    if not shards:
        raise FileNotFoundError(f"{checkpoint}: no model shards")
    full: dict[str, torch.Tensor] = {}
    for pp, by_tp in sorted(shards.items()):
        ranks = [by_tp[r] for r in sorted(by_tp)]
        opened = [safe_open(str(p), framework="pt") for p in ranks]
        dims = json.loads(opened[0].metadata()[LAYOUT_KEY])
        for name in opened[0].keys():
            dim = dims.get(name, -1)
            parts = [f.get_tensor(name) for f in opened] if dim >= 0 else [opened[0].get_tensor(name)]
            full[name] = torch.cat(parts, dim=dim) if dim >= 0 else parts[0]
    return full


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m parallel.consolidate CHECKPOINT_DIR OUTPUT_FILE.safetensors", file=sys.stderr)
        return 2
    try:
        full = consolidate(argv[0])
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(argv[1]).parent.mkdir(parents=True, exist_ok=True)
    save_file(full, argv[1])
    print(f"{len(full)} tensors -> {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
