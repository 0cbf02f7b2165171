"""Scaling studies as a command: IsoFLOP grids (plan.py), finished runs as points (collect.py), fitted laws (fit.py).

    python -m mdm_scale.scaling plan --config char_lm --budgets 3e13 1e14 3e14 --depths 2 3 4 5 --out runs/scaling
    python -m mdm_scale.scaling fit runs/scaling/*/ --out docs/results/scaling
"""
