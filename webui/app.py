"""``threedgen webui``: a Gradio Blocks app over the durable job queue.

Every endpoint validates on the server (the API bypasses the form's limits) and answers bad input
with ``gr.Error`` (one line). Files are looked up by job id and a fixed kind, never by a path from
the client. Gradio may serve only the outputs folder (``allowed_paths``); the job database and the
run folders with their checkpoints live in the state folder, outside it.

With ``--amortised MODEL`` the "Instant" tab generates from an amortised model in the server
process (loaded on first use): run folders in ``<state>/instant/``, deliverables copied to
``<outputs>/instant/<run>/``.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from threedgen.amortised_folder import read_meta
from threedgen.devices import cuda_for_auto
from threedgen.errors import UserError
from threedgen.guidance.config import GUIDANCE
from threedgen.guidance.priors.shapes.vocab import FRONT_MARKERS, SHAPES
from threedgen.representations.config import REPRESENTATIONS
from threedgen.request import RunRequest
from threedgen.schema import MAX_PROMPT_CHARS, clean_prompt, is_ascii_integer
from threedgen.webui.auth import LoginLimiter, LoginRateLimit, NoUploads, read_auth  # read_auth: re-exported
from threedgen.webui.backends import make_backend
from threedgen.webui.jobs import Job, JobStore, check_job_id
from threedgen.webui.rest import rest_routes
from threedgen.webui.worker import PUBLIC_NAMES, _run_step, latest_preview, publish

# A local app does not phone home (Gradio's usage analytics and version check), and only the
# outputs folder is served: a GRADIO_ALLOWED_PATHS from the environment would widen that.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.pop("GRADIO_ALLOWED_PATHS", None)

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


def steps_info(guidance, representation, prior) -> str:
    """The Steps box's hint: what an empty box runs for these components."""
    steps = preset_steps(guidance, representation, prior)
    return "empty: the preset's" + (f" {steps}" if steps is not None else "") + " steps"


def preset_steps(guidance, representation, prior) -> Optional[int]:
    """The steps a job of these components runs when the form's Steps box is empty (the presets'
    value, as `threedgen run` would use); None for a combination that does not resolve."""
    try:
        return RunRequest(guidance=guidance, representation=representation, prior=prior,
                          device="cpu").resolve(whole_run=False)[0].cfg.steps
    except UserError:
        return None


def _fmt_eta(job: Job) -> str:
    eta = job.eta_seconds
    if eta is None:
        return "" if job.status != "queued" else "waiting"
    return f"{int(eta // 60)}:{int(eta % 60):02d}"


def job_row(job: Job) -> list:
    p = job.params
    return [job.id, p.get("prompt", ""), p.get("guidance", ""), p.get("representation", ""), p.get("seed", ""),
            job.status, f"{job.step}/{job.max_steps}", _fmt_eta(job)]


SHAPES_PROMPT_INFO = (f'shapes prior: "a <colour> <shape>"; shapes: {", ".join(SHAPES)}. The '
                      + ", ".join(f"{s} ({m})" for s, m in FRONT_MARKERS.items())
                      + " have a front, marked in magenta (reserved)")
EXAMPLE_PROMPTS = [["a red cube"], ["a blue torus"], ["a green house"], ["a blue mug"], ["a yellow head"]]


def score_line(metrics_path) -> str:
    """The score of a finished shapes-prior job as one Markdown line (with the Janus metrics when
    the object has a front); empty when the file cannot be read."""
    try:
        m = json.loads(Path(metrics_path).read_text())
        line = f"\n\nmask IoU {float(m['mask_iou']):.3f} · PSNR {float(m['psnr']):.1f} dB"
        if m.get("normal_error_deg") is not None:
            line += (f" · normal error {float(m['normal_error_deg']):.1f}° · height {float(m['height_error']):+.3f} m"
                     f" · {'watertight' if m.get('watertight') else 'not watertight'}")
        if m.get("front_markers") is not None:
            line += (f" · front markers {int(m['front_markers'])} ({'Janus' if m.get('janus') else 'one face'}) · "
                     f"Janus view rate {float(m['janus_view_rate']):.2f} · view MI {float(m['view_mi']):.2f}")
        return line
    except (OSError, ValueError, KeyError, TypeError):
        return ""


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


