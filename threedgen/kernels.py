"""gsplat's and nerfacc's CUDA kernels: are they usable here, and build them once.

Neither library ships compiled kernels on PyPI: each compiles its CUDA sources with ``nvcc`` on
first use (JIT, into torch's extension folder) and, where there is no CUDA toolkit, leaves its
kernel module ``None``, so the first kernel call fails. threedgen therefore loads them up front,
once per process, and a run that would use them falls back to the device-agnostic PyTorch paths
(the PyTorch rasteriser, the dense NeRF sampler) when they do not load, saying so once on stderr
and in ``status.json``.

Two processes that build the same extension at once delete each other's build folder (each
library empties it when no compiled module is there yet): :func:`load` builds under a file lock
beside the build folder, and the web UI loads both before its workers start.

On a machine without CUDA nothing is imported or built (the toolkit may be there while torch is
a CPU build, and a build would fail slowly).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from threedgen.errors import UserError

# extension -> (the module that builds/loads it, torch's extension name, a prebuilt module)
EXTENSIONS = {
    "gsplat": ("gsplat.cuda._backend", "gsplat_cuda", "gsplat.csrc"),
    "nerfacc": ("nerfacc.cuda._backend", "nerfacc_cuda", "nerfacc.csrc"),
}
# What each extension gives a run, and what it falls back to without it.
USES = {"gsplat": ("the gsplat rasteriser", "the PyTorch rasteriser"),
        "nerfacc": ("nerfacc's occupancy-grid sampler", "the dense sampler")}


@dataclass
class KernelStatus:
    name: str
    # "built" (loaded, or compiled and cached), "buildable" (a toolkit is there, not built yet),
    # "unavailable" (no CUDA, no toolkit, or the build failed), "prebuilt" (installed compiled)
    status: str
    detail: str
    build_seconds: Optional[float] = None

    @property
    def usable(self) -> bool:
        return self.status in ("built", "prebuilt")

    def as_dict(self) -> dict:
        return asdict(self)


_LOADED: dict[str, KernelStatus] = {}
_WARNED: set[str] = set()


def extensions_root() -> Path:
    from torch.utils.cpp_extension import (
        get_default_build_root,  # slow (setuptools): only when a CUDA kernel is looked for
    )

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build_folder(name: str) -> Path:
    """torch's build folder for an extension (the root, then a python/CUDA-version folder).

    torch has no public name for this folder: this module is the one place that uses the private
    ``torch.utils.cpp_extension._get_build_directory`` (torch pinned below 2.14 in pyproject.toml;
    ``tests/test_cuda_path.py::test_torch_build_folder_helper_is_where_we_expect`` fails when it moves)."""
    from torch.utils.cpp_extension import (
        _get_build_directory,  # slow (setuptools): only when a CUDA kernel is looked for
    )

    with contextlib.redirect_stdout(sys.stderr):
        return Path(_get_build_directory(EXTENSIONS[name][1], verbose=False))


def nvcc() -> Optional[str]:
    """The CUDA compiler torch would build with, or None."""
    from torch.utils.cpp_extension import CUDA_HOME  # slow (setuptools): only when a CUDA kernel is looked for

    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").is_file():
        return str(Path(CUDA_HOME, "bin", "nvcc"))
    return shutil.which("nvcc")


@contextlib.contextmanager
def build_lock(name: str):
    """An exclusive lock (``flock``) on ``<extensions root>/threedgen-<name>.lock``: one process
    builds an extension at a time; the others wait, then load what it built."""
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # POSIX only: the lock is skipped where it does not exist
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(root / f"threedgen-{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_backend(module_name: str):
    """Import a library's kernel module: this loads, or compiles then loads, its kernels."""
    return importlib.import_module(module_name)


