"""The guidance workbench (`threedgen compare`, the web UI's Compare tab): every chosen method on
the same prompt, seeds and budget, one job per method x seed through the job backend (local
workers or a Ray cluster), and one comparison folder:

- ``compare.json``: the plan and, per run, its status, numbers, loss curve and views; per method,
  the mean and spread over seeds (``summary``);
- ``sheet.png`` and ``report.html`` (``threedgen.compare_report``; the report opens from disk);
- ``views/``: each run's views at ``VIEW_AZIMUTHS`` side by side; ``state/`` (the job table, unless
  another ``--state`` was given), ``runs/`` (the run folders) and ``outputs/`` (the jobs' copies).

Every run of a comparison sees the same prompt, camera sequence (the cameras are drawn from the
seed) and budget: ``--budget-steps N`` gives every run N steps; ``--budget-seconds S`` gives every
run S seconds of training (``max_seconds``), each stopping at its preset's steps if that comes first.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import time
import uuid
from pathlib import Path
from typing import Optional

from threedgen.errors import UserError, nearest
from threedgen.guidance.config import GUIDANCE
from threedgen.jobs.batch import FINAL
from threedgen.request import RunRequest
from threedgen.rundir import RunFolder, atomic_write_text, slugify

FORMAT = "threedgen-compare/1"
RECORD = "compare.json"
VIEW_AZIMUTHS = (0.0, 60.0, 120.0, 180.0, -120.0, -60.0)
VIEW_ELEVATION = 15.0
VIEW_SIZE = 128
CURVE_POINTS = 200
MAX_SEEDS = 100
# The numbers of a run that the summary takes the mean and spread of: from status.json, then
# metrics.json (those of a truth, where there is one, and the prior's Janus check).
STATUS_VALUES = ("wall_seconds", "train_seconds", "steps_per_second", "peak_memory_mb")
METRIC_VALUES = ("mask_iou", "psnr", "chamfer", "normal_error_deg", "texture_color_error", "janus", "janus_view_rate",
                 "janus_score_prior")


def all_methods() -> list[str]:
    return list(GUIDANCE)


def parse_methods(text: str | list[str] | None) -> list[str]:
    """``sds,vsd,...`` or ``all`` (every registered method) as a list; unknown, duplicate or no
    names: a one-line UserError."""
    items = text if isinstance(text, list) else [m.strip() for m in str(text or "").split(",")]
    items = [m for m in items if m]
    if not items:
        raise UserError(f"--methods is empty; give some of {', '.join(all_methods())}, or all")
    if items == ["all"]:
        return all_methods()
    for m in items:
        if m not in GUIDANCE:
            raise UserError(f"unknown method {m!r}; valid: {', '.join(nearest(m, all_methods()))} (or all)")
    seen = [m for i, m in enumerate(items) if m in items[:i]]
    if seen:
        raise UserError(f"method {seen[0]!r} is named twice in --methods")
    return items


def parse_seeds(text: str | list[int] | None) -> list[int]:
    """``0,1,2`` as a list of distinct seeds (0 to 2^32-1, at most ``MAX_SEEDS``)."""
    items = text if isinstance(text, list) else [s.strip() for s in str(text or "").split(",") if s.strip()]
    if not items:
        raise UserError("--seeds is empty; give seeds such as 0,1,2")
    seeds = []
    for s in items:
        if isinstance(s, bool) or not re.fullmatch(r"[0-9]{1,10}", str(s)) or int(s) > 2 ** 32 - 1:
            raise UserError(f"--seeds: {str(s)[:20]!r} is not a seed (an integer from 0 to {2 ** 32 - 1})")
        if int(s) in seeds:
            raise UserError(f"seed {int(s)} is named twice in --seeds")
        seeds.append(int(s))
    if len(seeds) > MAX_SEEDS:
        raise UserError(f"--seeds names {len(seeds)} seeds; at most {MAX_SEEDS}")
    return seeds


def plan(prompt: str, methods: list[str], seeds: list[int], representation: str, prior: str,
         budget_steps: Optional[int] = None, budget_seconds: Optional[float] = None, negative_prompt: str = "",
         overrides: tuple[str, ...] = (), max_jobs: int = 100) -> list[tuple[str, int, RunRequest]]:
    """``(method, seed, request)`` for every run, each checked as `threedgen run` checks it, before
    anything is queued."""
    if budget_steps is not None and budget_seconds is not None:
        raise UserError("give one budget: --budget-steps N (the same steps for every run) or --budget-seconds S "
                        "(the same training time), not both")
    if budget_steps is not None and (isinstance(budget_steps, bool) or not isinstance(budget_steps, int)
                                     or budget_steps <= 0):
        raise UserError(f"--budget-steps must be a whole number of steps above 0; got {budget_steps!r}")
    if budget_seconds is not None and not (isinstance(budget_seconds, (int, float)) and math.isfinite(budget_seconds)
                                           and budget_seconds > 0):
        raise UserError(f"--budget-seconds must be a number of seconds above 0; got {budget_seconds!r}")
    jobs = len(methods) * len(seeds)
    if jobs > max_jobs:
        raise UserError(f"{len(methods)} methods x {len(seeds)} seeds is {jobs} jobs; at most {max_jobs} (--max-queue): "
                        "fewer methods or seeds, or raise --max-queue")
    extra = tuple(overrides) + ((f"max_seconds={float(budget_seconds)}",) if budget_seconds is not None else ())
    out, checked = [], {}
    for method in methods:
        for seed in seeds:
            request = RunRequest(prompt=prompt, negative_prompt=negative_prompt or None, guidance=method,
                                 representation=representation, prior=prior, steps=budget_steps, seed=seed,
                                 overrides=extra)
            try:
                if method not in checked:
                    checked[method] = request.checked("cpu")
                cleaned, cfg = checked[method]
            except UserError as exc:
                raise UserError(f"{method}: {exc}") from None
            # "auto" is pinned to what it chose here: every run of a comparison has the same prior,
            # whichever worker (a GPU's, where auto means Stable Diffusion) runs it.
            out.append((method, seed, request.replace(prompt=cleaned.prompt, negative_prompt=cleaned.negative_prompt,
                                                      steps=cfg.steps,
                                                      prior=cfg.prior.name if prior == "auto" else prior)))
    return out


def new_record(prompt: str, negative_prompt: str, methods: list[str], seeds: list[int], representation: str,
               prior: str, budget_steps: Optional[int], budget_seconds: Optional[float], backend: str,
               state: Path, planned: list[tuple[str, int, RunRequest]]) -> dict:
    steps = planned[0][2].steps if planned else None  # the budget's steps, or the preset's
    budget = {"steps": steps} if budget_seconds is None else {"seconds": float(budget_seconds), "steps": steps}
    return {"format": FORMAT, "compare": uuid.uuid4().hex[:8], "prompt": prompt, "negative_prompt": negative_prompt or "",
            "representation": representation, "prior": prior, "methods": methods, "seeds": seeds,
            "budget": budget,
            "backend": backend, "state_folder": str(state), "truth": None, "view_azimuths": list(VIEW_AZIMUTHS),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "state": "queued",
            "runs": [{"method": m, "seed": s, "job": None, "status": "queued"} for m, s, _ in planned], "summary": []}


def job_params(record: dict, method: str, seed: int, request: RunRequest) -> dict:
    """What the job table stores for one run of the comparison (the request and where it belongs)."""
    return {**request.to_dict(), "compare": {"id": record["compare"], "method": method, "seed": seed}}


def default_folder(prompt: str, root: str | Path = "comparisons") -> Path:
    return Path(root) / f"{slugify(prompt)}-{time.strftime('%Y%m%d-%H%M%S')}"


def save(folder: Path, record: dict) -> None:
    record["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_text(Path(folder) / RECORD, json.dumps(record, indent=1))


def load(folder: str | Path) -> dict:
    """A comparison folder's record; a one-line UserError when the folder holds none."""
    path = Path(folder).expanduser() / RECORD
    try:
        record = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{Path(folder)} is not a comparison folder (no {RECORD})") from None
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{path} is not a comparison of this version ({FORMAT})")
    return record


