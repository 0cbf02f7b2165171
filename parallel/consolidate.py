"""Layout-independent names for checkpointed tensors, and consolidation of a sharded checkpoint into one.

Checkpoints store every tensor under its *global* name (pipeline stages renumber their blocks from 0; we store
`decoder.layers.<global index>`) together with its tensor-parallel partition dimension (-1 = replicated) in the
safetensors header. That is all that is needed to rebuild the full weights of any TP x PP layout offline:

    python -m parallel.consolidate runs/owt_1b/checkpoints/step_00002000 runs/owt_1b/full.safetensors

The optimizer moments are stored the same way (`optimizer-<place>.safetensors`, tensors named `<key>/<global
name>`, e.g. `exp_avg/decoder.layers.3.mlp.linear_fc1.weight`), so `read_tensors` gives any rank of any other
TP x PP layout its slice of the weights and of the moments: that is what resuming on another layout reads.
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


def base_name(name: str) -> str:
    """The global tensor name a stored tensor belongs to: `exp_avg/<name>` -> `<name>` (weights are stored bare)."""
    return name.rsplit("/", 1)[-1]


def saved_shards(checkpoint: str | Path, kind: str = "model") -> dict[int, dict[int, Path]]:
    """{pp: {tp: file}} of the `kind` ("model" or "optimizer") safetensors files, one per TP x PP place."""
    shards: dict[int, dict[int, Path]] = {}
    for path in Path(checkpoint).glob(f"{kind}-*.safetensors"):
        match = re.fullmatch(rf"{kind}-tp(\d+)-pp(\d+)(?:-dp(\d+))?\.safetensors", path.name)
        if match is None:
            raise ValueError(f"{path}: not a {kind} shard of this project's naming ({kind}-tpX-ppY)")
        tp, pp, dp = (int(g or 0) for g in match.groups())  # -dpZ: checkpoints written before one copy per place
        if dp == 0:
            shards.setdefault(pp, {})[tp] = path
    for pp, by_tp in shards.items():
        if sorted(by_tp) != list(range(len(by_tp))):
            raise CheckpointError(f"{checkpoint}: {kind} files of stage {pp} miss tensor-parallel ranks "
                                  f"(have {sorted(by_tp)})")
    return shards


def read_tensors(checkpoint: str | Path, kind: str = "model", wanted: dict[str, int] | None = None,
                 tensor_parallel_rank: int = 0, tensor_parallel_size: int = 1) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint of any TP x PP layout, cut for one rank of a (possibly) different layout.

    Stages are merged by global name; a TP-split tensor is rebuilt from the saved TP ranks (concatenated along
    its partition dimension) and cut into `tensor_parallel_size` equal parts, of which `tensor_parallel_rank`'s
    is returned (one file is read when the TP size did not change). Does not verify checksums (callers do).

    Args:
        kind: "model" (weights) or "optimizer" (per-parameter moments, named `<key>/<global name>`).
        wanted: {global name: TP partition dim in the reading layout}; only tensors of these names are read.
            None reads everything, whole (the consolidated TP = PP = 1 tensors).
    """
    shards = saved_shards(checkpoint, kind)
    out: dict[str, torch.Tensor] = {}
    for pp, by_tp in sorted(shards.items()):
        opened = [safe_open(str(by_tp[r]), framework="pt") for r in sorted(by_tp)]
        dims = json.loads((opened[0].metadata() or {}).get(LAYOUT_KEY, "{}"))
        for name in opened[0].keys():
            base = base_name(name)
            if name in out or (wanted is not None and base not in wanted):
                continue  # replicated over stages (e.g. MDM(LS) position logits): the first stage's copy
            saved_dim = dims.get(base, -1)
            dim = saved_dim if wanted is None else wanted[base]
            if dim != saved_dim and saved_dim >= 0 and dim >= 0:
                raise CheckpointError(f"{checkpoint}: {name} was split along dim {saved_dim}, this layout splits "
                                      f"it along {dim}")
            if saved_dim < 0:
                full = opened[0].get_tensor(name)
            elif len(opened) == tensor_parallel_size and dim == saved_dim:
                out[name] = opened[tensor_parallel_rank].get_tensor(name)
                continue
            else:
                full = torch.cat([f.get_tensor(name) for f in opened], dim=saved_dim)
            if dim < 0 or tensor_parallel_size == 1:
                out[name] = full
                continue
            if full.shape[dim] % tensor_parallel_size:
                raise CheckpointError(f"{checkpoint}: {name} has {full.shape[dim]} entries along dim {dim}, not "
                                      f"divisible by tensor_parallel={tensor_parallel_size}")
            out[name] = full.chunk(tensor_parallel_size, dim=dim)[tensor_parallel_rank].clone()
    return out


@dataclass(frozen=True)
class RankLayout:
    """One rank's view of the tensors it trains: global names, TP partition dims, its TP rank and size.
    `load_checkpoint(..., reshard=RankLayout.of(model))` reads its part of a checkpoint of any layout."""

    partition_dims: dict[str, int]
    tensor_parallel_rank: int = 0
    tensor_parallel_size: int = 1

    @classmethod
    def of(cls, model: nn.Module) -> RankLayout:
        from megatron.core import parallel_state

        layout = model_layout(model)
        return cls({p.global_name: p.partition_dim for p in layout.values()},
                   parallel_state.get_tensor_model_parallel_rank(),
                   parallel_state.get_tensor_model_parallel_world_size())

    def read(self, checkpoint: str | Path, kind: str) -> dict[str, torch.Tensor]:
        return read_tensors(checkpoint, kind, self.partition_dims, self.tensor_parallel_rank,
                            self.tensor_parallel_size)


def consolidate(checkpoint: str | Path, kind: str = "model") -> dict[str, torch.Tensor]:
    """Full (TP = PP = 1) tensors from the shards of a checkpoint (one file per TP x PP place): TP-split
    tensors are concatenated along their partition dimension, stages are merged by name. `kind="optimizer"`
    gives the full per-parameter optimizer moments (`exp_avg/<name>`, ...) of checkpoints that store them.

    Every file is checked against the manifest first (CheckpointError naming the bad file): evaluation, sampling
    and export all read weights through here, so none of them computes with corrupt weights."""
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    full = read_tensors(checkpoint, kind)
    if not full:
        raise FileNotFoundError(f"{checkpoint}: no {kind} shards")
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
