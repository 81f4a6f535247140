"""Devices: what ``auto`` means here, a device name checked against the machine, and what an
out-of-memory error looks like. One rule each, for the CLI, the runner, the priors and the web UI.

Importing this module does not import torch: on a machine with no GPU driver at all, ``auto``
is answered without it, so that the CLI's quick answers (help, listings, input errors) stay quick.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from threedgen.errors import UserError
from threedgen.schema import check_device

AUTO_DEVICE_ENV = "THREEDGEN_DEVICE"
# Any of these exists where a CUDA (NVIDIA) or ROCm driver is installed.
DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def no_gpu_driver() -> bool:
    """True when this machine certainly has no GPU driver (Linux; elsewhere torch is asked)."""
    return os.name == "posix" and Path("/proc").is_dir() and not any(Path(p).exists() for p in DRIVER_PATHS)


def cuda_for_auto() -> bool:
    """Whether ``auto`` means CUDA here: a CUDA device is present and ``THREEDGEN_DEVICE`` (when
    set) does not say ``cpu``. The test suite sets ``THREEDGEN_DEVICE=cpu`` so that its runs stay on
    the CPU on a GPU machine too; CUDA tests ask for CUDA by name."""
    if os.environ.get(AUTO_DEVICE_ENV, "").strip().lower() == "cpu" or no_gpu_driver():
        return False
    import torch  # heavy: only where a GPU driver exists

    return torch.cuda.is_available()


def resolve_device(name: str):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a ``torch.device`` present on this machine."""
    import torch  # heavy: only when a run is about to use the device

    if name == "auto":
        return torch.device("cuda" if cuda_for_auto() else "cpu")
    check_device(name)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or host out-of-memory error (torch's own type, or the allocator's message)."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "can't allocate memory" in text)


def peak_memory_mb(device) -> float:
    """The run's peak memory in MiB: on a CUDA device the most torch allocated there; on the CPU
    the process's peak resident set (Linux and macOS; 0 where neither is known)."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch  # heavy: only for a CUDA device

        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    try:
        import resource  # Unix only: a failed import is an answer of 0

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return 0.0
