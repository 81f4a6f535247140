"""Where jobs run, behind one interface (``Backend``): ``local`` (one worker per device of this
machine, one process per job; ``threedgen.jobs.worker``) or ``ray`` (one Ray task per job on a
cluster; ``threedgen.jobs.cluster``). Both keep the same SQLite job table as the record, so the web
UI and `threedgen batch` read jobs the same way whichever runs them, and neither asks which one it
has: ``make_backend`` is the one place that reads the name."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from threedgen.devices import cuda_for_auto
from threedgen.errors import UserError
from threedgen.jobs import BACKENDS
from threedgen.jobs.base import Backend
from threedgen.jobs.store import JobStore


def make_backend(name: str, store: JobStore, runs_dir: Path, outputs_dir: Path, devices: Optional[list[str]] = None,
                 ray_address: str = "auto", max_restarts: int = 3, workers: Optional[int] = None) -> Backend:
    """The backend ``name`` over ``store`` (not started). The local one runs on ``devices``
    (default: ``default_devices(workers)``). The Ray one fails here, in one line, when Ray is not
    installed; joining the cluster happens on ``start``."""
    if name == "local":
        from threedgen.jobs.worker import WorkerPool  # heavy: only for this backend

        return WorkerPool(store, runs_dir, outputs_dir, devices or default_devices(workers))
    if name == "ray":
        from threedgen.jobs.cluster import RayBackend, import_ray  # optional Ray: only here

        import_ray()
        return RayBackend(store, runs_dir, outputs_dir, address=ray_address, max_restarts=max_restarts)
    raise UserError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")


def default_devices(workers: Optional[int]) -> list[str]:
    """The local backend's devices: every CUDA device (or the first ``workers``), else the CPU."""
    n = 0
    if cuda_for_auto():
        import torch  # heavy: only where a GPU driver exists

        n = torch.cuda.device_count()
    if n == 0:
        if workers not in (None, 1):
            raise UserError("--workers: this machine has no CUDA device; the web UI runs one job at a time on the CPU")
        return ["cpu"]
    if workers is not None and not 1 <= workers <= n:
        raise UserError(f"--workers must be from 1 to {n} (one per GPU)")
    return [f"cuda:{i}" for i in range(workers or n)]


__all__ = ["Backend", "BACKENDS", "make_backend", "default_devices"]