# ---- collecting the results -------------------------------------------------------------------

def loss_curve(run_dir: Path, points: int = CURVE_POINTS) -> list[list[float]]:
    """``[[step, loss], ...]`` from the run's CSV log, thinned to at most ``points``."""
    rows = []
    try:
        with open(RunFolder(run_dir).curve, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step, loss = int(float(row.get("step") or "nan")), float(row.get("loss") or "nan")
                except ValueError:
                    continue
                if math.isfinite(loss):
                    rows.append([step, loss])
    except OSError:
        return []
    if len(rows) > points:
        stride = len(rows) / points
        rows = [rows[int(i * stride)] for i in range(points - 1)] + [rows[-1]]
    return rows


def run_values(run_dir: Path) -> dict:
    """A finished run's numbers: time, speed and memory from ``status.json``; the eval's and the
    prior check's from ``metrics.json``."""
    folder = RunFolder(run_dir)
    status, metrics = folder.read_status(), folder.read_metrics() or {}
    train = status.get("train_seconds")
    step = status.get("step")
    values = {"wall_seconds": status.get("total_seconds"), "train_seconds": train,
              "steps_per_second": round(step / train, 3) if step and train else None,
              "peak_memory_mb": status.get("peak_memory_mb")}
    for key in METRIC_VALUES:
        value = metrics.get(key)
        values[key] = float(value) if isinstance(value, (bool, int, float)) and value is not None else None
    return values


def render_strip(run_dir: Path, path: Path) -> None:
    """The run's views at ``VIEW_AZIMUTHS`` side by side, one PNG."""
    import numpy as np  # heavy imports: only once a run finished

    from threedgen.cameras import Cameras  # torch: only once a run finished
    from threedgen.runs import load_representation  # torch: only once a run finished
    from threedgen.views import render_views, write_image  # torch: only once a run finished

    cfg, representation, _ = load_representation(run_dir, device="cpu")
    distance = float(np.mean(cfg.camera.distance_range))
    fovy = float(np.mean(cfg.camera.fovy_range))
    cameras = Cameras.from_angles([VIEW_ELEVATION] * len(VIEW_AZIMUTHS), list(VIEW_AZIMUTHS), distance, fovy,
                                  (1.0, 1.0, 1.0))
    rgb, _ = render_views(representation, cameras, VIEW_SIZE, chunk=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, np.concatenate(list(rgb), axis=1))


def summarise(record: dict) -> list[dict]:
    """Per method: how many runs succeeded or failed (with their errors) and, for every value, the
    mean and sample standard deviation over the seeds that have it."""
    out = []
    for method in record["methods"]:
        runs = [r for r in record["runs"] if r["method"] == method]
        ok = [r for r in runs if r["status"] == "succeeded"]
        failed = [r for r in runs if r["status"] in ("failed", "cancelled", "interrupted")]
        stats = {}
        for key in STATUS_VALUES + METRIC_VALUES:
            xs = [float(r["values"][key]) for r in ok if (r.get("values") or {}).get(key) is not None]
            if xs:
                stats[key] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                              "n": len(xs)}
        out.append({"method": method, "runs": len(runs), "succeeded": len(ok), "failed": len(failed),
                    "errors": [f"seed {r['seed']}: {r.get('error') or r['status']}" for r in failed], "stats": stats})
    return out


