"""``threedgen webui``'s page: the Gradio Blocks layout over the service (``threedgen.webui.service``,
the endpoints) and the server's launch (login, rate limit, the REST routes).

Bad input from any endpoint is a ``gr.Error`` (one line, no traceback). Gradio may serve only the
outputs folder (``allowed_paths``).
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from threedgen.errors import UserError
from threedgen.guidance.config import GUIDANCE
from threedgen.guidance.priors.shapes.vocab import FRONT_MARKERS, SHAPES
from threedgen.jobs.store import Job
from threedgen.representations.config import REPRESENTATIONS
from threedgen.request import DEFAULT_GUIDANCE, DEFAULT_REPRESENTATION
from threedgen.schema import MAX_JANUS_RETRIES, MAX_PROMPT_CHARS
from threedgen.webui.auth import LoginLimiter, LoginRateLimit, NoUploads, read_auth  # read_auth: re-exported
from threedgen.webui.rest import rest_routes
from threedgen.webui.service import (  # Settings, validate, parse_seeds: re-exported
    BUDGET_KINDS,
    CURVE_SERIES,
    INSTANT_OFF,
    MAX_SEEDS,
    RESOLUTIONS,
    Service,
    Settings,
    parse_seeds,
    preset_steps,
    validate,
)

TABLE_HEADERS = ["job", "prompt", "guidance", "representation", "seed", "status", "progress", "ETA"]


COMPARE_HEADERS = ["method", "seed", "status", "step", "error", "job"]
COMPARE_IDLE = "Start a comparison, or reopen a past one."


def compare_row(run: dict) -> list:
    """One run of a comparison in its table (the views' error when the run succeeded but could not
    be drawn)."""
    step = f"{run.get('step') or 0}/{run['max_steps']}" if run.get("max_steps") else ""
    return [run.get("method", ""), str(run.get("seed", "")), run.get("status", ""), step,
            run.get("error") or run.get("views_error") or "", run.get("job") or ""]


def compare_choice(c: dict) -> tuple[str, str]:
    """A past comparison in the dropdown: ``(label, id)``."""
    n = len(c["methods"])
    label = f"{c['id']} · {c['prompt'][:60]} · {n} method{'' if n == 1 else 's'} · {c['state']} · {c['created']}"
    return label, c["id"]


def compare_line(st: dict) -> str:
    """A comparison's line of text (Markdown, escaped)."""
    r = st["record"]
    budget = r.get("budget") or {}
    words = (f"{budget['seconds']:g} s of training" if budget.get("seconds") is not None
             else f"{budget.get('steps')} steps")
    line = (f"**{r.get('state')}** · {_escape_md(st['progress'])} · comparison `{st['id']}` · prompt: "
            f"{_escape_md(str(r.get('prompt', '')))} · {_escape_md(str(r.get('representation')))}, "
            f"{_escape_md(str(r.get('prior')))} prior · budget {_escape_md(words)} per run · seeds "
            f"{_escape_md(', '.join(map(str, r.get('seeds', []))))}")
    if r.get("state") == "finished" and st.get("sheet") is None:
        line += " · writing the sheet" if st.get("busy") else ""
    elif r.get("state") != "finished":
        line += " · the views and the sheet come once every run has finished"
    return line


