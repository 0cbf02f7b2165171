"""The one place that imports mosaicml-streaming (`MDSWriter`, `StreamingDataset`, `reader_from_json`).

Why this module exists: `import streaming` always imports its vision datasets, which import torchvision. PyPI's
torchvision wheels are CUDA builds; beside the CPU torch we use in CI (torch==2.13.0+cpu) importing them fails with
`RuntimeError: operator torchvision::nms does not exist` (and they break other libraries that probe torchvision,
such as transformers, so scripts/in_venv.sh uninstalls the wheel). We never use streaming's vision code, so
(STACK.md, "Installing", option (a)) on exactly that error, or on torchvision missing, we drop the half-imported `torchvision*` modules from
`sys.modules`, register a minimal stand-in `torchvision` providing only the names streaming's vision module
imports at import time (`datasets.VisionDataset`, `transforms.functional.to_tensor`), and import streaming again.
On machines with a working torchvision (GPU images) the first import succeeds and the stand-in is never installed.
The stand-in is marked with `STANDIN_ATTR` so callers/tests can tell which path was taken.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

STANDIN_ATTR = "__mdm_scale_standin__"


def _is_torchvision_op_error(err: BaseException) -> bool:
    """The CUDA torchvision wheel beside CPU torch, or no torchvision at all (our CPU venv removes the broken wheel
    so that other libraries, e.g. transformers, do not trip over it either)."""
    if isinstance(err, ModuleNotFoundError):
        return (err.name or "").split(".")[0] == "torchvision"
    return isinstance(err, RuntimeError) and "torchvision::" in str(err)


def _drop_modules(prefixes: tuple[str, ...]) -> None:
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


def _install_torchvision_standin() -> None:
    """Registers `torchvision`, `torchvision.datasets`, `torchvision.transforms(.functional)` stand-ins."""

    def module(name: str, is_package: bool = True) -> types.ModuleType:
        mod = types.ModuleType(name)
        # importlib.util.find_spec (used by some libraries to probe for torchvision) requires a __spec__.
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=is_package)
        if is_package:
            mod.__path__ = []
        setattr(mod, STANDIN_ATTR, True)
        sys.modules[name] = mod
        return mod

    class VisionDataset:  # only subclassed by streaming.vision; never instantiated by mdm_scale
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("torchvision stand-in: streaming's vision datasets are unavailable on this "
                               "CPU-torch install (see data_pipeline/streaming_compat.py)")

    def to_tensor(pic):
        raise RuntimeError("torchvision stand-in: to_tensor is unavailable (see data_pipeline/streaming_compat.py)")

    tv = module("torchvision")
    tv.__version__ = "0.0.0+mdm_scale_standin"
    datasets = module("torchvision.datasets")
    datasets.VisionDataset = VisionDataset
    transforms = module("torchvision.transforms")
    functional = module("torchvision.transforms.functional", is_package=False)
    functional.to_tensor = to_tensor
    tv.datasets, tv.transforms, transforms.functional = datasets, transforms, functional


def _import_streaming() -> types.ModuleType:
    try:
        return importlib.import_module("streaming")
    except (RuntimeError, ModuleNotFoundError) as err:
        if not _is_torchvision_op_error(err):
            raise
        _drop_modules(("torchvision", "streaming"))
        _install_torchvision_standin()
        return importlib.import_module("streaming")


streaming = _import_streaming()
USING_TORCHVISION_STANDIN = bool(getattr(sys.modules.get("torchvision"), STANDIN_ATTR, False))

from streaming import MDSWriter, StreamingDataset  # noqa: E402
from streaming.base.format import reader_from_json  # noqa: E402
from streaming.base.storage import CloudDownloader  # noqa: E402

download_file = CloudDownloader.direct_download
"""download_file(remote, local, timeout): one file from any remote streaming supports (s3://, gs://, oci://,
azure://, hf://, sftp://, dbfs:/, or a filesystem path) to a local path."""

__all__ = ["MDSWriter", "StreamingDataset", "download_file", "reader_from_json", "streaming", "USING_TORCHVISION_STANDIN"]
