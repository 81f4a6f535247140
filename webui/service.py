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
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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
from threedgen.schema import clean_prompt, is_ascii_integer

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


def validate(settings: Settings, prompt, negative_prompt, guidance, representation, prior, steps, seeds,
             resolution) -> list[tuple[RunRequest, int]]:
    """One job's request and its number of steps per seed, each checked exactly as `threedgen run`
    checks its input. ``steps`` empty (None, "") means the preset's."""
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
    jobs = []
    for seed in parse_seeds(seeds):
        request, cfg = RunRequest(
            prompt=prompt, negative_prompt=negative_prompt or "", guidance=guidance, representation=representation,
            prior=prior, steps=steps, seed=seed, resolution=int(resolution) if resolution not in (None, "") else None,
            overrides=tuple(settings.overrides)).checked()  # every check of `threedgen run`, once
        if cfg.steps > settings.max_steps:
            raise UserError(f"the preset runs {cfg.steps} steps, over this server's limit of {settings.max_steps}; "
                            f"give steps from 1 to {settings.max_steps}")
        jobs.append((request, cfg.steps))
    return jobs


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

    # ---- endpoints (each a plain function of strings; UserError -> gr.Error) -----------------
    def submit(self, prompt, negative_prompt, guidance, representation, prior, steps, seeds, resolution):
        jobs = validate(self.settings, prompt, negative_prompt, guidance, representation, prior, steps, seeds,
                        resolution)
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

    def close(self) -> None:
        self.pool.stop()


__all__ = ["Service", "Settings", "validate", "parse_seeds", "preset_steps", "read_curve"]
