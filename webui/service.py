"""The web UI's service: every endpoint as a plain Python method of strings and numbers, tested
without Gradio (the page, ``threedgen.webui.app``, lays them out; ``rest.py`` serves two of them as
JSON).

Every endpoint validates on the server (the API bypasses the form's limits) and answers bad input
with a one-line ``UserError``. Files are looked up by job id and a fixed kind, never by a path from
the client. Only the outputs folder may be served; the job database and the run folders with their
checkpoints live in the state folder, outside it. Jobs run on a backend (``threedgen.jobs``) whose
name this module never reads.

With ``--amortised MODEL`` the instant endpoint generates from an amortised model in the server
process (loaded on first use): run folders in ``<state>/instant/``, deliverables copied to
``<outputs>/instant/<run>/``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from threedgen import compare as cmp
from threedgen.amortised_folder import read_meta
from threedgen.errors import UserError
from threedgen.guidance.config import GUIDANCE
from threedgen.jobs.backends import make_backend
from threedgen.jobs.store import Job, JobStore, check_job_id
from threedgen.jobs.worker import PUBLIC_NAMES, latest_preview, publish
from threedgen.manifest import manifest_short_hash
from threedgen.representations.config import REPRESENTATIONS
from threedgen.request import RunRequest
from threedgen.rundir import RunFolder
from threedgen.schema import MAX_JANUS_RETRIES, clean_prompt, is_ascii_integer

MAX_SEEDS = 8
RESOLUTIONS = [32, 64, 128, 256, 512]
TABLE_HEADERS = ["job", "prompt", "guidance", "representation", "seed", "status", "progress", "ETA"]


@dataclass
class Settings:
    outputs: Path
    state: Path
    priors: list[str] = field(default_factory=lambda: ["shapes"])
    max_steps: int = 20000
    max_queued: int = 100
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    # key=value config settings the server applies to every job (`threedgen webui --set ...`).
    overrides: list[str] = field(default_factory=list)
    backend: str = "local"  # local | ray
    ray_address: str = "auto"
    runs: Optional[Path] = None  # run folders (default <state>/runs); on a cluster, storage every node mounts
    max_restarts: int = 3  # automatic resumes of a job whose node died (ray backend)
    amortised: Optional[Path] = None  # an amortised model folder: the "Instant" tab generates from it


def parse_seeds(text) -> list[int]:
    """``"0"``, ``"0, 1, 2"`` or ``"0-3"`` -> seeds (at most ``MAX_SEEDS``)."""
    text = str(text if text is not None else "").strip()
    if not text:
        return [0]
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"([0-9]{1,10})\s*-\s*([0-9]{1,10})", part)  # \d would take other scripts' digits
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo or hi - lo >= MAX_SEEDS:
                raise UserError(f"seed range {part!r} must go up and hold at most {MAX_SEEDS} seeds")
            seeds.extend(range(lo, hi + 1))
        elif re.fullmatch(r"[0-9]{1,10}", part):
            seeds.append(int(part))
        else:
            raise UserError(f"seeds must be integers like 0 or 0, 1, 2 or 0-3; got {part!r}")
    if len(seeds) > MAX_SEEDS:
        raise UserError(f"at most {MAX_SEEDS} seeds per submission; got {len(seeds)}")
    if any(s > 2 ** 32 - 1 for s in seeds):
        raise UserError("seeds must be from 0 to 4294967295")
    return list(dict.fromkeys(seeds))


def parse_retries(value) -> int:
    """The form's Janus retries: empty is 0; else an integer from 0 to ``MAX_JANUS_RETRIES``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and is_ascii_integer(value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_JANUS_RETRIES:
        raise UserError(f"Janus retries must be an integer from 0 to {MAX_JANUS_RETRIES}")
    return value


