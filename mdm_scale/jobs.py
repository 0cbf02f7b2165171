"""What one launched process runs, shared by launchers/local.py (torchrun) and launchers/slurm.py (submitit).

`TrainJob` is the callable submitit pickles and every SLURM task runs. It follows submitit's checkpointing
protocol: on SIGUSR1 (sent by SLURM before the time limit or on preemption, or by `scancel --signal=USR1`) all
ranks finish their step, write a checkpoint and stop (mdm_scale/preemption.py); then submitit's own handler asks
`checkpoint()` for the resubmission, requeues the job and exits. The requeued job runs the same `TrainJob`, which
resumes from the newest complete checkpoint in its run directory (`checkpoint.resume`).
"""

from __future__ import annotations

import os
import sys

from mdm_scale.config import RunConfig

DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def run(cfg: RunConfig) -> dict:
    """Train `cfg` in this process (distributed settings come from the environment); stops cleanly on SIGUSR1."""
    import torch

    from mdm_scale.preemption import StopRequest
    from mdm_scale.train import train

    stop = StopRequest().install()
    result = train(cfg, stop=stop)
    if torch.distributed.is_initialized():  # a clean shutdown: gloo/NCCL threads must not race the exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"step": result.step, "losses": result.losses, "evals": result.evals, "checkpoint": result.checkpoint,
            "stopped_by_signal": result.stopped, "signal": stop.signum, "previous_handlers": stop.previous}


class TrainJob:
    """A picklable training job: `TrainJob(cfg)()` on every task of a SLURM job."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> dict:
        import submitit

        # RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (first node), MASTER_PORT (from the job id),
        # derived from this job's SLURM variables; values sbatch copied from the submitting shell do not apply.
        for key in DISTRIBUTED_ENV:
            os.environ.pop(key, None)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        outcome = run(self.cfg)
        handlers = outcome.pop("previous_handlers")
        if outcome["stopped_by_signal"]:
            submitit_handler = handlers.get(outcome["signal"])
            if callable(submitit_handler):  # rank 0: checkpoint() -> requeue -> exit; other ranks: returns
                submitit_handler(outcome["signal"], None)
            sys.exit(-1)  # not a result: the requeued job produces it
        return outcome

    def checkpoint(self, *args, **kwargs):
        """submitit's protocol: what to run when the job is requeued (the same job; it resumes from disk)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg))

    def __repr__(self) -> str:
        return f"TrainJob(name={self.cfg.name!r}, run_dir={self.cfg.run_dir!r})"
