#!/usr/bin/env bash
# The CPU experiment queues of docs/results.md, started and stopped between sessions: issue 26's required language
# runs (two one-thread queues), then issue 28's scaling grid (both queues drain the one grid: mdm_scale/run_queue.py),
# then the optional language seeds ("3 where the budget allows"). Every run resumes from its newest checkpoint, so
# `start` after `stop` loses nothing.
#
#   bash experiments/queues.sh start    # launch both queues (setsid: they outlive the shell that started them)
#   bash experiments/queues.sh stop     # the queues first (none starts a next run), then each training saves
#                                       # a checkpoint at its next step (SIGUSR1) and exits; waits for that
#   bash experiments/queues.sh pause    # SIGSTOP the trainings (e.g. while the test suite runs); `resume`
#   bash experiments/queues.sh status   # what runs, and the language runs' curves so far
set -euo pipefail
cd "$(dirname "$0")/.."

# The issue's required runs (3 seeds of mdlm and lomdm_paper, one of the others), balanced at ~1.9-4k tokens/s per
# run (CPU runs flush subnormals since the fifth session), and the ablation lomdm_paper_fixed (c2 = 0: the paper's
# recipe without a learned order, experiments/char_lm.py VARIANTS: it says whether lomdm_paper's differences from
# MDLM come from the learned order); after the scaling grid, seeds 1 and 2 of the others. No run is in two lists: a
# queue waits at its end for a run another process holds, and that would idle a core.
REQUIRED_A="mdlm:0 lomdm_paper:0 lomdm_paper:2 mdlm:2 lomdm_paper_fixed:0"
REQUIRED_B="ar:0 lomdm_paper:1 mdlm:1 mdm_ls:0 lomdm:0"
OPTIONAL_A="lomdm:1 ar:1"
OPTIONAL_B="mdm_ls:1 lomdm:2 ar:2 mdm_ls:2"
SCALING="scripts/in_venv.sh python -m mdm_scale.scaling plan --config char_lm --objectives mdlm ar lomdm_paper \
--budgets 3e12 1e13 3e13 --depths 1 2 3 4 5 --shapes 1x32 1x128 --out runs/scaling_char --local \
data.micro_batch_size=8"
TRAINING="launchers/local.py config="

start() {
    if pgrep -f "queues-chain-" > /dev/null; then echo "queues already running (bash $0 status)" >&2; exit 1; fi
    mkdir -p runs/char_lm runs/scaling_char
    for q in a b; do
        local required=$REQUIRED_A optional=$OPTIONAL_A
        [ $q = b ] && required=$REQUIRED_B optional=$OPTIONAL_B
        # $0 of `bash -c` names the chain, so `stop` finds it before it can start its next command
        setsid nohup bash -c "scripts/in_venv.sh python experiments/char_lm.py queue $required; \
$SCALING >> runs/scaling_char/queue_$q.log 2>&1; scripts/in_venv.sh python experiments/char_lm.py queue $optional" \
            "queues-chain-$q" >> "runs/char_lm/queue_$q.log" 2>&1 < /dev/null &
    done
    sleep 1
    pgrep -af "queues-chain-" || { echo "the queues did not start (see runs/char_lm/queue_*.log)" >&2; exit 1; }
}

stop() {
    pkill -f "queues-chain-" || true
    pkill -f "experiments/char_lm.py queue" || true
    pkill -f "mdm_scale.scaling plan" || true
    pkill -CONT -f "$TRAINING" || true
    pkill -USR1 -f "$TRAINING" || true
    for _ in $(seq 600); do  # a lomdm_paper step takes ~10 s on a shared core
        pgrep -f "$TRAINING" > /dev/null || { echo "stopped; every training saved its checkpoint"; return 0; }
        sleep 1
    done
    echo "trainings still running after 600 s:" >&2
    pgrep -af "$TRAINING" >&2
    exit 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    pause) pkill -STOP -f "$TRAINING" && echo paused ;;
    resume) pkill -CONT -f "$TRAINING" && echo resumed ;;
    status)
        pgrep -af "queues-chain-|$TRAINING" || echo "nothing running"
        scripts/in_venv.sh python experiments/char_lm.py progress runs/char_lm ;;
    *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
