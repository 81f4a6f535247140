"""Workers: one thread per device in the server, each running one job at a time in its own process.

The job process calls ``threedgen.runner.run`` (the CLI's entry point) with a callback that writes
progress to the job table, publishes previews, and stops the run (as Ctrl-C does: checkpoints
kept, status ``interrupted``) when the job is cancelled or the server has died. A crash or an
out-of-memory kill of the process fails that job only.

Private run folders (config, checkpoints) live under ``<state>/runs/<job id>/``; the files a
user may download are copied to ``<outputs>/<job id>/`` under fixed names (``PUBLIC_FILES``),
the only folder the web server may serve.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

from threedgen.devices import is_out_of_memory
from threedgen.errors import RunFailed, UserError
from threedgen.jobs.base import TableBackend
from threedgen.jobs.store import JobStore
from threedgen.request import RunRequest
from threedgen.rundir import RunFolder, atomic_path

# download kind -> the file's path in a run folder (RunFolder.public_files)
PUBLIC_FILES = {kind: str(path) for kind, path in RunFolder("").public_files().items()}
# kind -> name in the job's public folder: the file's own name, except the preview, which is
# named by its step (``publish_preview``); "preview.png" is the name a folder of an older version has
PUBLIC_NAMES = {**{kind: Path(path).name for kind, path in PUBLIC_FILES.items()}, "preview": "preview.png"}
PREVIEW_GLOB = "preview-*.png"


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def publish_preview(src: Path, public_dir: Path, step: int, final: bool = False) -> Path:
    """Copy a preview to the job's public folder as ``preview-<step>.png`` (``-final`` for the
    finished run's), then remove the older ones: a new preview is a new URL, so no browser or proxy
    cache ever shows a stale image under the current name."""
    public_dir.mkdir(parents=True, exist_ok=True)
    dst = public_dir / f"preview-{int(step):06d}{'-final' if final else ''}.png"
    copy_atomic(src, dst)
    for old in [*public_dir.glob(PREVIEW_GLOB), public_dir / PUBLIC_NAMES["preview"]]:
        if old != dst:
            old.unlink(missing_ok=True)
    return dst


def latest_preview(public_dir: Path) -> Optional[Path]:
    """The job's current preview (the newest step; the final one last), if any."""
    found = sorted(public_dir.glob(PREVIEW_GLOB))
    if found:
        return found[-1]
    legacy = public_dir / PUBLIC_NAMES["preview"]
    return legacy if legacy.is_file() else None


def publish(run_dir: Path, public_dir: Path, kinds=tuple(PUBLIC_FILES)) -> list[str]:
    """Copy a run's deliverables to its public folder (atomically, under fixed names)."""
    public_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for kind in kinds:
        src = Path(run_dir) / PUBLIC_FILES[kind]
        if kind == "video" and not src.is_file():
            src = RunFolder(run_dir).gif
        if not src.is_file():
            continue
        if kind == "preview":
            publish_preview(src, public_dir, RunFolder(run_dir).step(), final=True)
        else:
            copy_atomic(src, public_dir / (PUBLIC_NAMES[kind] if src.suffix != ".gif" else src.name))
        done.append(kind)
    return done


class Reporter:
    """Where a running job sends its progress; ``progress`` answers whether the job must stop."""

    cancelled = False  # the stop was a user's cancel (else: the server or the head went away)

    def progress(self, step: int, max_steps: int, step_time: Optional[float], run_dir: Optional[str],
                 preview: Optional[Path]) -> bool:
        raise NotImplementedError

    def first_step(self, step: int) -> None:
        """The job's first optimisation step of this attempt is done (its start-up cost ends here)."""

    def event(self, name: str, **detail) -> None:
        """An event for the job's history (the Janus gate's attempts)."""


class LocalReporter(Reporter):
    """A job process of the local backend: progress straight to the job table, the preview to the
    job's public folder; stops when the job is cancelled or its server died."""

    def __init__(self, store: JobStore, job_id: str, public_dir: Path, parent_pid: int):
        self.store, self.job_id, self.public_dir, self.parent_pid = store, job_id, public_dir, parent_pid

    def progress(self, step, max_steps, step_time, run_dir, preview) -> bool:
        self.cancelled = self.store.progress(self.job_id, step, max_steps, step_time, run_dir=run_dir)
        if preview is not None:
            publish_preview(preview, self.public_dir, step)
        return self.cancelled or os.getppid() != self.parent_pid

    def first_step(self, step: int) -> None:
        self.store.record(self.job_id, "first step", step=step)

    def event(self, name: str, **detail) -> None:
        self.store.record(self.job_id, name, **detail)


