"""Exact order analysis of the synthetic-order runs (issue 5): which generation order is best *for each trained
denoiser*, and where an exact schedule-gradient step from it leads.

The denoisers of experiments/synthetic_order.py ignore t, so for any per-position schedule alpha_i = 1 - t^{w_i}
their NELBO is sum over orders of PL(order; w) x the order's autoregressive loss (Prop. 3.1, docs/objective.md).
With L = 8 the per-position NLL under all 2^L mask patterns is computed once (mean over held-out sequences), and
then exactly, with no Monte Carlo (mdm_scale.exact):

* uniform PL (w = 1: MDLM's order distribution), right-to-left, left-to-right;
* the best fixed order for this denoiser (shortest path through the pattern lattice);
* the PL optimum over w, by gradient descent on the exact NELBO: within the presets' family w in
  [c1, c1 + c2] (`family`) and over unrestricted log w (`free`, sharp orders allowed). This is where MDM-LS's
  schedule would go with exact gradients if the denoiser stood still;
* for MDM-LS runs, the NELBO at the run's own learned w (a check against the trainer's Monte-Carlo eval); for
  LoMDM runs, its own exact NELBO split into the reconstruction part and the velocity-matching term.

    scripts/in_venv.sh python experiments/order_diagnostic.py --run runs/synthetic_order \
        --objectives mdlm mdm_ls right_to_left ar --seeds 0 1 2          # docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_order as so  # noqa: E402
from common import limit_threads, load_trained, run_config  # noqa: E402


def heldout_sequences(s: so.Settings, n: int) -> np.ndarray:
    """The first n held-out sequences of the run's data (regenerated exactly as synthetic_order.py does)."""
    g = so.make_table(s.num_symbols, s.data_seed, s.task)
    rng = np.random.default_rng(s.data_seed + 1)
    kw = {"noise": s.noise, "rng": rng, "task": s.task, "source_skew": s.source_skew}
    so.generate(s.num_train, s.seq_len, g, **kw)
    return so.generate(s.num_heldout, s.seq_len, g, **kw)[:n] + so.FIRST_SYMBOL


def pattern_nlls(denoiser, x: np.ndarray, backward: bool = False):
    """Per-position NLL under every mask pattern [n, 2^L, L] (rows as mdm_scale.exact.all_patterns) and, with
    `backward`, LoMDM's backward-scheduler logits on the same patterns."""
    import torch

    from mdm_scale.exact import all_patterns, pattern_nll_batch

    with torch.no_grad():
        return pattern_nll_batch(denoiser, torch.as_tensor(x.astype(np.int64)), all_patterns(x.shape[1]),
                                 scheduler_head="backward_scheduler" if backward else None)


