"""Export: a TP=2 LoMDM checkpoint -> safetensors + config.json + modeling file; transformers (trust_remote_code)
and the plain-PyTorch loader reproduce the training model's logits (1e-5, fp32)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.parallel import workers
from tests.spawn import run_ranks

OVERRIDES = ["train.steps=2", "parallel.tensor_parallel=2", "objective=lomdm", "model.time_conditioning=true",
             "objective.schedule.scheduler_layers=1"]  # the schedulers' TP-sharded transformer layer is exported too


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mdm_scale.export import export

    run_dir = tmp_path_factory.mktemp("tp2") / "run"
    ranks = run_ranks(2, workers.train_run, [*OVERRIDES, f"run_dir={run_dir}", "data.micro_batch_size=4",
                                             f"data.cache_dir={run_dir.parent / 'cache'}"])
    checkpoint = run_dir / "checkpoints" / f"step_{2:08d}"
    assert {p.name for p in checkpoint.glob("model-*.safetensors")} == {"model-tp0-pp0.safetensors",
                                                                         "model-tp1-pp0.safetensors"}
    out = export(checkpoint, run_dir.parent / "exported")
    return checkpoint, out, ranks


def _training_model(checkpoint):
    """The training denoiser (megatron-core, TP=1) holding the checkpoint's consolidated weights."""
    from mdm_scale.export import run_config_of
    from mdm_scale.model import build_model
    from parallel.consolidate import consolidate, model_layout, to_local
    from parallel.distributed import init_distributed

    cfg = run_config_of(checkpoint)
    cfg.parallel.tensor_parallel = 1
    model = build_model(cfg, 257, init_distributed(device="cpu", seed=0))
    model.load_state_dict(to_local(consolidate(checkpoint), model_layout(model)))
    return model["denoiser"].eval()


def _inputs(vocab: int = 257, b: int = 3, l: int = 16):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (b, l), generator=g)
    tokens[torch.rand(b, l, generator=g) < 0.5] = vocab  # masked positions
    return tokens, torch.rand(b, generator=g)


def _reference(checkpoint, tokens, t):
    denoiser = _training_model(checkpoint)
    with torch.no_grad():
        hidden = denoiser(tokens, t)
        logits = denoiser.output_logits(hidden.reshape(-1, hidden.shape[-1]))[:, : denoiser.vocab_size]
        backward = denoiser.scheduler_logits("backward_scheduler", hidden)
    return logits.view(*tokens.shape, -1), backward


def test_export_writes_a_complete_serving_directory(dims, exported):
    checkpoint, out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_mdm.py", "mdm_tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["mask_token_id"], config["padded_vocab_size"]) == (257, 257, 384)
    assert config["scheduler_heads"] == ["backward_scheduler", "forward_scheduler"]
    assert config["time_conditioning"] and config["objective"]["schedule"]["kind"] == "lomdm"
    assert (config["scheduler_layers"], config["scheduler_position_bias"]) == (1, True)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".exported.tmp")]
    from mdm_scale.export import export

    with pytest.raises(FileExistsError):
        export(checkpoint, out)


def test_plain_loader_reproduces_the_training_logits_from_a_tp2_checkpoint(dims, exported):
    checkpoint, out, _ = exported
    sys.path.insert(0, str(out))
    try:
        import modeling_mdm
    finally:
        sys.path.remove(str(out))
    model = modeling_mdm.load_plain(out)
    assert not any(name.startswith("megatron") for name in sys.modules if name.startswith("modeling_mdm"))
    tokens, t = _inputs()
    expected, backward = _reference(checkpoint, tokens, t)
    with torch.no_grad():
        logits = model.logits(tokens, t)
        heads = model.scheduler_logits("backward_scheduler", model(tokens, t))
    assert expected.abs().max() > 0.1  # trained, non-trivial logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads, backward, rtol=1e-5, atol=1e-5)


def test_transformers_automodel_with_remote_code_reproduces_the_training_logits(dims, exported, monkeypatch):
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint, out, _ = exported
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    tokens, t = _inputs()
    expected, _ = _reference(checkpoint, tokens, t)
    with torch.no_grad():
        logits = model(input_ids=tokens, t=t).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_changed_weights_change_the_logits(dims, exported, tmp_path):
    """The comparison above can fail: a perturbed export no longer matches."""
    from safetensors.torch import load_file, save_file

    checkpoint, out, _ = exported
    sys.path.insert(0, str(out))
    try:
        import modeling_mdm
    finally:
        sys.path.remove(str(out))
    state = load_file(str(out / "model.safetensors"))
    state["denoiser.layers.0.linear_qkv.weight"][0, 0] += 0.5
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "modeling_mdm.py"):
        (broken / f).write_text((out / f).read_text())
    save_file(state, str(broken / "model.safetensors"))
    tokens, t = _inputs()
    expected, _ = _reference(checkpoint, tokens, t)
    with torch.no_grad():
        logits = modeling_mdm.load_plain(broken).logits(tokens, t)
    assert not torch.allclose(logits, expected, rtol=1e-5, atol=1e-5)
