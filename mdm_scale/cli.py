"""Command-line entry points turn expected errors into one line on stderr and exit code 2; bugs keep their
traceback.

    @expected_errors
    def main(argv) -> int: ...
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from data_pipeline.shard_check import ShardError
from mdm_scale.config import ConfigError
from mdm_scale.objective import BatchError
from mdm_scale.run_directory import RunDirError
from parallel.checkpoint import CheckpointError

EXPECTED_ERRORS = (ConfigError, CheckpointError, RunDirError, ShardError, BatchError, FileNotFoundError,
                   FileExistsError)
"""Bad input, a bad file or a run directory in use: the user can act on the message alone."""


def expected_errors(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            kind = "config error" if isinstance(e, ConfigError) else "error"
            print(f"{kind}: {e}", file=sys.stderr, flush=True)
            return 2

    return guarded
