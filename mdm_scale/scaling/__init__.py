"""Scaling studies as a command: IsoFLOP grids (plan.py), finished runs as points (collect.py, points.py), fitted
laws (isoflop.py: approach 2; parametric.py: approach 3; frontier.py: compute-optimal frontier and multipliers),
and their report (report.py: fit.json; plots.py: fit.png).

    python -m mdm_scale.scaling plan --config char_lm --budgets 3e13 1e14 3e14 --depths 2 3 4 5 [--shapes 1x128] \\
        --out runs/scaling
    python -m mdm_scale.scaling fit runs/scaling/*/ --out docs/results/scaling
"""