def validate(settings: Settings, prompt, negative_prompt, guidance, representation, prior, steps, seeds,
             resolution, janus_retry=None) -> list[tuple[RunRequest, int]]:
    """One job's request and its number of steps per seed, each checked exactly as `threedgen run`
    checks its input. ``steps`` empty (None, "") means the preset's; ``janus_retry``: the Janus
    gate's retries (``janus.retries``; empty or 0: none)."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt or "", str):
        raise UserError("prompt and negative prompt must be text")
    GUIDANCE[guidance], REPRESENTATIONS[representation]  # unknown names: the registries' own errors
    if prior not in settings.priors:
        raise UserError(f"prior {prior!r} is not offered by this server; valid: {', '.join(settings.priors)}")
    if isinstance(steps, str) and is_ascii_integer(steps.strip()):
        steps = int(steps)
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    if steps == "" or (isinstance(steps, str) and not steps.strip()):
        steps = None
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 1 <= steps <= settings.max_steps):
        raise UserError(f"steps must be an integer from 1 to {settings.max_steps} (or empty: the preset's)")
    if resolution not in (None, "") and (not is_ascii_integer(str(resolution)) or int(resolution) not in RESOLUTIONS):
        raise UserError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}")
    retries = parse_retries(janus_retry)
    overrides = tuple(settings.overrides) + ((f"janus.retries={retries}",) if retries else ())
    jobs = []
    for seed in parse_seeds(seeds):
        request, cfg = RunRequest(
            prompt=prompt, negative_prompt=negative_prompt or "", guidance=guidance, representation=representation,
            prior=prior, steps=steps, seed=seed, resolution=int(resolution) if resolution not in (None, "") else None,
            overrides=overrides).checked()  # every check of `threedgen run`, once
        if cfg.steps > settings.max_steps:
            raise UserError(f"the preset runs {cfg.steps} steps, over this server's limit of {settings.max_steps}; "
                            f"give steps from 1 to {settings.max_steps}")
        check_gpu_memory(settings, cfg)
        jobs.append((request, cfg.steps))
    return jobs


def check_gpu_memory(settings: Settings, cfg) -> None:
    """On the local backend with GPUs: a NeRF whose training render cannot fit the smallest of
    them (a job may land on any) is the one-line UserError the job would fail with, at once. (The
    Ray backend's GPUs are elsewhere: there the job fails with it.)"""
    gpus = [d for d in settings.devices if d.startswith("cuda")] if settings.backend == "local" else []
    if gpus:
        from threedgen import memory  # heavy (torch): only on a CUDA server, whose workers imported it already

        memory.check_training_memory(cfg, min(gpus, key=memory.device_memory))


def preset_steps(guidance, representation, prior) -> Optional[int]:
    """The steps a job of these components runs when the form's Steps box is empty (the presets'
    value, as `threedgen run` would use); None for a combination that does not resolve."""
    try:
        return RunRequest(guidance=guidance, representation=representation, prior=prior,
                          device="cpu").resolve(whole_run=False)[0].cfg.steps
    except UserError:
        return None


CURVE_SERIES = ("loss", "grad_norm")
MAX_CURVE_POINTS = 2000


def read_curve(path: Path) -> list[dict]:
    """``{"step", "value", "series"}`` rows of the loss and gradient norm in a Lightning CSV log
    (the last ``MAX_CURVE_POINTS`` steps); empty when the file is missing or has no such column."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))[-MAX_CURVE_POINTS:]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    out = []
    for row in rows:
        for series in CURVE_SERIES:
            try:
                out.append({"step": int(float(row["step"])), "value": float(row[series]), "series": series})
            except (KeyError, TypeError, ValueError):
                continue  # a row of other numbers (t, the method's extras) or an empty cell
    return out


INSTANT_OFF = ("Instant generation is off on this server: start it with `threedgen webui --amortised MODEL`, "
               "a model folder trained by `threedgen train-amortised PROMPTS.txt`.")
INSTANT_FOLDER = "instant"  # <state>/instant: the run folders; <outputs>/instant: their public copies

# <outputs>/comparisons/<id>/: a comparison's record, sheet, report and view strips (served, so they
# can be downloaded); its runs stay where the backend puts every job's (the state folder's runs).
COMPARISONS = "comparisons"
COMPARE_ID = re.compile(r"[0-9a-f]{8}")
BUDGET_KINDS = ("steps", "seconds")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")  # ASCII digits only: float() takes other scripts' too


def check_compare_id(compare_id) -> str:
    """A comparison id (8 lowercase hexadecimal characters) before any path is made of it."""
    if not isinstance(compare_id, str) or not COMPARE_ID.fullmatch(compare_id):
        raise UserError("unknown comparison id (a comparison id is 8 hexadecimal characters)")
    return compare_id


def parse_budget(kind, value, max_steps: int) -> tuple[Optional[int], Optional[float]]:
    """The compare form's budget as ``(budget_steps, budget_seconds)``: steps from 1 to the server's
    ``max_steps``, or seconds of training above 0 (each run still stops at its preset's steps)."""
    if kind not in BUDGET_KINDS:
        raise UserError(f"the budget is counted in steps or seconds; got {str(kind)[:20]!r}")
    number = value
    if isinstance(value, str):
        text = value.strip()
        number = float(text) if _DECIMAL.fullmatch(text) else None
    if kind == "steps":
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or not float(number).is_integer() or not 1 <= number <= max_steps:
            raise UserError(f"the budget must be a whole number of steps from 1 to {max_steps}; "
                            f"got {str(value)[:20]!r}")
        return int(number), None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
        raise UserError(f"the budget must be a number of seconds above 0; got {str(value)[:20]!r}")
    return None, float(number)



class Service:
    """The endpoints over one state folder's job table and its backend."""

    def __init__(self, settings: Settings):
        self.settings = settings
        settings.outputs = Path(settings.outputs).expanduser().resolve()
        settings.state = Path(settings.state).expanduser().resolve()
        if settings.state == settings.outputs or settings.outputs in settings.state.parents \
                or settings.state in settings.outputs.parents:
            raise UserError("--state and --outputs must be separate folders (the outputs folder is served; "
                            "the state folder holds the job database and checkpoints)")
        settings.outputs.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.state / "jobs.sqlite", max_queued=settings.max_queued)
        runs = Path(settings.runs).expanduser().resolve() if settings.runs else settings.state / "runs"
        self.pool = make_backend(settings.backend, self.store, runs, settings.outputs, settings.devices,
                                 settings.ray_address, settings.max_restarts)
        # Local jobs died with the server that ran them; on a cluster the dispatcher reconciles.
        self.recovered = self.pool.recover()
        # The instant tab's model: its record now (cheap, torch-free), its weights on first use.
        self.instant_meta: Optional[dict] = None
        self.instant_step: Optional[int] = None
        if settings.amortised is not None:
            settings.amortised, self.instant_meta = read_meta(settings.amortised)
            self.instant_step = RunFolder(settings.amortised).step() or None
        self._instant_model = None
        self._instant_lock = threading.Lock()
        self._compare_locks: dict[str, threading.Lock] = {}  # one update (and rendering) of a comparison at a time
        self._compare_locks_lock = threading.Lock()

    # ---- endpoints (each a plain function of strings; UserError -> gr.Error) -----------------
    def submit(self, prompt, negative_prompt, guidance, representation, prior, steps, seeds, resolution,
               janus_retry=None):
        jobs = validate(self.settings, prompt, negative_prompt, guidance, representation, prior, steps, seeds,
                        resolution, janus_retry)
        return self.pool.submit([(request.to_dict(), max_steps) for request, max_steps in jobs])

    def status(self, job_id) -> dict:
        return self._status(self.store.get(check_job_id(job_id)))

    def jobs(self) -> list[dict]:
        """The listed jobs (the newest 50), from one read of the table: each job's status without its
        files and history (``status`` has those), so a poll of the list stays cheap."""
        return [self._summary(job) for job in self.store.list()]

    @staticmethod
    def _summary(job: Job) -> dict:
        return {"id": job.id, "status": job.status, "step": job.step, "max_steps": job.max_steps,
                "progress": round(job.progress, 4), "eta_seconds": job.eta_seconds, "error": job.error,
                "prompt": job.params.get("prompt"), "seed": job.params.get("seed"), "node": job.node,
                "restarts": job.restarts}

    def _status(self, job: Job) -> dict:
        public = self.settings.outputs / job.id
        run = RunFolder(job.run_dir).read_status() if job.run_dir else {}
        refine = run.get("refine") if isinstance(run.get("refine"), dict) else {}
        return {**self._summary(job), "history": job.history,
                "files": sorted(k for k in PUBLIC_NAMES if self._public_file(public, k) is not None),
                "manifest": self._manifest_hash(job),
                # stage 2: "refine" while the mesh is refined; its error when it failed for good
                "stage": run.get("stage") if run.get("status") == "running" else None,
                "refine_error": refine.get("error")}

    @staticmethod
    def _manifest_hash(job: Job) -> Optional[str]:
        """The short hash of the job's run recipe (its ``manifest.json``), once the run wrote one."""
        if not job.run_dir:
            return None
        try:
            return manifest_short_hash(json.loads(RunFolder(job.run_dir).manifest.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def verify(self, job_id, timeout_s: float = 900.0) -> dict:
        """`threedgen verify` on a finished job's run folder, in a child process (the server never
        imports torch for it): its report (``status``: bit-exact, within tolerance or diverged,
        ``text``: one line). A job that has not finished, or whose run cannot be verified, is a
        one-line UserError."""
        job = self.store.get(check_job_id(job_id))
        if job.status != "succeeded" or not job.run_dir:
            raise UserError(f"job {job.id} is {job.status}: only a finished job can be verified")
        try:
            proc = subprocess.run([sys.executable, "-m", "threedgen", "verify", job.run_dir, "--json"],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"verifying job {job.id} took over {timeout_s:.0f} s; run `threedgen verify` on its "
                            "run folder instead") from None
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("threedgen: error: ")]
        if proc.returncode not in (0, 1) or not proc.stdout.strip():
            reason = lines[-1].removeprefix("threedgen: error: ") if lines else f"exit code {proc.returncode}"
            raise UserError(f"job {job.id} cannot be verified: {reason}")
        report = json.loads(proc.stdout)
        self.store.record(job.id, "verified", result=report["status"], text=report["text"][:300])
        return report

    @staticmethod
    def _public_file(public: Path, kind: str) -> Optional[Path]:
        """A job's public file of a kind: its fixed name (a GIF for a video without an mp4), the
        newest step-named preview for ``preview``; None when there is none."""
        if kind == "preview":
            return latest_preview(public)
        path = public / PUBLIC_NAMES[kind]
        if kind == "video" and not path.is_file():
            path = path.with_suffix(".gif")
        return path if path.is_file() else None

    def curve(self, job_id) -> list[dict]:
        """The selected job's training curve: ``{"step", "value", "series"}`` rows of its loss and
        gradient norm, read from the run's own log (``logs/metrics.csv``, written by Lightning every
        ``log_every_n_steps``); empty before the first rows are flushed."""
        job = self.store.get(check_job_id(job_id))
        if not job.run_dir:
            return []
        return read_curve(RunFolder(job.run_dir).curve)

    def file(self, job_id, kind) -> str:
        """The public file of a job by kind (``glb``, ``obj``, ``mtl``, ``texture``, ``ply``, ``splats``, ``video``,
        ``preview``, ``metrics``); never a client-supplied path."""
        job = self.store.get(check_job_id(job_id))
        if kind not in PUBLIC_NAMES:
            raise UserError(f"unknown file kind {str(kind)[:40]!r}; valid: {', '.join(PUBLIC_NAMES)}")
        path = self._public_file(self.settings.outputs / job.id, kind)
        if path is None:
            raise UserError(f"job {job.id} has no {kind} file (status: {job.status})")
        return str(path)

    def cancel(self, job_id) -> str:
        return self.pool.cancel(check_job_id(job_id))

    def resume(self, job_id) -> str:
        self.pool.resume(check_job_id(job_id))
        return "queued"

    def instant(self, prompt) -> dict:
        """Generate ``prompt`` with the amortised model (``--amortised``) at once: the run folder in
        ``<state>/instant/``, its deliverables copied to ``<outputs>/instant/<run>/``. Bad input (empty,
        outside the prior's vocabulary, a word the model never saw) is a UserError before anything
        is written."""
        s = self.settings
        if s.amortised is None:
            raise UserError(INSTANT_OFF.replace("`", ""))
        clean_prompt(prompt)  # text, at most MAX_PROMPT_CHARS: before the model is loaded
        with self._instant_lock:  # one load, one generation at a time (the model is shared)
            if self._instant_model is None:
                from threedgen.amortised import AmortisedModel  # heavy (torch): only once instant generation is used

                self._instant_model = AmortisedModel(s.amortised)
            model = self._instant_model
            cfg = model.check_prompt(prompt)  # the one-line errors, before any folder exists
            run_dir = model.generate(prompt, s.state / INSTANT_FOLDER)
        status = RunFolder(run_dir).read_status()
        public = s.outputs / INSTANT_FOLDER / run_dir.name
        kinds = publish(run_dir, public)
        files = {kind: str(path) for kind in kinds if (path := self._public_file(public, kind)) is not None}
        return {"run": run_dir.name, "prompt": cfg.prompt, "words": list(cfg.prior.prompt_words(cfg.prompt)),
                "generate_ms": round(float(status["generate_seconds"]) * 1000, 2),
                "export_s": status.get("export_seconds"), "mask_iou": status.get("mask_iou"), "files": files}

    # ---- the workbench: every guidance method on one prompt (`threedgen compare`) ---------------
    def compare(self, prompt, negative_prompt, methods, representation, prior, seeds_text, budget_kind,
                budget_value) -> str:
        """Queue a comparison: every method in ``methods`` (a list of names, or ``"sds,vsd"`` /
        ``"all"``) x every seed in ``seeds_text`` (``"0,1,2"``), the same prompt and budget
        (``budget_kind`` ``steps`` or ``seconds``, ``budget_value`` the number), one job each, all
        in one submission (all or none). Its id (8 hexadecimal characters); its folder
        ``<outputs>/comparisons/<id>/`` holds the record at once. Bad input is a one-line UserError
        before anything is queued or written."""
        s = self.settings
        if not isinstance(prompt, str) or not isinstance(negative_prompt or "", str):
            raise UserError("prompt and negative prompt must be text")
        if isinstance(methods, (list, tuple)):
            if not all(isinstance(m, str) for m in methods):
                raise UserError("methods must be names of guidance methods, such as sds, vsd")
            methods = list(methods)
        elif methods is not None and not isinstance(methods, str):
            raise UserError("methods must be names of guidance methods, such as sds, vsd")
        try:  # the workbench's own checks, their words without the CLI's flags
            methods = cmp.parse_methods(methods)
            seeds = cmp.parse_seeds(seeds_text if isinstance(seeds_text, (str, list)) or seeds_text is None
                                    else str(seeds_text))
        except UserError as exc:
            raise UserError(re.sub(r"--(methods|seeds)\b", r"\1", str(exc))) from None
        REPRESENTATIONS[representation]  # an unknown name: the registry's own error
        if not isinstance(prior, str) or prior not in s.priors:
            raise UserError(f"prior {str(prior)[:40]!r} is not offered by this server; valid: {', '.join(s.priors)}")
        budget_steps, budget_seconds = parse_budget(budget_kind, budget_value, s.max_steps)
        queued = self.store.counts().get("queued", 0)
        room = s.max_queued - queued
        jobs = len(methods) * len(seeds)
        if jobs > room:
            raise UserError(f"{len(methods)} methods x {len(seeds)} seeds is {jobs} jobs; the queue has room for "
                            f"{max(room, 0)} now ({queued} waiting, at most {s.max_queued}): fewer methods or seeds, "
                            "or wait for some jobs to finish")
        planned = cmp.plan(prompt, methods, seeds, representation, prior, budget_steps, budget_seconds,
                           negative_prompt or "", tuple(s.overrides), max_jobs=room)
        for method, _, request in planned:
            if request.steps > s.max_steps:
                raise UserError(f"{method}: the preset runs {request.steps} steps, over this server's limit of "
                                f"{s.max_steps}; give a budget of steps from 1 to {s.max_steps}")
        first = planned[0][2]
        record = cmp.new_record(first.prompt, first.negative_prompt or "", methods, seeds, representation, first.prior,
                                budget_steps, budget_seconds, s.backend, s.state, planned)
        root = s.outputs / COMPARISONS
        root.mkdir(exist_ok=True)
        while True:  # a fresh folder of the record's id (another id on the rare clash)
            folder = root / record["compare"]
            try:
                folder.mkdir()
                break
            except FileExistsError:
                record["compare"] = uuid.uuid4().hex[:8]
        ids: list[str] = []
        try:
            ids = self.pool.submit([(cmp.job_params(record, method, seed, request), request.steps)
                                    for method, seed, request in planned])
            for run, job_id in zip(record["runs"], ids):
                run["job"] = job_id
            cmp.save(folder, record)
        except BaseException:  # a full queue queued none of them; a record that cannot be written, none stay
            for job_id in ids:
                try:
                    self.pool.cancel(job_id)
                except UserError:
                    pass
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return record["compare"]

    def _compare_folder(self, compare_id) -> Path:
        folder = self.settings.outputs / COMPARISONS / check_compare_id(compare_id)
        if not (folder / cmp.RECORD).is_file():
            raise UserError(f"no comparison {compare_id}")
        return folder

    def compare_status(self, compare_id) -> dict:
        """A comparison brought up to date from its jobs: ``record`` (``compare.json``'s contents),
        ``progress`` (one line), ``state`` (queued, running or finished) and, once every run is final,
        ``sheet`` and ``report`` (their paths; ``record_file`` always). Each run that succeeded is read
        once; its views are rendered (torch, in this process) once every run is final, and then the
        sheet and the report are written. ``busy``: another call is updating it (the record as saved)."""
        folder = self._compare_folder(compare_id)
        with self._compare_locks_lock:
            lock = self._compare_locks.setdefault(compare_id, threading.Lock())
        if not lock.acquire(blocking=False):
            return self._compare_answer(cmp.load(folder), folder, busy=True)
        try:
            record = cmp.load(folder)
            before = _record_key(record)
            ids = [r["job"] for r in record["runs"] if r.get("job")]
            jobs = {job.id: job for job in self.store.many(ids)} if ids else {}
            statuses = [jobs[r["job"]].status if r.get("job") in jobs else r.get("status") for r in record["runs"]]
            final = all(status in cmp.FINAL for status in statuses)
            try:
                cmp.collect(record, jobs, folder, render=final)
            except Exception as exc:  # an unexpected rendering failure: the sheet without those views, once
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                for run in record["runs"]:
                    if run.get("values") and run.get("views") is None and not run.get("views_error"):
                        run["views_error"] = reason
                cmp.collect(record, jobs, folder, render=False)
            changed = _record_key(record) != before
            from threedgen.compare_report import SHEET  # Pillow: only for a comparison

            if record["state"] == "finished" and (changed or not (folder / SHEET).is_file()):
                cmp.write_outputs(record, folder)
            elif changed:
                cmp.save(folder, record)
            return self._compare_answer(record, folder)
        finally:
            lock.release()

    @staticmethod
    def _compare_answer(record: dict, folder: Path, busy: bool = False) -> dict:
        from threedgen.compare_report import REPORT, SHEET  # Pillow: only for a comparison

        done = record.get("state") == "finished"
        sheet, report = folder / SHEET, folder / REPORT
        return {"id": folder.name, "record": record, "progress": cmp.progress_line(record),
                "state": record.get("state"),
                "sheet": str(sheet) if done and sheet.is_file() else None,
                "report": str(report) if done and report.is_file() else None,
                "record_file": str(folder / cmp.RECORD), "busy": busy}

    def comparisons(self, limit: int = 50) -> list[dict]:
        """The comparisons in the outputs folder, newest first (at most ``limit``): ``id``, ``prompt``,
        ``methods``, ``state`` (as last saved) and ``created``; a damaged record is left out."""
        root = self.settings.outputs / COMPARISONS
        out = []
        for folder in (root.iterdir() if root.is_dir() else ()):
            if not COMPARE_ID.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
                continue
            try:
                record = cmp.load(folder)
            except UserError:
                continue
            out.append({"id": folder.name, "prompt": str(record.get("prompt", "")),
                        "methods": list(record.get("methods") or []), "state": record.get("state"),
                        "created": str(record.get("created") or "")})
        out.sort(key=lambda c: (c["created"], c["id"]), reverse=True)
        return out[:limit]

    def close(self) -> None:
        self.pool.stop()


def _record_key(record: dict) -> str:
    """A record's contents less the time it was written: what tells whether it changed."""
    return json.dumps({k: v for k, v in record.items() if k != "written"}, sort_keys=True, default=str)


__all__ = ["Service", "Settings", "validate", "parse_seeds", "preset_steps", "read_curve", "parse_budget",
           "check_compare_id", "COMPARISONS"]