def steps_info(guidance, representation, prior) -> str:
    """The Steps box's hint: what an empty box runs for these components."""
    steps = preset_steps(guidance, representation, prior)
    return "empty: the preset's" + (f" {steps}" if steps is not None else "") + " steps"


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
    """The score of a finished job as one Markdown line: a shapes-prior job's against the truth
    (with the Janus metrics when the object has a front), and the prior's Janus check of any job;
    empty when the file cannot be read."""
    try:
        m = json.loads(Path(metrics_path).read_text())
        prior = m.get("janus_score_prior")
        janus = (f"prior's Janus check {float(prior):.2f} (back views it calls a front)" if prior is not None else "")
        if "mask_iou" not in m:  # a prior without a truth: its Janus check alone
            return f"\n\n{janus}" if janus else ""
        line = f"\n\nmask IoU {float(m['mask_iou']):.3f} · PSNR {float(m['psnr']):.1f} dB"
        if janus:
            line += f" · {janus}"
        if m.get("normal_error_deg") is not None:
            line += (f" · normal error {float(m['normal_error_deg']):.1f}° · height {float(m['height_error']):+.3f} m"
                     f" · {'watertight' if m.get('watertight') else 'not watertight'}")
        if m.get("front_markers") is not None:
            line += (f" · front markers {int(m['front_markers'])} ({'Janus' if m.get('janus') else 'one face'}) · "
                     f"Janus view rate {float(m['janus_view_rate']):.2f} · view MI {float(m['view_mi']):.2f}")
        return line
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def curve_frame(rows: list[dict]):
    """The plot's data: ``step`` as integers and ``value`` as floats even with no rows yet (an empty
    frame's columns are Python objects, which the plot drew as categories: piles of labels that
    stayed once the numbers came)."""
    import pandas as pd  # heavy: ships with Gradio

    frame = pd.DataFrame(rows, columns=["step", "value", "series"])
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