def curve_frame(rows: list[dict]):
    """The plot's data: ``step`` as integers and ``value`` as floats even with no rows yet (an empty
    frame's columns are Python objects, which the plot drew as categories: piles of labels that
    stayed once the numbers came)."""
    import pandas as pd  # heavy: ships with Gradio

    frame = pd.DataFrame(rows, columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


def _escape_md(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", html.escape(text, quote=True))


INSTANT_OFF = ("Instant generation is off on this server: start it with `threedgen webui --amortised MODEL`, "
               "a model folder trained by `threedgen train-amortised PROMPTS.txt`.")
INSTANT_FOLDER = "instant"  # <state>/instant: the run folders; <outputs>/instant: their public copies


def model_summary(meta: dict, step: Optional[int] = None) -> str:
    """What an amortised model knows, as Markdown: its word groups and its training prompts."""
    groups = meta.get("word_groups") or [{"kind": "words", "words": meta.get("words", [])}]
    knows = "; ".join(f"{_escape_md(str(g['kind']))}: {_escape_md(', '.join(map(str, g['words'])))}"
                      for g in groups)
    trained = f"{len(meta['prompts'])} training prompts" + (f", {step} steps" if step else "")
    return (f"Instant generation from an amortised model ({_escape_md(str(meta['prior']))} prior, {trained}): one "
            f"pass of its generator, no optimisation. It knows {knows}, and any combination of them, including "
            "ones it never trained on.")


def instant_examples(meta: dict, held_out: int = 3, trained: int = 2) -> list[list[str]]:
    """Example prompts for the instant tab: combinations of known words that no training prompt
    used (for a model of colours and shapes), then a few training prompts."""
    prompts = [str(p) for p in meta["prompts"]]
    groups = meta.get("word_groups") or []
    new: list[str] = []
    if [g.get("kind") for g in groups] == ["colours", "shapes"]:
        seen = {p.strip().lower() for p in prompts}
        for colour in groups[0]["words"]:
            for shape in groups[1]["words"]:
                prompt = f"{'an' if colour[:1] in 'aeiou' else 'a'} {colour} {shape}"
                if prompt not in seen and len(new) < held_out:
                    new.append(prompt)
    return [[p] for p in new + prompts[:trained]]


class WebUI:
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
        self.recovered = self.store.recover() if settings.backend == "local" else []
        # The instant tab's model: its record now (cheap, torch-free), its weights on first use.
        self.instant_meta: Optional[dict] = None
        self.instant_step: Optional[int] = None
        if settings.amortised is not None:
            settings.amortised, self.instant_meta = read_meta(settings.amortised)
            self.instant_step = _run_step(settings.amortised) or None
        self._instant_model = None
        self._instant_lock = threading.Lock()

    # ---- endpoints (each a plain function of strings; UserError -> gr.Error) -----------------
    def submit(self, prompt, negative_prompt, guidance, representation, prior, steps, seeds, resolution):
        jobs = validate(self.settings, prompt, negative_prompt, guidance, representation, prior, steps, seeds,
                        resolution)
        return self.store.submit_many([(request.to_dict(), max_steps) for request, max_steps in jobs])

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
        return {**self._summary(job), "history": job.history,
                "files": sorted(k for k in PUBLIC_NAMES if self._public_file(public, k) is not None)}

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
        return read_curve(Path(job.run_dir) / "logs" / "metrics.csv")

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
        return self.store.cancel(check_job_id(job_id))

    def resume(self, job_id) -> str:
        self.store.resume(check_job_id(job_id))
        return "queued"

    def table(self) -> list[list]:
        return [job_row(j) for j in self.store.list()]

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
        status = json.loads((run_dir / "status.json").read_text())
        public = s.outputs / INSTANT_FOLDER / run_dir.name
        kinds = publish(run_dir, public)
        files = {kind: str(path) for kind in kinds if (path := self._public_file(public, kind)) is not None}
        return {"run": run_dir.name, "prompt": cfg.prompt, "words": list(cfg.prior.prompt_words(cfg.prompt)),
                "generate_ms": round(float(status["generate_seconds"]) * 1000, 2),
                "export_s": status.get("export_seconds"), "mask_iou": status.get("mask_iou"), "files": files}

    def instant_view(self, prompt):
        """The instant tab after a click: its line of text, preview, GLB, turntable and downloads."""
        r = guard(self.instant)(prompt)
        files = r["files"]
        line = (f"**{_escape_md(r['prompt'])}** · generated in {r['generate_ms']:.1f} ms "
                f"(export {float(r['export_s'] or 0):.1f} s)")
        if "metrics" in files:
            line += score_line(files["metrics"])
        downloads = [files[k] for k in ("glb", "obj", "mtl", "texture", "ply", "video") if k in files]
        return line, files.get("preview"), files.get("glb"), files.get("video"), downloads

    # ---- the page ----------------------------------------------------------------------------
    def job_view(self, job_id):
        """The selected job's line of text, preview, GLB, splats, video, downloads and curve rows."""
        if not job_id:
            return "Select a job.", None, None, None, None, [], []
        st = guard(self.status)(job_id)
        files = {k: self.file(job_id, k) for k in st["files"]}
        line = (f"**{st['status']}** · step {st['step']}/{st['max_steps']} · "
                f"prompt: {_escape_md(st['prompt'] or '')} · seed {st['seed']}")
        if st["eta_seconds"] is not None:
            line += f" · ETA {int(st['eta_seconds'])} s"
        if st["node"]:
            line += f" · node {_escape_md(st['node'])}"
        faults = [e for e in st["history"] if e.get("event") == "interrupted"]
        if faults:
            line += "\n\n" + "; ".join(f"interrupted ({_escape_md(str(e.get('reason', '')))}) at "
                                        f"{time.strftime('%H:%M:%S', time.localtime(e['time']))}" for e in faults)
            line += f" · automatic restarts {st['restarts']}"
        if st["error"]:
            line += f"\n\n{_escape_md(st['error'])}"
        if "metrics" in files:
            line += score_line(files["metrics"])
        downloads = [files[k] for k in ("glb", "obj", "mtl", "texture", "ply", "splats", "video") if k in files]
        return (line, files.get("preview"), files.get("glb"), files.get("splats"), files.get("video"), downloads,
                self.curve(job_id))

    def refresh(self, job_id, shown=None):
        """The job list and the selected job's view; the 3D viewers, video and downloads are sent
        only when the job or its status changed (so the viewers do not reload every tick)."""
        import gradio as gr  # heavy: only once the page exists

        rows = self.table()
        line, image, glb, splats, mp4, files, curve = self.job_view(job_id)
        key = [job_id, next((r[5] for r in rows if r[0] == job_id), None)]
        if key == shown:
            glb, splats, mp4, files = gr.update(), gr.update(), gr.update(), gr.update()
        plot = curve_frame(curve)
        return rows, gr.update(choices=[r[0] for r in rows]), line, image, glb, splats, mp4, files, plot, key

    def _api(self, gr) -> None:
        """The API: plain values in and out, for gradio_client and scripts (inside the Blocks)."""
        api_in = [gr.Textbox(visible=False) for _ in range(8)]
        api_out = gr.JSON(visible=False)
        job_in, kind_in = gr.Textbox(visible=False), gr.Textbox(visible=False)
        file_out = gr.File(visible=False)
        gr.Button(visible=False).click(guard(lambda *a: {"jobs": self.submit(*a)}), api_in, api_out, api_name="submit")
        gr.Button(visible=False).click(guard(self.status), [job_in], api_out, api_name="status")
        gr.Button(visible=False).click(guard(lambda j: {"status": self.cancel(j)}), [job_in], api_out, api_name="cancel")
        gr.Button(visible=False).click(guard(lambda j: {"status": self.resume(j)}), [job_in], api_out, api_name="resume")
        gr.Button(visible=False).click(guard(lambda: {"jobs": self.jobs()}), None, api_out, api_name="jobs")
        gr.Button(visible=False).click(guard(self.file), [job_in, kind_in], file_out, api_name="download")
        prompt_in = gr.Textbox(visible=False)
        gr.Button(visible=False).click(guard(self.instant), [prompt_in], api_out, api_name="instant")

    def _instant_tab(self, gr) -> None:
        """The instant tab's contents (inside its ``gr.Tab``): one line without a model."""
        meta = self.instant_meta
        if meta is None:
            gr.Markdown(INSTANT_OFF)
            return
        examples = instant_examples(meta)
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown(model_summary(meta, self.instant_step))
                prompt = gr.Textbox(label="Prompt", value=examples[0][0] if examples else "",
                                    max_length=MAX_PROMPT_CHARS, info="a combination of the words above")
                if examples:
                    gr.Examples(examples, [prompt], label="Examples (held-out combinations first)")
                make = gr.Button("Create instantly", variant="primary")
                line = gr.Markdown("")
            with gr.Column(scale=2):
                preview = gr.Image(label="Preview", type="filepath", interactive=False, height=300)
                with gr.Row():
                    model = gr.Model3D(label="Mesh (GLB)", interactive=False, height=360)
                    video = gr.Video(label="Turntable", interactive=False, height=300)
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)
        make.click(self.instant_view, [prompt], [line, preview, model, video, downloads], api_visibility="private")
        prompt.submit(self.instant_view, [prompt], [line, preview, model, video, downloads], api_visibility="private")

    def blocks(self):
        import gradio as gr  # heavy: only when the page is built

        s = self.settings

        def on_submit(*form):
            ids = guard(self.submit)(*form)
            return {"jobs": ids}, self.table(), gr.update(choices=[r[0] for r in self.table()], value=ids[0])

        def act(method):
            def handler(job_id):
                guard(method)(job_id)
                return self.refresh(job_id)
            return handler

        with gr.Blocks(title="threedgen") as demo:
            gr.Markdown("# threedgen\nText to 3D by score distillation. Jobs run on the server and survive "
                        "closed tabs and restarts.")
            with gr.Tabs():
                with gr.Tab("Per-prompt job", id="jobs"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            prompt = gr.Textbox(label="Prompt", value="a red cube", max_length=1000,
                                                info=SHAPES_PROMPT_INFO)
                            gr.Examples(EXAMPLE_PROMPTS, [prompt], label="Shapes prior examples")
                            negative = gr.Textbox(label="Negative prompt", value="", max_length=1000)
                            guidance = gr.Dropdown([(f"{e.name} ({e.summary})", e.name) for e in GUIDANCE.entries()],
                                                   value="sds", label="Guidance")
                            representation = gr.Dropdown(REPRESENTATIONS.names(), value="nerf",
                                                         label="Representation")
                            prior = gr.Dropdown(s.priors, value=s.priors[0], label="Prior")
                            steps = gr.Number(value=None, label="Steps", precision=0, minimum=1, maximum=s.max_steps,
                                              info=steps_info("sds", "nerf", s.priors[0]))
                            seeds = gr.Textbox(value="0", label="Seeds",
                                               info=f"0, or 0, 1, 2, or 0-3 (at most {MAX_SEEDS})")
                            resolution = gr.Dropdown([str(r) for r in RESOLUTIONS], value=None,
                                                     label="Render resolution", info="empty: the prior's default")
                            submit = gr.Button("Generate", variant="primary")
                            submitted = gr.JSON(label="Submitted", visible=True)
                        with gr.Column(scale=2):
                            jobs = gr.Dataframe(headers=TABLE_HEADERS, value=self.table(), interactive=False,
                                                label="Jobs", datatype=["str"] * len(TABLE_HEADERS))
                            selected = gr.Dropdown(choices=[r[0] for r in self.table()], label="Job",
                                                   allow_custom_value=False)
                            info = gr.Markdown("Select a job.")
                            with gr.Row():
                                cancel = gr.Button("Cancel")
                                resume = gr.Button("Resume")
                            preview = gr.Image(label="Preview (latest step)", type="filepath", interactive=False,
                                               height=300)
                            with gr.Row():
                                video = gr.Video(label="Turntable", interactive=False, height=300)
                                curve = gr.LinePlot(x="step", y="value", color="series",
                                                    label="Loss and gradient norm", height=300)
                            with gr.Row():
                                model = gr.Model3D(label="Mesh (GLB)", interactive=False, height=360)
                                splats = gr.Model3D(label="Gaussian splats (PLY; Gaussian jobs)", interactive=False,
                                                    height=360)
                            downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)
                with gr.Tab("Instant (amortised model)", id="instant"):
                    self._instant_tab(gr)
            form = [prompt, negative, guidance, representation, prior, steps, seeds, resolution]
            view = [info, preview, model, splats, video, downloads, curve]
            shown = gr.State(None)
            submit.click(on_submit, form, [submitted, jobs, selected], api_name="submit_form", api_visibility="private")
            for menu in (guidance, representation, prior):  # the Steps box says what empty means for the choice
                menu.change(lambda g, r, p: gr.update(info=steps_info(g, r, p)), [guidance, representation, prior],
                            [steps], api_visibility="private")
            selected.change(self.refresh, [selected], [jobs, selected, *view, shown], api_visibility="private")
            outputs = [jobs, selected, *view, shown]
            cancel.click(act(self.cancel), [selected], outputs, api_visibility="private")
            resume.click(act(self.resume), [selected], outputs, api_visibility="private")
            timer = gr.Timer(2.0)
            timer.tick(self.refresh, [selected, shown], outputs, api_visibility="private")
            self._api(gr)
        return demo

    def launch(self, host: str = "127.0.0.1", port: Optional[int] = None, auth=None, block: bool = True,
               login_limiter: Optional[LoginLimiter] = None):
        """Serve the page. ``auth``: Gradio's ``auth=`` (``read_auth``'s callable). With a login, failed
        logins are rate-limited per client address by ``login_limiter`` (default: 19 a minute), an
        ASGI middleware on Gradio's FastAPI app that answers 429 before the password is checked."""
        from starlette.middleware import Middleware  # heavy: ships with Gradio

        if auth is not None and login_limiter is None:
            login_limiter = LoginLimiter()
        # The polling API (GET /api/v1/status/ID, /api/v1/jobs) is plain routes before Gradio's own:
        # FastAPI(routes=[...], middleware=[...]), through Blocks.launch(app_kwargs=...).
        app_kwargs = {"routes": rest_routes(self, auth, login_limiter or LoginLimiter()),
                      "middleware": [Middleware(NoUploads)]}
        if login_limiter is not None:
            app_kwargs["middleware"].append(Middleware(LoginRateLimit, limiter=login_limiter))
        self.pool.start()
        demo = self.blocks()
        demo.queue(default_concurrency_limit=8)
        demo.launch(server_name=host, server_port=port, share=False, auth=auth, ssr_mode=False,
                    allowed_paths=[str(self.settings.outputs)], prevent_thread_lock=not block, quiet=True,
                    show_error=True, max_file_size="1mb", app_kwargs=app_kwargs)
        return demo

    def close(self, demo=None) -> None:
        if demo is not None:
            demo.close()
        self.pool.stop()


def guard(fn):
    """``fn`` with a UserError turned into a ``gr.Error``: one line on the page, no traceback."""

    def wrapped(*args):
        try:
            return fn(*args)
        except UserError as exc:
            import gradio as gr  # heavy: only in a running web UI

            raise gr.Error(str(exc), print_exception=False) from None

    wrapped.__name__ = getattr(fn, "__name__", "handler")
    return wrapped


def default_devices(workers: Optional[int]) -> list[str]:
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


def wait_forever(ui: WebUI, demo) -> None:  # pragma: no cover - interactive
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ui.close(demo)


__all__ = ["WebUI", "Settings", "validate", "parse_seeds", "read_auth", "default_devices"]
