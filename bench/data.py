"""Data pipeline throughput, measured side by side in one run (issue 3):

    scripts/in_venv.sh python bench/data.py

1. preprocessing: the embedded corpus (Wikipedia + KJV + Shakespeare) as JSONL -> GPT-2 tokens -> MDS shards,
   tokens/s with 1 and 2 tokenizer workers;
2. loader vs trainer: batches/s the shard reader delivers (0 and 2 DataLoader workers) against the batches/s the
   training step of `tiny` and `owt_small` consumes on this machine (forward + backward + AdamW on one
   micro-batch; owt_small with micro-batch 1, scaled to its configured micro-batch). The loader must never be
   the bottleneck: the printed ratio loader/trainer should stay far above 1.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from data_pipeline.corpus import load_documents  # noqa: E402
from data_pipeline.datasets import open_split  # noqa: E402
from data_pipeline.preprocess import preprocess  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer  # noqa: E402


def preprocessing(tmp: Path) -> list[tuple[str, float]]:
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in load_documents("mixture"):
            f.write(json.dumps({"text": doc}) + "\n")
    rows = []
    for workers in (1, 2):
        start = time.perf_counter()
        stats = preprocess([corpus], tmp / f"shards{workers}", seq_len=128, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        rows.append((f"preprocess, {workers} worker(s)", sum(stats.tokens.values()) / seconds))
    return rows


def loader_rate(root: Path, seq_len: int, batch_size: int, workers: int, n: int = 200) -> float:
    reader = open_split(root, "train", load_tokenizer("gpt2"), seq_len=seq_len, batch_size=batch_size, seed=0,
                        num_workers=workers)
    next(reader)  # start-up (workers fork) is not throughput
    start = time.perf_counter()
    for _ in itertools.islice(reader, n):
        pass
    return n / (time.perf_counter() - start)


def trainer_rate(config: str, micro_batch: int, seq_len: int, steps: int = 3) -> float:
    from mdm_scale.config import load_config
    from mdm_scale.objective import training_nelbo
    from mdm_scale.model import build_model
    from parallel.distributed import init_distributed

    dims = init_distributed(device="cpu")
    cfg = load_config(config, [f"data.seq_len={seq_len}"])
    model = build_model(cfg, 50257, dims)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 50257, (micro_batch, seq_len))
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        training_nelbo(model["denoiser"], model["schedule"], x, cfg.objective, g).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return 1 / min(times[1:])


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU" if not torch.cuda.is_available()
          else f"machine: {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = preprocessing(Path(tmp))
        print("\n| stage | tokens/s |\n|---|---|")
        for name, rate in rows:
            print(f"| {name} | {rate:,.0f} |")
        root = Path(tmp) / "shards2"
        print("\n| config | micro-batch x seq | trainer batches/s | loader batches/s (0 / 2 workers) | ratio |")
        print("|---|---|---|---|---|")
        for config, micro, full_micro, seq in (("tiny", 16, 16, 128), ("owt_small", 1, 32, 1024)):
            if seq != 128:  # the bench corpus was packed at 128: re-pack for this length
                preprocess([Path(tmp) / "corpus.jsonl"], Path(tmp) / f"shards{seq}", seq_len=seq, progress=False)
                root_for = Path(tmp) / f"shards{seq}"
            else:
                root_for = root
            trainer = trainer_rate(config, micro, seq) * micro / full_micro
            loader = [loader_rate(root_for, seq, full_micro, w) for w in (0, 2)]
            print(f"| {config} | {full_micro} x {seq} | {trainer:.3f} | {loader[0]:,.0f} / {loader[1]:,.0f} | "
                  f"{min(loader) / trainer:,.0f}x |")


if __name__ == "__main__":
    main()
