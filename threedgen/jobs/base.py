"""The interface every job backend offers (``Backend``), and the job-table operations both of
today's backends share (``TableBackend``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from threedgen.jobs.store import JobStore


class Backend(Protocol):
    """What the front ends (the web UI's service, `threedgen batch`) ask of a backend."""

    name: str
    store: JobStore

    def recover(self) -> list[str]:
        """Before ``start``: jobs a stopped front end left ``running`` whose process is gone become
        ``interrupted``; their ids (a cluster's dispatcher reconciles on its own: none)."""

    def start(self) -> "Backend":
        """Begin running queued jobs (local: the worker threads; ray: join the cluster and start or
        find the dispatcher). Fails in one line when the backend cannot run here."""

    def stop(self, timeout: float = 30.0) -> None:
        """The front end leaves. Local: running jobs stop at their next step, keeping their
        checkpoints. Ray: the jobs stay running on the cluster."""

    def submit(self, jobs: list[tuple[dict, int]]) -> list[str]:
        """Queue ``(request, steps)`` jobs in one transaction: all of them or none."""

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job, or ask a running one to stop; the resulting status."""

    def resume(self, job_id: str) -> None:
        """Queue an interrupted or failed job again, to continue from its last checkpoint."""

    def reattach(self, job_ids: list[str]) -> None:
        """A front end follows these jobs again (`threedgen batch --attach`): the local backend
        queues the interrupted ones to resume; on a cluster the dispatcher already did."""

    def detached_hint(self, state: Path) -> str:
        """What became of the jobs when the front end stopped following them, and how to go on."""


class TableBackend:
    """What both backends do the same way: the job table's operations."""

    name = ""
    store: JobStore

    def recover(self) -> list[str]:
        return []

    def submit(self, jobs: list[tuple[dict, int]]) -> list[str]:
        return self.store.submit_many(jobs)

    def cancel(self, job_id: str) -> str:
        return self.store.cancel(job_id)

    def resume(self, job_id: str) -> None:
        self.store.resume(job_id)

    def reattach(self, job_ids: list[str]) -> None:
        pass
