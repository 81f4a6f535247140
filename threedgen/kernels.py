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

A build is tried once. Under that lock, :func:`load` records it in ``threedgen-<name>.build.json``
beside the build folder: ``building`` before it starts, removed when it loads, ``failed`` with the
error when it raises. A later process that finds ``building`` knows that build was killed (the lock
is free, so nobody is building) and, as for ``failed``, reports ``unavailable`` at once rather than
compiling for minutes again, until the library, torch, nvcc or ``TORCH_CUDA_ARCH_LIST`` changes or
``threedgen doctor --build --retry`` asks. It also removes torch's own ``lock`` file that a killed
build leaves in the build folder (nerfacc would wait on it for ever).

Before building it checks what torch's JIT needs and the libraries do not say: ``Python.h``, and
``nvcc`` on ``PATH`` (nerfacc looks only there; when nvcc is only under torch's ``CUDA_HOME``, its
``bin`` folder is put on this process's ``PATH``).

On a machine without CUDA nothing is imported or built (the toolkit may be there while torch is
a CPU build, and a build would fail slowly).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
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


def nvcc_on_path() -> bool:
    """Whether ``nvcc`` is on ``PATH``: nerfacc looks for the toolkit only there."""
    return shutil.which("nvcc") is not None


def put_nvcc_on_path() -> Optional[str]:
    """Put the folder of :func:`nvcc` on this process's ``PATH`` when nvcc is not already there
    (nerfacc would otherwise give up where gsplat and torch build); returns the folder added."""
    compiler = nvcc()
    if compiler is None or nvcc_on_path():
        return None
    folder = str(Path(compiler).parent)
    os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
    return folder


def python_header() -> Path:
    """Where torch's JIT build expects this Python's ``Python.h``."""
    return Path(sysconfig.get_paths()["include"], "Python.h")


def _toolchain_problem() -> Optional[str]:
    """Why nothing can be built here (no compiler, no Python headers), or None."""
    if nvcc() is None:
        return "no CUDA toolkit (nvcc) to build them"
    if not python_header().is_file():
        return (f"no Python.h at {python_header()}: torch's JIT build needs this Python's headers "
                "(Debian/Ubuntu: apt install python3-dev)")
    return None


def record_path(name: str) -> Path:
    """The build record of an extension (see the module's docstring)."""
    return extensions_root() / f"threedgen-{name}.build.json"


def _fingerprint(name: str) -> dict:
    """What a build depends on: a record made under another one is not this build's."""
    try:
        lib = version(name)
    except PackageNotFoundError:
        lib = None
    return {"library": lib, "torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": nvcc(),
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}


def read_record(name: str) -> Optional[dict]:
    """The extension's build record when it is this build's (same fingerprint), else None."""
    try:
        record = json.loads(record_path(name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != _fingerprint(name):
        return None
    return record


def _write_record(name: str, state: str, **fields) -> None:
    path = record_path(name)
    record = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
              "fingerprint": _fingerprint(name), **fields}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _earlier_failure(record: Optional[dict]) -> Optional[str]:
    """The ``unavailable`` detail that an earlier, failed or killed, build leaves; None if none."""
    if record is None:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("time", 0)))
    retry = "threedgen doctor --build --retry builds again"
    if record.get("state") == "failed":
        return f"build failed at {when}: {record.get('error', '?')} ({retry})"
    if record.get("state") == "building":
        return (f"the build started at {when} by process {record.get('pid')} on {record.get('host')} never "
                f"finished (killed or timed out) ({retry})")
    return None


def compiled_module(name: str) -> Path:
    """The module a finished JIT build leaves in torch's build folder."""
    return build_folder(name) / f"{EXTENSIONS[name][1]}.so"


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
    compiled = compiled_module(name)
    if compiled.is_file():
        return KernelStatus(name, "built", f"compiled earlier ({compiled})")
    problem = _toolchain_problem() or _earlier_failure(read_record(name))
    if problem is not None:
        return KernelStatus(name, "unavailable", problem)
    where = "" if nvcc_on_path() else " (not on PATH, where nerfacc looks: threedgen puts its folder there)"
    return KernelStatus(name, "buildable", f"not built yet; nvcc at {nvcc()}{where} (the first run builds them)")


def load(name: str, retry: bool = False) -> KernelStatus:
    """Load (building once, under :func:`build_lock`, if needed) an extension's kernels; the result
    is kept for the process. Never raises: a failed build is an ``unavailable`` status, and so is
    an earlier failed or killed build of the same kind unless ``retry``."""
    if name in _LOADED and not retry:
        return _LOADED[name]
    if not torch.cuda.is_available():
        status = KernelStatus(name, "unavailable", "no CUDA device")
    elif importlib.util.find_spec(EXTENSIONS[name][2]) is not None:
        status = _import(name, "prebuilt", f"installed compiled ({EXTENSIONS[name][2]})")
    else:
        with build_lock(name):
            status = _load_locked(name, retry)
    _LOADED[name] = status
    return status


def _load_locked(name: str, retry: bool) -> KernelStatus:
    """:func:`load`'s work on a machine with CUDA, under the extension's build lock."""
    put_nvcc_on_path()
    # A build killed mid-way leaves torch's FileBaton ``lock`` in the build folder, and the next
    # load (torch checks the build even when the module is there) waits on it for ever: nerfacc
    # never removes it. We hold the build lock: no threedgen process is building, so it is stale.
    (build_folder(name) / "lock").unlink(missing_ok=True)
    if compiled_module(name).is_file():
        return _import(name, "built", "loaded")  # a finished build: loaded, not built again
    problem = _toolchain_problem() or (None if retry else _earlier_failure(read_record(name)))
    if problem is not None:
        return KernelStatus(name, "unavailable", problem)
    _write_record(name, "building")
    status = _import(name, "built", "built and loaded")
    if status.usable:
        record_path(name).unlink(missing_ok=True)
    else:
        _write_record(name, "failed", error=status.detail)
    return status


def _import(name: str, kind: str, detail: str) -> KernelStatus:
    """Import an extension's kernel module (which loads, or compiles then loads, its kernels)."""
    module_name = EXTENSIONS[name][0]
    started = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module = _import_backend(module_name)
    except Exception as exc:  # a compiler error, an ABI mismatch, a missing header...
        sys.modules.pop(module_name, None)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return KernelStatus(name, "unavailable", f"build failed: {type(exc).__name__}: {first}",
                            round(time.time() - started, 2))
    seconds = round(time.time() - started, 2)
    if getattr(module, "_C", None) is None:
        sys.modules.pop(module_name, None)
        return KernelStatus(name, "unavailable", "no CUDA toolkit (nvcc) to build them", seconds)
    return KernelStatus(name, kind, detail, seconds)


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


def prepare(names=tuple(EXTENSIONS), log=None, retry: bool = False) -> dict[str, KernelStatus]:
    """Load every extension now (the web UI does this before its workers start, so that jobs
    starting together never build at once)."""
    result = {}
    for name in names:
        if log is not None and (retry or probe(name).status == "buildable"):
            log(f"threedgen: building {name}'s CUDA kernels once (a few minutes the first time)")
        result[name] = load(name, retry=retry)
    return result


def forget() -> None:
    """Drop what this process has learnt (tests)."""
    _LOADED.clear()
    _WARNED.clear()
