"""The durable job table: SQLite in WAL mode, safe to share between the server's threads and the job
processes (each opens its own connection; every write is one short transaction).

A job moves ``queued -> running -> succeeded | failed | cancelled | interrupted``; an interrupted or
failed job can be queued again to resume from its last checkpoint. Jobs left ``running`` by a server
that died become ``interrupted`` when the next server starts (``recover``).

On a Ray cluster the table stays the record and a single writer on the head (the dispatcher,
``threedgen.jobs.cluster``) keeps it: it claims queued jobs, records which node runs each, and when a
node dies it marks the job ``interrupted`` and queues it again to resume (``interrupt``), at most
``max_restarts`` times; every such event is kept in the job's ``history``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from threedgen.errors import UserError

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
JOB_ID = re.compile(r"[0-9a-f]{12}")  # fullmatch: "$" would let a trailing newline through

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    max_steps INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step_time REAL,
    error TEXT,
    run_dir TEXT,
    resume INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    worker INTEGER,
    pid INTEGER,
    node TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    history TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
"""
# Columns added after the first release: a table made by an older server gains them on start.
ADDED_COLUMNS = {"node": "TEXT", "restarts": "INTEGER NOT NULL DEFAULT 0", "history": "TEXT NOT NULL DEFAULT '[]'"}


@dataclass
class Job:
    id: str
    params: dict
    status: str
    step: int
    max_steps: int
    created: float
    started: Optional[float]
    finished: Optional[float]
    step_time: Optional[float]
    error: Optional[str]
    run_dir: Optional[str]
    resume: bool
    cancel: bool
    worker: Optional[int]
    pid: Optional[int]
    node: Optional[str] = None
    restarts: int = 0
    history: list = field(default_factory=list)

    @property
    def progress(self) -> float:
        return self.step / self.max_steps if self.max_steps else 0.0

    @property
    def eta_seconds(self) -> Optional[float]:
        """Seconds left at the measured seconds per step (None until a step has been timed)."""
        if self.status != "running" or not self.step_time:
            return None
        return max(self.max_steps - self.step, 0) * self.step_time