def probe(name: str) -> KernelStatus:
    """What :func:`load` would find, without building anything."""
    if name in _LOADED:
        return _LOADED[name]
    if not torch.cuda.is_available():
        return KernelStatus(name, "unavailable", "no CUDA device")
    if importlib.util.find_spec(EXTENSIONS[name][2]) is not None:
        return KernelStatus(name, "prebuilt", f"installed compiled ({EXTENSIONS[name][2]})")
    compiled = build_folder(name) / f"{EXTENSIONS[name][1]}.so"
    if compiled.is_file():
        return KernelStatus(name, "built", f"compiled earlier ({compiled})")
    compiler = nvcc()
    if compiler is None:
        return KernelStatus(name, "unavailable", "no CUDA toolkit (nvcc) to build them")
    return KernelStatus(name, "buildable", f"not built yet; nvcc at {compiler} (the first run builds them)")


def load(name: str) -> KernelStatus:
    """Load (building once, under :func:`build_lock`, if needed) an extension's kernels; the result
    is kept for the process. Never raises: a failed build is an ``unavailable`` status."""
    if name in _LOADED:
        return _LOADED[name]
    if not torch.cuda.is_available():
        status = KernelStatus(name, "unavailable", "no CUDA device")
    else:
        module_name = EXTENSIONS[name][0]
        started = time.time()
        try:
            with build_lock(name), contextlib.redirect_stdout(sys.stderr):
                module = _import_backend(module_name)
            seconds = round(time.time() - started, 2)
            if getattr(module, "_C", None) is None:
                status = KernelStatus(name, "unavailable", "no CUDA toolkit (nvcc) to build them", seconds)
            else:
                status = KernelStatus(name, "built", "loaded", seconds)
        except Exception as exc:  # a compiler error, an ABI mismatch, a missing header...
            sys.modules.pop(module_name, None)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            status = KernelStatus(name, "unavailable", f"build failed: {type(exc).__name__}: {first}",
                                  round(time.time() - started, 2))
    _LOADED[name] = status
    return status


def usable(name: str) -> bool:
    """Whether the extension's kernels load here (building them on first use)."""
    return load(name).usable


def fall_back(name: str) -> str:
    """Say once per process, on stderr, that a run uses the PyTorch path instead of ``name``'s
    kernels, and why; returns that sentence (for ``status.json``)."""
    status = load(name)
    use, instead = USES[name]
    line = f"{name}'s CUDA kernels are unavailable ({status.detail}); using {instead} instead of {use} (slower)"
    if name not in _WARNED:
        _WARNED.add(name)
        print(f"threedgen: {line}", file=sys.stderr, flush=True)
    return line


def choose(extension: str, key: str, requested: str, kernel_value: str, fallback_value: str,
           device) -> tuple[str, list[str]]:
    """(value, fallback notes) of a setting ``representation.<key>`` whose ``kernel_value`` needs
    ``extension``'s CUDA kernels and whose ``fallback_value`` is plain PyTorch on any device:
    ``auto`` takes the kernels on CUDA when they load (or build) here, else the fallback, said
    once on stderr; asking for the kernels where they cannot run is a one-line error."""

    cuda = torch.device(device).type == "cuda"
    if requested == fallback_value or (requested == "auto" and not cuda):
        return fallback_value, []
    setting = f"representation.{key}={kernel_value}"
    if not cuda:
        raise UserError(f"{setting} needs CUDA ({USES[extension][0]}); use {key}={fallback_value} on CPU")
    if usable(extension):
        return kernel_value, []
    if requested == kernel_value:
        raise UserError(f"{setting}: {extension}'s CUDA kernels are unavailable ({load(extension).detail}); "
                        f"use representation.{key}=auto or {fallback_value}")
    return fallback_value, [fall_back(extension)]


def prepare(names=tuple(EXTENSIONS), log=None) -> dict[str, KernelStatus]:
    """Load every extension now (the web UI does this before its workers start, so that jobs
    starting together never build at once)."""
    result = {}
    for name in names:
        if log is not None and probe(name).status == "buildable":
            log(f"threedgen: building {name}'s CUDA kernels once (a few minutes the first time)")
        result[name] = load(name)
    return result


def forget() -> None:
    """Drop what this process has learnt (tests)."""
    _LOADED.clear()
    _WARNED.clear()
