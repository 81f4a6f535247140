"""The Ray backend: jobs of the durable job table run as Ray tasks on a cluster.

The SQLite job table stays the record of every job (states, progress, history, resume); Ray only
dispatches. A *dispatcher* actor, detached and pinned to the head node (the machine that holds
the job table), owns the jobs' tasks and is the table's one writer for them:

- it claims queued jobs while the cluster has a free slot (one GPU per job, or ``job_cpus`` CPUs
  on a cluster without GPUs) and submits one task per job, ``max_retries=0`` and ``max_calls=1``
  (a fresh worker process per job);
- the task runs the same entry point as `threedgen run` and reports its progress to the
  dispatcher, which writes it to the table, copies its preview to the public folder and answers
  whether the job was cancelled (the job then stops at its next step, keeping its checkpoints);
  ``ray.cancel(force=True)`` backs the cancel up after ``cancel_grace_s``;
- when a node or a worker dies, Ray's own retry (from step 0) is off: the job becomes
  ``interrupted`` and is queued again to resume from its last verified checkpoint on another node,
  at most ``max_restarts`` times, each event in the job's history;
- it is detached, so the web UI or `threedgen batch` may stop and start again while jobs run; a
  dispatcher that starts (a restarted head, or Ray restarting it) finds the jobs the table says
  are running, which no live dispatcher owns any more (Ray stops a task whose owner died), and
  queues them again to resume.

Run folders must be on storage every node mounts (``runs_dir``): the task writes there, the
dispatcher publishes the finished files from there to the outputs folder the web UI serves.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from threedgen.errors import UserError
from threedgen.jobs.base import TableBackend
from threedgen.jobs.store import JobStore
from threedgen.jobs.worker import publish, publish_preview
from threedgen.schema import is_ascii_integer

NAMESPACE = "threedgen"
INSTALL_HINT = 'the ray backend needs Ray: pip install "threedgen[cluster]"'
CONNECT_TIMEOUT_S = 10.0


def import_ray():
    try:
        import ray  # optional (the cluster extra)
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


def _reachable(address: str, timeout: float) -> Optional[str]:
    """None when something listens at ``host:port``; else why not."""
    host, sep, port = address.rpartition(":")
    if not sep or not is_ascii_integer(port):
        return f"{address!r} is not host:port"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def connect(address: str = "auto"):
    """Join a running Ray cluster (``auto``: the one this machine belongs to; or the head's GCS
    ``host:port``) as a driver in threedgen's namespace; a one-line UserError within seconds when
    it cannot be reached. Returns the ``ray`` module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = (address or "auto").strip()
    if address.startswith("ray://"):
        raise UserError("--ray-address takes the head's GCS address host:port (default port 6379) or auto, "
                        "not a Ray Client ray:// address")
    if address != "auto":
        why = _reachable(address, CONNECT_TIMEOUT_S)
        if why is not None:
            raise UserError(f"cannot reach the Ray cluster at {address} ({why}); start its head with "
                            "`ray start --head` or check --ray-address")
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="warning")
    except ConnectionError as exc:
        if address == "auto":
            raise UserError("no running Ray cluster found on this machine (--ray-address auto); start one with "
                            "`ray start --head`, or give --ray-address HOST:PORT") from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot join the Ray cluster at {address} ({first}); check --ray-address") from None
    return ray


def dispatcher_name(state: Path) -> str:
    """One dispatcher per job table: named after the table's path."""
    return "threedgen-dispatcher-" + hashlib.sha256(str(Path(state).resolve()).encode()).hexdigest()[:12]