DOUBLE_SUBMIT_S = 5.0  # an identical submission this soon after the first is the same request


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def wait_for(predicate, timeout: float, every: float = 0.25):
    """Poll ``predicate`` until it returns something true (returned); TimeoutError after ``timeout``
    seconds. For scripts, tests and benchmarks that wait on jobs."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s")


def check_job_id(job_id) -> str:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise UserError("unknown job id (a job id is 12 hexadecimal characters)")
    return job_id


class JobStore:
    def __init__(self, path: str | Path, max_queued: int = 100):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_queued = max_queued
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
                have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
                for name, decl in ADDED_COLUMNS.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        except sqlite3.DatabaseError as exc:  # "file is not a database", a damaged page
            raise UserError(f"the job table {self.path} is damaged ({exc}); move it aside to start with an empty "
                            "queue (the runs in the outputs folder are kept)") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["resume"], d["cancel"] = bool(d["resume"]), bool(d["cancel"])
        d["history"] = json.loads(d["history"] or "[]")
        return Job(**d)

    # ---- submitting and reading ------------------------------------------------------------
    def submit(self, params: dict, max_steps: int) -> str:
        return self.submit_many([(params, max_steps)])[0]

    def submit_many(self, jobs: list[tuple[dict, int]]) -> list[str]:
        """Queue ``(params, max_steps)`` jobs in one transaction: all of them or, when the queue
        cannot take them all, none (a clear "queue full"). The same parameters submitted again
        within ``DOUBLE_SUBMIT_S`` seconds while that job is still queued or running (a double
        click) return that job instead of a second one."""
        now = time.time()
        with self._transaction() as db:
            recent = {_key(json.loads(row["params"])): row["id"] for row in db.execute(
                "SELECT id, params FROM jobs WHERE created > ? AND status IN ('queued', 'running')",
                (now - DOUBLE_SUBMIT_S,))}
            new = {_key(params) for params, _ in jobs} - set(recent)
            if new:
                self._check_room(db, len(new))
            ids = []
            for params, steps in jobs:
                key = _key(params)
                if key not in recent:
                    recent[key] = uuid.uuid4().hex[:12]
                    db.execute("INSERT INTO jobs (id, params, status, max_steps, created, history) "
                               "VALUES (?, ?, 'queued', ?, ?, ?)", (recent[key], json.dumps(params), int(steps), now,
                                                                   json.dumps([{"time": round(now, 3), "event": "queued"}])))
                ids.append(recent[key])
        return ids

    def get(self, job_id: str) -> Job:
        check_job_id(job_id)
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UserError(f"no job {job_id}")
        return self._job(row)

    def list(self, limit: int = 50) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (int(limit),)).fetchall()
        return [self._job(r) for r in rows]

    def many(self, ids: list[str]) -> list[Job]:
        """The jobs of ``ids``, in that order (unknown ids are left out)."""
        with self._connect() as db:
            rows = {r["id"]: r for r in db.execute(
                f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(ids))})", list(ids)).fetchall()}
        return [self._job(rows[i]) for i in ids if i in rows]

    def running(self) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'running' ORDER BY started").fetchall()
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            return {r[0]: r[1] for r in db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    # ---- the worker's side -------------------------------------------------------------------
    def claim(self, worker: int) -> Optional[Job]:
        """The oldest queued job, marked running for ``worker`` (atomic across processes)."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', worker = ?, started = ?, finished = NULL, error = NULL "
                       "WHERE id = ?", (worker, time.time(), row["id"]))
        return self.get(row["id"])

    def set_pid(self, job_id: str, pid: Optional[int]) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (pid, job_id))

    def progress(self, job_id: str, step: int, max_steps: int, step_time: Optional[float] = None,
                 run_dir: Optional[str] = None) -> bool:
        """Record progress; returns whether a cancel was requested."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET step = ?, max_steps = ?, step_time = COALESCE(?, step_time), "
                       "run_dir = COALESCE(?, run_dir) WHERE id = ?", (step, max_steps, step_time, run_dir, job_id))
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel"])

    @staticmethod
    def _event(db: sqlite3.Connection, job_id: str, event: str, **detail) -> None:
        row = db.execute("SELECT history FROM jobs WHERE id = ?", (job_id,)).fetchone()
        history = json.loads(row["history"] or "[]") if row else []
        history.append({"time": round(time.time(), 3), "event": event, **detail})
        db.execute("UPDATE jobs SET history = ? WHERE id = ?", (json.dumps(history), job_id))

    def record(self, job_id: str, event: str, **detail) -> None:
        """Add an event (``started``, ``node died`` ...) to a job's history."""
        with self._transaction() as db:
            self._event(db, job_id, event, **detail)

    def set_node(self, job_id: str, node: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET node = ? WHERE id = ?", (node, job_id))
            self._event(db, job_id, "started", node=node)

    def interrupt(self, job_id: str, reason: str, max_restarts: int, count: bool = True) -> str:
        """A running job lost its worker or node: ``interrupted``, and queued again to resume from its
        last checkpoint while it has restarts left (``max_restarts`` in all; ``count=False``: a fault
        that is not the job's, which uses none up). Returns the new status."""
        with self._transaction() as db:
            row = db.execute("SELECT status, restarts, run_dir, cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "running":
                return row["status"] if row else "unknown"
            if row["cancel"]:
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, pid = NULL WHERE id = ?",
                           (time.time(), job_id))
                self._event(db, job_id, "cancelled", reason=reason)
                return "cancelled"
            self._event(db, job_id, "interrupted", reason=reason)
            if row["restarts"] < max_restarts or not count:
                db.execute("UPDATE jobs SET status = 'queued', resume = ?, restarts = restarts + ?, error = NULL, "
                           "pid = NULL WHERE id = ?", (1 if row["run_dir"] else 0, int(count), job_id))
                self._event(db, job_id, "requeued", restart=row["restarts"] + int(count), of=max_restarts)
                return "queued"
            db.execute("UPDATE jobs SET status = 'interrupted', finished = ?, pid = NULL, error = ? WHERE id = ?",
                       (time.time(), f"{reason}; no automatic restarts left ({max_restarts}); resume continues "
                        "from the last checkpoint", job_id))
            return "interrupted"

    def finish(self, job_id: str, status: str, error: Optional[str] = None, run_dir: Optional[str] = None) -> None:
        assert status in STATUSES and status not in ("queued", "running"), status
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, finished = ?, pid = NULL, "
                       "run_dir = COALESCE(?, run_dir) WHERE id = ?", (status, error, time.time(), run_dir, job_id))
            self._event(db, job_id, status, **({"error": error} if error else {}))

    # ---- the user's side ---------------------------------------------------------------------
    @staticmethod
    def _locked_row(db: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = db.execute("SELECT status, run_dir FROM jobs WHERE id = ?", (check_job_id(job_id),)).fetchone()
        if row is None:
            raise UserError(f"no job {job_id}")
        return row

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job now, or ask a running one to stop; returns the resulting status."""
        with self._transaction() as db:
            row = self._locked_row(db, job_id)
            if row["status"] in ("queued", "interrupted"):
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
                self._event(db, job_id, "cancelled")
                return "cancelled"
            if row["status"] == "running":
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
                return "cancelling"
        raise UserError(f"job {job_id} has already {row['status']}; only queued or running jobs can be cancelled")

    def _check_room(self, db: sqlite3.Connection, adding: int) -> None:
        """A clear "queue full" unless ``adding`` more queued jobs stay within ``max_queued``."""
        queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
        if queued + adding > self.max_queued:
            raise UserError(f"the queue is full ({queued} jobs waiting, at most {self.max_queued}; this request "
                            f"adds {adding}); try again when some have finished")

    def resume(self, job_id: str) -> None:
        """Queue an interrupted (or failed) job again; it continues from its last checkpoint. A
        resumed job counts against ``max_queued`` as a new one does."""
        with self._transaction() as db:
            row = self._locked_row(db, job_id)
            if row["status"] not in ("interrupted", "failed"):
                raise UserError(f"job {job_id} is {row['status']}; only interrupted or failed jobs can be resumed")
            self._check_room(db, 1)
            db.execute("UPDATE jobs SET status = 'queued', resume = ?, cancel = 0, error = NULL, created = ? "
                       "WHERE id = ?", (1 if row["run_dir"] else 0, time.time(), job_id))
            self._event(db, job_id, "resumed")

    def recover(self) -> list[str]:
        """At start-up: jobs a dead server left running become interrupted."""
        with self._transaction() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()]
            db.execute("UPDATE jobs SET status = 'interrupted', pid = NULL, error = 'the server stopped while this "
                       "job ran; resume continues from its last checkpoint' WHERE status = 'running'")
            for job_id in ids:
                self._event(db, job_id, "interrupted", reason="the server stopped")
        return ids
