"""The core reads in one pass: no import cycle among the modules of mdm_scale/, counting imports inside functions
(a function-level import is how a cycle hides)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mdm_scale"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: modules of the package it imports anywhere in its file}."""
    modules = {module_name(p): p for p in package.rglob("*.py") if "export_files" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    colour, stack = {m: 0 for m in graph}, []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if colour[n] == 1:
                return stack[stack.index(n):] + [n]
            if colour[n] == 0 and (cycle := visit(n)):
                return cycle
        colour[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_mdm_scale_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def parallel_state_reads(root: Path) -> list[str]:
    """'path:line' of every use of megatron's parallel_state (an import of it, or an attribute read) in root."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [node.value.id]
            if any(n == "parallel_state" or n.endswith(".parallel_state") for n in names):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_process_groups_travel_in_parallel_dims_outside_parallel(tmp_path):
    """Outside parallel/ nothing reads megatron's parallel_state: ranks and groups come from ParallelDims or the
    denoiser's process_groups (issue 27). The scan is checked on a planted read first, so it can fail."""
    planted = tmp_path / "pkg"
    planted.mkdir()
    (planted / "m.py").write_text("from megatron.core import parallel_state\n"
                                  "r = parallel_state.get_tensor_model_parallel_rank()\n")
    assert parallel_state_reads(planted) == ["pkg/m.py:1", "pkg/m.py:2"]
    root = PACKAGE.parent
    reads = [r for d in ("mdm_scale", "bench", "experiments", "launchers", "data_pipeline")
             for r in parallel_state_reads(root / d)]
    assert reads == []


def test_megatron_layers_get_the_denoisers_process_groups(dims):
    """The groups in ParallelDims reach megatron-core's own layers (the block, every transformer layer, the
    scheduler heads' layers, the embedding and the output layer), not only our code: megatron would otherwise
    build its own collection from parallel_state (a different object)."""
    from mdm_scale.config import load_config
    from mdm_scale.model import build_model

    cfg = load_config("tiny", ["objective=lomdm_paper", "model.num_layers=2", "model.hidden_size=64",
                               "model.num_attention_heads=2", "model.scheduler_head_size=16", "data.tokenizer=byte"])
    denoiser = build_model(cfg, 257, dims)["denoiser"]
    groups = denoiser.process_groups
    assert groups is dims.groups
    layers = [*denoiser.decoder.layers, *(layer for head in denoiser.scheduler_heads.values() for layer in head.layers)]
    assert len(layers) == 4 and denoiser.decoder.pg_collection is groups
    assert all(layer.pg_collection is groups for layer in layers)
    assert denoiser.embedding.tp_group is groups.tp and denoiser.output_layer.tp_group is groups.tp