class ActorReporter(Reporter):
    """A Ray task of the ray backend (``threedgen/jobs/cluster.py``): progress to the head's dispatcher actor;
    the dispatcher gone counts as a stop."""

    def __init__(self, board, job_id: str, timeout_s: float = 30.0):
        self.board, self.job_id, self.timeout_s = board, job_id, timeout_s

    def progress(self, step, max_steps, step_time, run_dir, preview) -> bool:
        import ray  # optional (the cluster extra); runs on a node

        try:
            self.cancelled = ray.get(self.board.report.remote(
                self.job_id, step, max_steps, step_time, run_dir, str(preview) if preview else None),
                timeout=self.timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            self.cancelled = False
            return True  # the dispatcher is gone: stop, keeping the checkpoints (a new one resumes it)
        return bool(self.cancelled)

    def first_step(self, step: int) -> None:
        self.board.first_step.remote(self.job_id, step)  # no answer needed

    def event(self, name: str, **detail) -> None:
        self.board.event.remote(self.job_id, name, detail)  # no answer needed


def _progress_callback(reporter: Reporter, every_s: float = 0.5):
    import pytorch_lightning as pl  # heavy: in the job process only

    class JobProgress(pl.Callback):
        """Progress and previews to the reporter; stops the run (as Ctrl-C does) when it says so."""

        def __init__(self):
            self.last_write, self.last_step, self.last_time, self.preview_mtime = 0.0, None, None, None
            self.step_time = None

        def on_train_start(self, trainer, module):
            if reporter.progress(trainer.global_step, trainer.max_steps, None, str(trainer.default_root_dir), None):
                raise KeyboardInterrupt

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            now, step = time.time(), trainer.global_step
            if self.last_step is not None and step > self.last_step:
                rate = (now - self.last_time) / (step - self.last_step)
                self.step_time = rate if self.step_time is None else 0.8 * self.step_time + 0.2 * rate
            if self.last_step is None:
                reporter.first_step(step)
            self.last_step, self.last_time = step, now
            if now - self.last_write < every_s and step != trainer.max_steps:
                return
            self.last_write = now
            latest, preview = RunFolder(trainer.default_root_dir).latest_preview, None
            if latest.is_file() and latest.stat().st_mtime != self.preview_mtime:
                self.preview_mtime, preview = latest.stat().st_mtime, latest
            if reporter.progress(step, trainer.max_steps, self.step_time, None, preview):
                raise KeyboardInterrupt  # Lightning's graceful stop, as Ctrl-C

    return JobProgress()


def pin_device(device: str) -> str:
    """Pin this job process to its worker's GPU, the usual way: ``CUDA_VISIBLE_DEVICES`` names that
    GPU alone (mapped through the server's own ``CUDA_VISIBLE_DEVICES``, if any), and the run uses
    ``cuda:0``, the only device it sees, so nothing of it (Lightning, the prior, the kernels) can
    land on another worker's GPU. Must run before CUDA is initialised in the process. ``cpu`` and
    ``auto`` are returned as they are."""
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        return device
    index = int(match.group(1))
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    return "cuda:0"


def execute_job(job_id: str, params: dict, resume_dir: Optional[str], runs_dir: str, device: str,
                reporter: Reporter, log_path: Path) -> dict:
    """Run one job (a new run, or a resume of ``resume_dir``) as `threedgen run` does; the outcome
    as ``{"status", "error", "run_dir"}``. Shared by the local backend's job process and the Ray
    task, so a job behaves the same wherever it runs."""
    from threedgen.runner import run, run_gated  # heavy (torch, Lightning): in the job process only

    callback = _progress_callback(reporter)
    try:
        if resume_dir:
            run_dir = run(resume=resume_dir, progress_bar=False, callbacks=[callback], device=device)
        else:
            cfg = RunRequest.from_dict(params).to_config(device)
            run_dir = run_gated(cfg, out=Path(runs_dir) / job_id, progress_bar=False, callbacks=[callback],
                                report=lambda a: reporter.event("janus attempt", **a))
        return {"status": "succeeded", "error": None, "run_dir": str(run_dir)}
    except KeyboardInterrupt:
        if reporter.cancelled:
            return {"status": "cancelled", "error": None, "run_dir": None}
        return {"status": "interrupted", "error": "stopped; resume continues from the last checkpoint", "run_dir": None}
    except (UserError, RunFailed) as exc:
        return {"status": "failed", "error": str(exc).splitlines()[0], "run_dir": None}
    except BaseException as exc:  # anything else: fail this job, keep the details in its log
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(traceback.format_exc())
        except OSError:
            pass
        message = "out of memory" if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"
        return {"status": "failed", "error": message.splitlines()[0][:300], "run_dir": None}


def run_job(db_path: str, job_id: str, runs_dir: str, outputs_dir: str, device: str, parent_pid: int) -> None:
    """The body of a local job process."""
    device = pin_device(device)  # first: before anything touches CUDA
    store = JobStore(db_path)
    job = store.get(job_id)
    public_dir = Path(outputs_dir) / job_id
    public_dir.mkdir(parents=True, exist_ok=True)
    outcome = execute_job(job_id, job.params, job.run_dir if job.resume else None, runs_dir, device,
                          LocalReporter(store, job_id, public_dir, parent_pid),
                          Path(runs_dir) / f".{job_id}.log")  # beside the runs, never in the served outputs
    if outcome["status"] == "succeeded":
        publish(Path(outcome["run_dir"]), public_dir)
    store.finish(job_id, outcome["status"], error=outcome["error"], run_dir=outcome["run_dir"])


class WorkerPool(TableBackend):
    """The local backend: ``len(devices)`` worker threads; each claims queued jobs and runs them in
    child processes."""

    name = "local"

    def recover(self) -> list[str]:
        return self.store.recover()

    def reattach(self, job_ids: list[str]) -> None:
        for job in self.store.many(job_ids):
            if job.status == "interrupted":
                self.store.resume(job.id)

    def detached_hint(self, state: Path) -> str:
        return ("the running jobs stopped and kept their checkpoints; continue with: threedgen batch --attach"
                f" --state {state}")

    def __init__(self, store: JobStore, runs_dir: Path, outputs_dir: Path, devices: list[str], poll_s: float = 0.5):
        self.store, self.runs_dir, self.outputs_dir = store, Path(runs_dir), Path(outputs_dir)
        self.devices, self.poll_s = devices, poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[int, multiprocessing.Process] = {}

    def start(self) -> "WorkerPool":
        if any(d.startswith("cuda") for d in self.devices):
            # Build gsplat's and nerfacc's kernels once, here, before any job: two jobs building
            # them at once on a fresh install delete each other's build folder.
            from threedgen import kernels  # heavy (torch): only on a CUDA server

            for name, status in kernels.prepare(log=lambda m: print(m, file=sys.stderr, flush=True)).items():
                if not status.usable:
                    print(f"threedgen: {name}'s CUDA kernels are unavailable ({status.detail}); jobs use the "
                          "PyTorch path instead", file=sys.stderr, flush=True)
        for i, device in enumerate(self.devices):
            t = threading.Thread(target=self._loop, args=(i, device), name=f"threedgen-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming; interrupt running jobs (they keep their checkpoints) and wait for them."""
        self._stop.set()
        for proc in list(self._children.values()):
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        for t in self._threads:
            t.join(timeout)

    def _loop(self, worker: int, device: str) -> None:
        while not self._stop.is_set():
            job = self.store.claim(worker)
            if job is None:
                self._stop.wait(self.poll_s)
                continue
            self._run(worker, job.id, device)

    def _run(self, worker: int, job_id: str, device: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=run_job, name=f"threedgen-job-{job_id}",
                           args=(str(self.store.path), job_id, str(self.runs_dir), str(self.outputs_dir),
                                 device, os.getpid()))
        proc.start()
        self._children[worker] = proc
        self.store.set_pid(job_id, proc.pid)
        signalled: Optional[float] = None
        while proc.is_alive():
            proc.join(self.poll_s)
            if not proc.is_alive():
                break
            if signalled is None and self.store.get(job_id).cancel:
                signalled = time.time()  # the job stops itself at its next step; this is the fallback
            elif signalled is not None and time.time() - signalled > 60:
                os.kill(proc.pid, signal.SIGINT)
                signalled = float("inf")
        self._children.pop(worker, None)
        job = self.store.get(job_id)
        if job.status == "running":  # the process died without recording an outcome
            code = proc.exitcode
            reason = "killed (out of memory?)" if code in (-signal.SIGKILL, 137) else f"exit code {code}"
            self.store.finish(job_id, "cancelled" if job.cancel else "failed",
                              error=None if job.cancel else f"the job process ended: {reason}")