def optimal_exponents(nll, parameterise, seq_len: int, steps: int = 300, lr: float = 0.1):
    """Minimise the exact PL NELBO over free logits v (w = parameterise(v)) from v = 0 (the uniform order);
    returns the best (value, w) visited."""
    import torch

    from mdm_scale.exact import plackett_luce_nelbo

    v = torch.zeros(seq_len, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([v], lr=lr)
    best = (math.inf, None)
    for _ in range(steps + 1):
        opt.zero_grad()
        w = parameterise(v)
        value = plackett_luce_nelbo(w, nll)
        best = min(best, (value.item(), w.detach().numpy().copy()), key=lambda b: b[0])
        value.backward()
        opt.step()
    return best


def analyse(spec: str, seed: int, run: Path, s: so.Settings, x: np.ndarray, optimizer_steps: int = 300) -> dict:
    import torch

    from mdm_scale.exact import best_order, fixed_order_nelbo, plackett_luce_nelbo
    from mdm_scale.schedules.base import normalized_exponents

    safe = spec.replace(":", "-")
    cfg = run_config(so.objective_overrides(spec, s), data_dir=run / "data", run_dir=run / "runs" / f"{safe}-s{seed}",
                     name=f"diagnostic-{safe}-s{seed}", seed=seed, s=s)
    denoiser, schedule = load_trained(cfg, Path(cfg.run_dir) / "checkpoints")
    if getattr(denoiser, "time_embedding", None) is not None:
        raise ValueError("the order analysis needs a denoiser that ignores t (model.time_conditioning=false)")
    kind = cfg.objective.schedule.kind
    per_sequence, backward = pattern_nlls(denoiser, x, backward=kind == "lomdm")
    nll = per_sequence.double().mean(0)
    l = s.seq_len
    per_token = 1.0 / l
    order, best = best_order(nll)
    c1 = cfg.objective.schedule.min_exponent
    family_value, family_w = optimal_exponents(
        nll, lambda v: normalized_exponents(v, c1, s.exponent_range), l, optimizer_steps)
    free_value, free_w = optimal_exponents(nll, lambda v: (v - v.mean()).exp(), l, optimizer_steps)
    record = {
        "objective": spec, "seed": seed, "sequences": len(x),
        "uniform_pl": plackett_luce_nelbo(torch.ones(l), nll).item() * per_token,
        "right_to_left": fixed_order_nelbo(range(l - 1, -1, -1), nll) * per_token,
        "left_to_right": fixed_order_nelbo(range(l), nll) * per_token,
        "best_order": [int(i) + 1 for i in order], "best_order_nelbo": best * per_token,
        "family_optimum": family_value * per_token, "family_w": family_w.tolist(),
        "free_optimum": free_value * per_token, "free_log_w": np.log(free_w).tolist(),
        "spearman_position_family_w": so.spearman(np.arange(l), family_w),
    }
    if kind == "lomdm":  # its own NELBO, split: where does LoMDM lose to MDLM?
        x0 = torch.as_tensor(x.astype(np.int64))
        with torch.no_grad():
            total = so.lomdm_exact_nelbo(denoiser, schedule, x0, per_sequence, backward)
            reconstruction = so.lomdm_exact_nelbo(denoiser, schedule, x0, per_sequence, backward,
                                                  reconstruction_only=True)
        record["own_w_nelbo"] = total * per_token
        record["own_w_reconstruction"] = reconstruction * per_token
        record["own_w_velocity"] = (total - reconstruction) * per_token
    if kind == "mdm_ls":
        with torch.no_grad():
            own = schedule.exponents(l).double()
        record["own_w"] = own.numpy().tolist()
        record["own_w_nelbo"] = plackett_luce_nelbo(own, nll).item() * per_token
    return record


def markdown_table(records: list[dict]) -> str:
    lines = ["| denoiser (seed) | uniform PL | right-to-left | left-to-right | best order (positions) | best order "
             "NELBO | PL optimum, family | PL optimum, free | own learned w |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        own = f"{r['own_w_nelbo']:.4f}" if "own_w_nelbo" in r else "-"
        if "own_w_velocity" in r:
            own += f" ({r['own_w_reconstruction']:.4f} + velocity {r['own_w_velocity']:.4f})"
        lines.append(f"| {r['objective']} ({r['seed']}) | {r['uniform_pl']:.4f} | {r['right_to_left']:.4f} | "
                     f"{r['left_to_right']:.4f} | {' '.join(map(str, r['best_order']))} | "
                     f"{r['best_order_nelbo']:.4f} | {r['family_optimum']:.4f} | {r['free_optimum']:.4f} | {own} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an experiments/synthetic_order.py --out directory")
    parser.add_argument("--objectives", nargs="+", default=["mdlm", "mdm_ls", "right_to_left", "ar"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sequences", type=int, default=512, help="held-out sequences averaged over (default: all)")
    parser.add_argument("--optimizer-steps", type=int, default=300, help="Adam steps of each PL optimum")
    parser.add_argument("--out", default=None, help="JSON file (default RUN/order_diagnostic.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    limit_threads(1)
    run = Path(args.run)
    s = so.Settings()
    for key, value in json.loads((run / "report.json").read_text())["settings"].items():
        setattr(s, key, value)
    if s.seq_len > 12:
        raise ValueError(f"the exact analysis enumerates 2^L patterns; L = {s.seq_len} is too long")
    start = time.time()
    x = heldout_sequences(s, args.sequences)
    records = [analyse(spec, seed, run, s, x, args.optimizer_steps) for spec in args.objectives for seed in args.seeds]
    report = {"run": str(run), "settings": vars(s), "records": records, "wall_s": time.time() - start,
              "table": markdown_table(records)}
    out = Path(args.out) if args.out else run / "order_diagnostic.json"
    out.write_text(json.dumps(report, indent=1))
    print(report["table"])
    print(f"[order_diagnostic] {time.time() - start:.0f} s; {out}")
    return report


if __name__ == "__main__":
    main()