def _escape_md(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", html.escape(text, quote=True))


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


class WebUI(Service):
    """The page: the service's endpoints laid out with Gradio, and the server that serves them."""

    def __init__(self, settings: Settings):
        # A local app does not phone home (Gradio's usage analytics and version check), and only the
        # outputs folder is served: a GRADIO_ALLOWED_PATHS from the environment would widen that.
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        os.environ.pop("GRADIO_ALLOWED_PATHS", None)
        super().__init__(settings)

    def table(self) -> list[list]:
        return [job_row(j) for j in self.store.list()]

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

    def compare_choices(self) -> list[tuple[str, str]]:
        return [compare_choice(c) for c in self.comparisons()]

    def compare_view(self, compare_id, shown=None):
        """The Compare tab for a comparison: its line of text, the runs' table, the sheet, the downloads
        (report.html, sheet.png, compare.json; once every run is final), the past comparisons, the
        timer (ticking while the comparison runs) and what was shown. The sheet, the downloads and the
        past comparisons are sent only when the comparison or its state changed."""
        import gradio as gr  # heavy: only once the page exists

        if not compare_id:
            return (COMPARE_IDLE, [], None, None, gr.update(choices=self.compare_choices()), gr.Timer(active=False),
                    None)
        st = guard(self.compare_status)(compare_id)
        record = st["record"]
        finished = record.get("state") == "finished"
        files = [p for p in (st["report"], st["sheet"], st["record_file"]) if p] if finished else None
        key = [compare_id, record.get("state"), st["sheet"]]
        sheet = st["sheet"] if finished else None
        # The list of past comparisons (a read of every record) only when this one started or changed state.
        menu = gr.update(choices=self.compare_choices(), value=compare_id)
        if key == shown:
            sheet, files, menu = gr.update(), gr.update(), gr.update()
        return (compare_line(st), [compare_row(r) for r in record["runs"]], sheet, files, menu,
                gr.Timer(active=not finished or st.get("busy") or st["sheet"] is None), key)

    def compare_tick(self, compare_id, shown=None):
        """The timer's update of the Compare tab: as ``compare_view``, but a comparison that went away
        (its folder deleted) stops the timer with its line instead of an error every tick."""
        import gradio as gr  # heavy: only once the page exists

        try:
            return self.compare_view(compare_id, shown)
        except gr.Error as exc:
            return (_escape_md(str(exc.message)), [], None, None, gr.update(choices=self.compare_choices()),
                    gr.Timer(active=False), None)

    # ---- the page ----------------------------------------------------------------------------
    def job_view(self, job_id):
        """The selected job's line of text, preview, GLB, splats, video, downloads and curve rows."""
        if not job_id:
            return "Select a job.", None, None, None, None, [], []
        st = guard(self.status)(job_id)
        files = {k: self.file(job_id, k) for k in st["files"]}
        line = (f"**{st['status']}** · step {st['step']}/{st['max_steps']} · "
                f"prompt: {_escape_md(st['prompt'] or '')} · seed {st['seed']}")
        if st.get("stage") == "refine":
            line += " · refining the mesh (stage 2)"
        if st["eta_seconds"] is not None:
            line += f" · ETA {int(st['eta_seconds'])} s"
        if st["node"]:
            line += f" · node {_escape_md(st['node'])}"
        if st.get("manifest"):
            line += f" · recipe `{st['manifest']}`"
        verified = [e for e in st["history"] if e.get("event") == "verified"]
        if verified:
            line += f"\n\nverified: {_escape_md(str(verified[-1].get('text', '')))}"
        faults = [e for e in st["history"] if e.get("event") == "interrupted"]
        if faults:
            line += "\n\n" + "; ".join(f"interrupted ({_escape_md(str(e.get('reason', '')))}) at "
                                        f"{time.strftime('%H:%M:%S', time.localtime(e['time']))}" for e in faults)
            line += f" · automatic restarts {st['restarts']}"
        if st["error"]:
            line += f"\n\n{_escape_md(st['error'])}"
        if st.get("refine_error"):
            line += f"\n\nthe mesh refinement failed ({_escape_md(st['refine_error'])}); the files are the stage-1 asset"
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
        # No rows yet: no plot at all. A plot first drawn from an empty frame took its axes from it
        # (categories, when the columns were objects) and drew no lines when the rows came; one
        # that starts from nothing is drawn from its first rows, as after a page reload.
        plot = curve_frame(curve) if curve else None
        return rows, gr.update(choices=[r[0] for r in rows]), line, image, glb, splats, mp4, files, plot, key

    def _api(self, gr) -> None:
        """The API: plain values in and out, for gradio_client and scripts (inside the Blocks)."""
        api_in = [gr.Textbox(visible=False) for _ in range(8)] + [gr.Textbox(value="0", visible=False)]  # 9th: Janus retries
        api_out = gr.JSON(visible=False)
        job_in, kind_in = gr.Textbox(visible=False), gr.Textbox(visible=False)
        file_out = gr.File(visible=False)
        gr.Button(visible=False).click(guard(lambda *a: {"jobs": self.submit(*a)}), api_in, api_out, api_name="submit")
        gr.Button(visible=False).click(guard(self.status), [job_in], api_out, api_name="status")
        gr.Button(visible=False).click(guard(lambda j: {"status": self.cancel(j)}), [job_in], api_out, api_name="cancel")
        gr.Button(visible=False).click(guard(lambda j: {"status": self.resume(j)}), [job_in], api_out, api_name="resume")
        gr.Button(visible=False).click(guard(self.verify), [job_in], api_out, api_name="verify")
        gr.Button(visible=False).click(guard(lambda: {"jobs": self.jobs()}), None, api_out, api_name="jobs")
        gr.Button(visible=False).click(guard(self.file), [job_in, kind_in], file_out, api_name="download")
        prompt_in = gr.Textbox(visible=False)
        gr.Button(visible=False).click(guard(self.instant), [prompt_in], api_out, api_name="instant")
        # The workbench: methods "sds,vsd" or "all", seeds "0,1,2", budget kind "steps" or "seconds".
        compare_in = [gr.Textbox(visible=False) for _ in range(8)]
        compare_id_in = gr.Textbox(visible=False)
        gr.Button(visible=False).click(guard(lambda *a: {"compare": self.compare(*a)}), compare_in, api_out,
                                       api_name="compare")
        gr.Button(visible=False).click(guard(self.compare_status), [compare_id_in], api_out, api_name="compare_status")
        gr.Button(visible=False).click(guard(lambda: {"comparisons": self.comparisons()}), None, api_out,
                                       api_name="comparisons")

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

    def _compare_tab(self, gr) -> SimpleNamespace:
        """The Compare tab's contents (inside its ``gr.Tab``): the form, the runs side by side, the
        sheet and the downloads, and the past comparisons."""
        s = self.settings
        c = SimpleNamespace()
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("Every chosen guidance method on the same prompt, seeds and budget: one job per "
                            "method x seed, then a comparison sheet and report.")
                c.prompt = gr.Textbox(label="Prompt", value="a red cube", max_length=MAX_PROMPT_CHARS,
                                      info=SHAPES_PROMPT_INFO)
                c.negative = gr.Textbox(label="Negative prompt", value="", max_length=MAX_PROMPT_CHARS)
                c.methods = gr.CheckboxGroup([(f"{e.name} ({e.summary})", e.name) for e in GUIDANCE.entries()],
                                             value=GUIDANCE.names(), label="Guidance methods", show_select_all=True)
                c.representation = gr.Dropdown(REPRESENTATIONS.names(), value=DEFAULT_REPRESENTATION,
                                               label="Representation")
                c.prior = gr.Dropdown(s.priors, value=s.priors[0], label="Prior")
                c.seeds = gr.Textbox(value="0", label="Seeds", info="comma-separated, e.g. 0, 1, 2: every method runs "
                                                                     "each seed")
                with gr.Row():
                    c.budget_kind = gr.Radio(list(BUDGET_KINDS), value="steps", label="Budget in")
                    c.budget_value = gr.Number(value=min(100, s.max_steps), label="Budget per run", minimum=0,
                                               info=f"steps (1 to {s.max_steps}), or seconds of training (each run "
                                                    "stops at its preset's steps at most)")
                c.start = gr.Button("Start comparison", variant="primary")
            with gr.Column(scale=2):
                c.selected = gr.Dropdown(choices=self.compare_choices(), value=None, label="Comparison (reopen a "
                                         "past one)", allow_custom_value=False)
                c.info = gr.Markdown(COMPARE_IDLE)
                c.runs = gr.Dataframe(headers=COMPARE_HEADERS, value=[], interactive=False, label="Runs",
                                      datatype=["str"] * len(COMPARE_HEADERS))
                c.sheet = gr.Image(label="Comparison sheet", type="filepath", interactive=False)
                c.downloads = gr.File(label="Downloads (report.html, sheet.png, compare.json)", file_count="multiple",
                                      interactive=False)
                c.timer = gr.Timer(2.0, active=False)
                c.shown = gr.State(None)
                c.started = gr.State(None)  # the id of the comparison just queued
        c.values = [c.prompt, c.negative, c.methods, c.representation, c.prior, c.seeds, c.budget_kind, c.budget_value]
        c.view = [c.info, c.runs, c.sheet, c.downloads, c.selected, c.timer, c.shown]
        return c

    def _form(self, gr) -> SimpleNamespace:
        """The job form (inside its column): prompt, components, steps, seeds, resolution."""
        s = self.settings
        f = SimpleNamespace()
        f.prompt = gr.Textbox(label="Prompt", value="a red cube", max_length=MAX_PROMPT_CHARS, info=SHAPES_PROMPT_INFO)
        gr.Examples(EXAMPLE_PROMPTS, [f.prompt], label="Shapes prior examples")
        f.negative = gr.Textbox(label="Negative prompt", value="", max_length=MAX_PROMPT_CHARS)
        f.guidance = gr.Dropdown([(f"{e.name} ({e.summary})", e.name) for e in GUIDANCE.entries()],
                                 value=DEFAULT_GUIDANCE, label="Guidance")
        f.representation = gr.Dropdown(REPRESENTATIONS.names(), value=DEFAULT_REPRESENTATION, label="Representation")
        f.prior = gr.Dropdown(s.priors, value=s.priors[0], label="Prior")
        f.steps = gr.Number(value=None, label="Steps", precision=0, minimum=1, maximum=s.max_steps,
                            info=steps_info(DEFAULT_GUIDANCE, DEFAULT_REPRESENTATION, s.priors[0]))
        f.seeds = gr.Textbox(value="0", label="Seeds", info=f"0, or 0, 1, 2, or 0-3 (at most {MAX_SEEDS})")
        f.resolution = gr.Dropdown([str(r) for r in RESOLUTIONS], value=None, label="Render resolution",
                                   info="empty: the prior's default")
        f.janus_retry = gr.Number(value=0, label="Janus retries", precision=0, minimum=0, maximum=MAX_JANUS_RETRIES,
                                  info="after a run the prior's Janus check fails, try the next seed, up to this "
                                       "many times; the best attempt is the result")
        f.submit = gr.Button("Generate", variant="primary")
        f.submitted = gr.JSON(label="Submitted", visible=True)
        f.values = [f.prompt, f.negative, f.guidance, f.representation, f.prior, f.steps, f.seeds, f.resolution,
                    f.janus_retry]
        return f

    def _job_panel(self, gr) -> SimpleNamespace:
        """The job list and the selected job's view (inside its column)."""
        v = SimpleNamespace()
        v.jobs = gr.Dataframe(headers=TABLE_HEADERS, value=self.table(), interactive=False, label="Jobs",
                              datatype=["str"] * len(TABLE_HEADERS))
        v.selected = gr.Dropdown(choices=[r[0] for r in self.table()], label="Job", allow_custom_value=False)
        v.info = gr.Markdown("Select a job.")
        with gr.Row():
            v.cancel, v.resume, v.verify = gr.Button("Cancel"), gr.Button("Resume"), gr.Button("Verify")
        v.preview = gr.Image(label="Preview (latest step)", type="filepath", interactive=False, height=300)
        with gr.Row():
            v.video = gr.Video(label="Turntable", interactive=False, height=300)
            # The series are fixed up front (color_map): a plot first drawn empty keeps the colour
            # domain it started with, so series that arrive later were never drawn.
            v.curve = gr.LinePlot(x="step", y="value", color="series", label="Loss and gradient norm", height=300,
                                  color_map=dict(zip(CURVE_SERIES, ("#1f77b4", "#ff7f0e"))))
        with gr.Row():
            v.model = gr.Model3D(label="Mesh (GLB)", interactive=False, height=360)
            v.splats = gr.Model3D(label="Gaussian splats (PLY; Gaussian jobs)", interactive=False, height=360)
        v.downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)
        v.view = [v.info, v.preview, v.model, v.splats, v.video, v.downloads, v.curve]
        return v

    def blocks(self):
        import gradio as gr  # heavy: only when the page is built

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
                            f = self._form(gr)
                        with gr.Column(scale=2):
                            v = self._job_panel(gr)
                with gr.Tab("Instant (amortised model)", id="instant"):
                    self._instant_tab(gr)
                with gr.Tab("Compare", id="compare"):
                    c = self._compare_tab(gr)
            shown = gr.State(None)
            outputs = [v.jobs, v.selected, *v.view, shown]
            f.submit.click(on_submit, f.values, [f.submitted, v.jobs, v.selected], api_name="submit_form",
                           api_visibility="private")
            components = [f.guidance, f.representation, f.prior]
            for menu in components:  # the Steps box says what empty means for the choice
                menu.change(lambda g, r, p: gr.update(info=steps_info(g, r, p)), components, [f.steps],
                            api_visibility="private")
            v.selected.change(self.refresh, [v.selected], outputs, api_visibility="private")
            for button, method in ((v.cancel, self.cancel), (v.resume, self.resume), (v.verify, self.verify)):
                button.click(act(method), [v.selected], outputs, api_visibility="private")
            gr.Timer(2.0).tick(self.refresh, [v.selected, shown], outputs, api_visibility="private")

            # Start queues (a bad form: one gr.Error, the panel left as it was), then shows the comparison.
            c.start.click(guard(self.compare), c.values, [c.started], api_visibility="private").success(
                self.compare_view, [c.started], c.view, api_visibility="private")
            c.selected.input(self.compare_view, [c.selected], c.view, api_visibility="private")
            c.timer.tick(self.compare_tick, [c.selected, c.shown], c.view, api_visibility="private")
            demo.load(lambda: gr.update(choices=self.compare_choices()), None, [c.selected], api_visibility="private")
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
        super().close()




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


def wait_forever(ui: WebUI, demo) -> None:  # pragma: no cover - interactive
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ui.close(demo)


__all__ = ["WebUI", "Settings", "validate", "parse_seeds", "read_auth"]
