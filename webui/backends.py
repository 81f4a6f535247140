"""Where jobs run: ``local`` (one worker per GPU of this machine, one process per job) or ``ray``
(one Ray task per job on a cluster; ``threedgen.webui.cluster``). Both keep the same SQLite job
table as the record, so the web UI and `threedgen batch` read jobs the same way whichever runs them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from threedgen.errors import UserError
from threedgen.webui.jobs import JobStore

BACKENDS = ("local", "ray")


def make_backend(name: str, store: JobStore, runs_dir: Path, outputs_dir: Path, devices: Optional[list[str]] = None,
                 ray_address: str = "auto", max_restarts: int = 3):
    """The backend ``name`` over ``store`` (not started). The Ray one fails here, in one line, when
    Ray is not installed; joining the cluster happens on ``start``."""
    if name == "local":
        from threedgen.webui.worker import WorkerPool  # heavy: only for this backend

        return WorkerPool(store, runs_dir, outputs_dir, devices or ["cpu"])
    if name == "ray":
        from threedgen.webui.cluster import RayBackend, import_ray  # optional Ray: only here

        import_ray()
        return RayBackend(store, runs_dir, outputs_dir, address=ray_address, max_restarts=max_restarts)
    raise UserError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