class Dispatcher:
    """The head's dispatcher (a Ray actor; see the module's docstring)."""

    def __init__(self, db_path: str, runs_dir: str, outputs_dir: str, head_version: str, max_restarts: int = 3,
                 job_cpus: float = 1.0, cancel_grace_s: float = 10.0, poll_s: float = 0.25):
        import ray  # optional (the cluster extra); in the actor

        from threedgen.jobs import cluster_job  # shipped to the nodes by value; in the actor only

        ray.cloudpickle.register_pickle_by_value(cluster_job)  # see cluster_job's docstring
        self.config = {"db_path": db_path, "runs_dir": runs_dir, "outputs_dir": outputs_dir,
                       "head_version": head_version, "max_restarts": max_restarts, "job_cpus": job_cpus,
                       "cancel_grace_s": cancel_grace_s}
        self.store = JobStore(db_path, max_queued=10 ** 9)
        self.runs_dir, self.outputs_dir = Path(runs_dir), Path(outputs_dir)
        self.head_version, self.max_restarts, self.job_cpus = head_version, max_restarts, job_cpus
        self.cancel_grace_s, self.poll_s = cancel_grace_s, poll_s
        self.name = ray.get_runtime_context().get_actor_name()
        self.task = ray.remote(max_calls=1, max_retries=0)(cluster_job.run_cluster_job)
        self.refs: dict[str, object] = {}
        self.cancel_seen: dict[str, float] = {}
        self.nodes: dict[str, str] = {}
        self.lock = threading.Lock()
        self.reconciled = self._reconcile()
        # Give Ray a moment to stop the tasks of the dead owner before their jobs run again.
        self.hold_until = time.time() + (5.0 if self.reconciled else 0.0)
        self.thread = threading.Thread(target=self._loop, name="threedgen-dispatch", daemon=True)
        self.thread.start()

    # ---- called by the jobs and the front ends -------------------------------------------------
    def info(self) -> dict:
        with self.lock:
            running = len(self.refs)
        return {**self.config, "running": running, "slots": self._capacity()[0], "reconciled": self.reconciled,
                "pid": os.getpid()}

    def started(self, job_id: str, node: str, pid: int) -> None:
        self.nodes[job_id] = node
        self.store.set_node(job_id, node)
        self.store.set_pid(job_id, pid)

    def report(self, job_id: str, step: int, max_steps: int, step_time, run_dir, preview) -> bool:
        cancel = self.store.progress(job_id, step, max_steps, step_time, run_dir=run_dir)
        if preview:
            try:
                publish_preview(Path(preview), self._public(job_id), step)
            except OSError:
                pass  # a preview is a nicety; the next one comes soon
        return cancel

    def first_step(self, job_id: str, step: int) -> None:
        self.store.record(job_id, "first step", step=step)

    def event(self, job_id: str, name: str, detail: dict) -> None:
        self.store.record(job_id, name, **detail)

    # ---- the loop ------------------------------------------------------------------------------
    def _public(self, job_id: str) -> Path:
        path = self.outputs_dir / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _reconcile(self) -> list[str]:
        """Jobs the table says are running when this dispatcher starts have no live owner (Ray
        stops a task whose owner died): queue them again to resume. A head restart is not the
        job's fault, so it does not use up one of the job's restarts."""
        ids = []
        for job in self.store.running():
            self.store.interrupt(job.id, "the cluster's dispatcher restarted", self.max_restarts, count=False)
            ids.append(job.id)
        return ids

    def _capacity(self) -> tuple[int, dict]:
        """The free job slots and a task's resources: one GPU per job where the cluster has GPUs,
        else ``job_cpus`` CPUs."""
        import ray  # optional (the cluster extra)

        resources = ray.cluster_resources()
        if resources.get("GPU", 0) >= 1:
            total, options = int(resources["GPU"]), {"num_gpus": 1, "num_cpus": 0}
        else:
            total, options = int(resources.get("CPU", 0) // self.job_cpus), {"num_cpus": self.job_cpus}
        with self.lock:
            return max(total - len(self.refs), 0), options

    def _loop(self) -> None:
        while True:
            try:
                self._collect()
                self._backstop_cancels()
                self._dispatch()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad round
                print(f"threedgen dispatcher: {type(exc).__name__}: {exc}", flush=True)
            time.sleep(self.poll_s)

    def _dispatch(self) -> None:
        if time.time() < self.hold_until:
            return
        free, options = self._capacity()
        while free > 0:
            job = self.store.claim(worker=-1)
            if job is None:
                return
            try:
                ref = self.task.options(name=f"threedgen-job-{job.id}", **options).remote(
                    job.id, job.params, job.run_dir if job.resume else None, str(self.runs_dir), self.head_version,
                    self.name, NAMESPACE)
            except Exception as exc:  # noqa: BLE001 - this job cannot be submitted; the others go on
                self.store.finish(job.id, "failed", error=f"Ray refused the task: {exc}".splitlines()[0][:300])
                continue
            with self.lock:
                self.refs[job.id] = ref
            free -= 1

    def _backstop_cancels(self) -> None:
        import ray  # optional (the cluster extra)

        with self.lock:
            ids = list(self.refs)
        for job in self.store.many(ids):
            if not job.cancel:
                continue
            first = self.cancel_seen.setdefault(job.id, time.time())
            if time.time() - first > self.cancel_grace_s:
                ray.cancel(self.refs[job.id], force=True)
                self.cancel_seen[job.id] = float("inf")

    def _collect(self) -> None:
        import ray  # optional (the cluster extra)

        with self.lock:
            refs = dict(self.refs)
        if not refs:
            return
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        by_ref = {ref: job_id for job_id, ref in refs.items()}
        for ref in done:
            job_id = by_ref[ref]
            self._outcome(ray, job_id, ref)
            with self.lock:
                self.refs.pop(job_id, None)
            self.cancel_seen.pop(job_id, None)

    def _outcome(self, ray, job_id: str, ref) -> None:
        node = self.nodes.pop(job_id, None) or "a node"
        try:
            outcome = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            self.store.finish(job_id, "cancelled")
            return
        except ray.exceptions.RayTaskError as exc:  # the task's own code raised: a failure, not a fault
            self.store.finish(job_id, "failed", error=f"{type(exc.cause).__name__}: {exc.cause}".splitlines()[0][:300])
            return
        except ray.exceptions.RayError as exc:  # the node or the worker died: the app's policy, not Ray's retry
            job = self.store.get(job_id)
            if job.cancel:
                self.store.finish(job_id, "cancelled")
                return
            reason = {"NodeDiedError": f"node {node} died", "WorkerCrashedError": f"the worker on {node} died"}.get(
                type(exc).__name__, f"{type(exc).__name__} on {node}")
            self.store.interrupt(job_id, reason, self.max_restarts)
            return
        status = outcome["status"]
        if status == "interrupted":
            self.store.interrupt(job_id, f"stopped on {outcome.get('node') or node}", self.max_restarts)
            return
        if status == "succeeded":
            try:
                publish(Path(outcome["run_dir"]), self._public(job_id))
            except OSError as exc:
                status, outcome["error"] = "failed", f"cannot publish the results ({exc.strerror or exc})"
        self.store.finish(job_id, status, error=outcome.get("error"), run_dir=outcome.get("run_dir"))


class RayBackend(TableBackend):
    """The front ends' side of the Ray backend: join the cluster, start (or find) the dispatcher
    of this job table, and leave it running on ``stop`` (jobs on a cluster are durable)."""

    name = "ray"

    def detached_hint(self, state: Path) -> str:
        return ("the jobs stay queued and running on the cluster; watch them with: threedgen batch --status "
                f"--state {state} (or --attach, or the web UI with the same --state)")

    def __init__(self, store: JobStore, runs_dir: Path, outputs_dir: Path, address: str = "auto",
                 max_restarts: int = 3, job_cpus: float = 1.0, head_version: Optional[str] = None,
                 cancel_grace_s: float = 10.0):
        self.store, self.runs_dir, self.outputs_dir = store, Path(runs_dir), Path(outputs_dir)
        self.address, self.max_restarts, self.job_cpus = address, max_restarts, job_cpus
        self.cancel_grace_s = cancel_grace_s
        if head_version is None:
            from threedgen import __version__ as head_version  # the package's own version, read once
        self.head_version = head_version
        self.actor = None

    def start(self) -> "RayBackend":
        ray = connect(self.address)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # optional (the cluster extra)

        here = ray.get_runtime_context().get_node_id()
        config = {"db_path": str(self.store.path.resolve()), "runs_dir": str(self.runs_dir.resolve()),
                  "outputs_dir": str(self.outputs_dir.resolve()), "head_version": self.head_version,
                  "max_restarts": self.max_restarts, "job_cpus": self.job_cpus, "cancel_grace_s": self.cancel_grace_s}
        actor_cls = ray.remote(Dispatcher)
        self.actor = actor_cls.options(
            name=dispatcher_name(self.store.path), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_concurrency=16, num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(**config)
        info = ray.get(self.actor.info.remote(), timeout=60)
        differs = [k for k in config if info.get(k) != config[k]]
        if differs:
            raise UserError("a dispatcher for this job table already runs with other settings ("
                            + ", ".join(f"{k}: {info.get(k)} vs {config[k]}" for k in differs)
                            + "); use the same settings, or stop it with `threedgen batch --stop-dispatcher`")
        self.reconciled = info.get("reconciled") or []
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """The front end leaves; the dispatcher and the jobs stay on the cluster."""

    def shutdown_dispatcher(self) -> None:
        import ray  # optional (the cluster extra)

        if self.actor is None:
            connect(self.address)
            try:
                self.actor = ray.get_actor(dispatcher_name(self.store.path), namespace=NAMESPACE)
            except ValueError:
                return
        ray.kill(self.actor, no_restart=True)
        self.actor = None