def collect(record: dict, jobs: dict, folder: Path, render: bool = True) -> dict:
    """The record brought up to date from the jobs (``{job id: Job}``): each run's status, and for a
    run that succeeded (once) its numbers, curve and views; then the summary."""
    folder = Path(folder)
    for run in record["runs"]:
        job = jobs.get(run.get("job"))
        if job is None:
            continue
        run.update(status=job.status, error=job.error, step=job.step, max_steps=job.max_steps, run_dir=job.run_dir)
        if job.status != "succeeded" or not job.run_dir:
            continue
        run_dir = Path(job.run_dir)
        if not run.get("values"):
            run["values"] = run_values(run_dir)
            run["curve"] = loss_curve(run_dir)
            glb = RunFolder(run_dir).mesh("glb")
            run["glb"] = str(glb) if glb.is_file() else None
            run["views"] = None
        if record["truth"] is None:
            record["truth"] = run["values"].get("mask_iou") is not None
        if render and not run.get("views") and not run.get("views_error"):  # once per run, when first asked
            relative = Path("views") / f"{run['method']}-seed{run['seed']}.png"
            try:
                render_strip(run_dir, folder / relative)
                run["views"] = str(relative)
            except (UserError, OSError, RuntimeError) as exc:
                run["views_error"] = str(exc).splitlines()[0][:200]
    statuses = [r["status"] for r in record["runs"]]
    record["state"] = "finished" if all(s in FINAL for s in statuses) else (
        "running" if any(s in ("running", *FINAL) for s in statuses) else "queued")
    record["summary"] = summarise(record)
    return record


def write_outputs(record: dict, folder: Path) -> dict:
    """``compare.json``, then ``sheet.png`` and ``report.html``; the paths written."""
    from threedgen.compare_report import write_html, write_sheet  # Pillow: only when a sheet is written

    folder = Path(folder)
    save(folder, record)
    return {"record": str(folder / RECORD), "sheet": str(write_sheet(record, folder)),
            "report": str(write_html(record, folder))}


def progress_line(record: dict) -> str:
    counts: dict[str, int] = {}
    for r in record["runs"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


__all__ = ["parse_methods", "parse_seeds", "plan", "new_record", "job_params", "collect", "summarise", "save", "load",
           "write_outputs", "default_folder", "VIEW_AZIMUTHS", "FORMAT", "RECORD"]
