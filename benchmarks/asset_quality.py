"""Asset quality, before -> after: what an artist sees in the exported mesh, against the truth.

For each prompt x representation: one default `threedgen run` (the whole CLI command, shapes
prior) with this checkout, and with ``--baseline DIR`` (a checkout of an earlier commit, e.g.
``git worktree add /tmp/before <commit>``) one with that code, the two interleaved so both see the
same machine. Every run folder is then scored by this checkout's `threedgen eval`: mask IoU,
PSNR, Chamfer, and the asset metrics (normal error, texture colour error, watertight / open and
pinched edges, height error; see ``threedgen.asset_metrics``). Blender (headless) renders the GLB
of ``--render`` prompts, and ``--montage`` puts them side by side, baseline above.

    python benchmarks/asset_quality.py [--baseline /tmp/before] [--prompts ...]
        [--representations nerf nerf-sdf gaussians surfels] [--seeds 0 1]
        [--refine [--refine-set refine.key=value ...]]
        [--json results.json] [--write BENCHMARKS.md] [--montage docs/asset-quality.png] [-- key=value ...]

With ``--refine`` every run is also refined (stage 2): a copy of its folder goes through
`threedgen refine COPY [--refine-set ...]` and is scored again, so each cell reads before -> after
refinement; the time refinement adds is the refined status's ``total_seconds`` minus its coarse
stage's (the work inside the run, without a second process's start-up), against the coarse
stage's whole run time. The mean colour of the surface facing up (normal within 25 degrees of +Y)
and of the sides (within 25 degrees of horizontal) is reported beside the truth's there, and the
montage gets the refined row.

With several seeds, each (prompt, representation) runs once per seed; the summary gives, per
representation, the median over prompts and seeds with the range, the cube's flat faces (the share
of its surface within 5 degrees of an axis, the Blender cube test's measure) and the median run
time. ``--json`` is rewritten after every run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from mesh_export import blender, montage  # noqa: E402
from quality import report, run_once  # noqa: E402

PROMPTS = ["a red cube", "a blue torus", "a green sphere", "an orange cone", "a yellow cylinder", "a pink pyramid"]
FRONT_PROMPTS = ["a green house", "a blue mug", "a yellow head"]
METRICS = ["mask_iou", "chamfer", "normal_error_deg", "texture_color_error", "height_error", "open_edges",
           "pinched_edges"]
GOALS = {"chamfer": 0.012, "normal_error_deg": 12.0, "texture_color_error": 0.05}
HEIGHT_GOAL = 0.05
FLAT_DEGREES = 5.0


def source_env(source: Path) -> dict:
    """An environment whose `python -m threedgen` imports the package from the checkout ``source``:
    a folder on PYTHONPATH holding ``threedgen`` with its subpackages linked in (the installed,
    editable package maps them the same way; PYTHONPATH is searched before it)."""
    shim = Path(tempfile.mkdtemp(prefix="threedgen-baseline-"))
    pkg = shim / "threedgen"
    pkg.mkdir()
    for item in (source / "threedgen").iterdir():
        (pkg / item.name).symlink_to(item)
    for sub in ("guidance", "representations", "webui", "configs"):
        (pkg / sub).symlink_to(source / sub)
    return {**os.environ, "PYTHONPATH": str(shim)}


def score(run_dir: Path) -> dict:
    from threedgen.evaluate import evaluate_run

    return evaluate_run(run_dir)


def flat_area(mesh_path: Path, degrees: float = FLAT_DEGREES) -> float:
    """The share of the mesh's area whose face normal lies within ``degrees`` of a world axis."""
    import numpy as np
    import trimesh

    mesh = trimesh.load(mesh_path, force="mesh")
    near_axis = np.abs(mesh.face_normals).max(1) >= np.cos(np.radians(degrees))
    return float(mesh.area_faces[near_axis].sum() / max(mesh.area_faces.sum(), 1e-12))


def region_colours(run_dir: Path, prompt: str, n: int = 20000) -> dict:
    """Mean RGB of the exported mesh's surface facing up (normal within 25 degrees of +Y) and of
    its sides (within 25 degrees of horizontal), beside the truth's shaded colour at the same
    points (the colour a representation should learn there)."""
    import numpy as np
    import torch
    import trimesh

    from threedgen.asset_metrics import surface_colors
    from threedgen.guidance.priors.shapes.prior import ShapesPrior

    truth = ShapesPrior.truth(prompt)
    mesh = trimesh.load(run_dir / "mesh.glb", force="mesh")
    points, faces = trimesh.sample.sample_surface(mesh, n, seed=0)
    colours = surface_colors(mesh, np.asarray(points), faces)
    true = truth.shaded_color(torch.as_tensor(np.asarray(points))).numpy()
    up = np.asarray(mesh.face_normals)[faces][:, 1]
    out = {}
    for name, pick in (("top", up >= np.cos(np.radians(25))), ("side", np.abs(up) <= np.sin(np.radians(25)))):
        if pick.any() and colours is not None:
            out[name] = {"mesh": [round(float(v), 3) for v in colours[pick].mean(0)],
                         "truth": [round(float(v), 3) for v in true[pick].mean(0)]}
    return out


def measure(prompt: str, rep: str, out: Path, extra: list[str], env: dict | None, render: bool, size: int,
            seed: int = 0) -> dict:
    row = run_once(prompt, out, ["--representation", rep, "--seed", str(seed), *extra], env=env)
    run_dir = Path(row["run_dir"])
    return scored(row, run_dir, prompt, rep, seed, render, size)


def scored(row: dict, run_dir: Path, prompt: str, rep: str, seed: int, render: bool, size: int) -> dict:
    metrics = score(run_dir)  # this checkout's eval, whichever code made the run
    row.update({k: metrics.get(k) for k in METRICS + ["watertight", "psnr", "height"]}, representation=rep,
               seed=seed, flat_area=flat_area(run_dir / "mesh.glb"), colours=region_colours(run_dir, prompt))
    row["blender"] = blender(run_dir / "mesh.glb", run_dir, size) if render else None
    return row


def refine_once(row: dict, out: Path, settings: list[str], render: bool, size: int) -> dict:
    """Stage 2 on a copy of a measured run's folder: the refined row (``wall``: the whole
    `threedgen refine` command; ``added``: the seconds the refinement adds inside a run)."""
    source = Path(row["run_dir"])
    run_dir = out / source.parent.name / source.name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(source, run_dir)
    cmd = [sys.executable, "-m", "threedgen", "refine", str(run_dir), "--no-progress", *settings]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"refining {run_dir} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    status = json.loads((run_dir / "status.json").read_text())
    refined = {"prompt": row["prompt"], "wall": wall, "run_dir": str(run_dir),
               "added": status["total_seconds"] - status["coarse"]["total_seconds"],
               "coarse_seconds": status["coarse"]["total_seconds"], "refine_error": status["refine"].get("error")}
    return scored(refined, run_dir, row["prompt"], row["representation"], row["seed"], render, size)


def fmt(value, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def goal_met(row: dict) -> bool:
    return (all(row[k] is not None and row[k] <= v for k, v in GOALS.items()) and row["watertight"]
            and row["height_error"] is not None and abs(row["height_error"]) <= HEIGHT_GOAL)


def table(rows: list[dict], baseline: list[dict] | None) -> list[str]:
    head = ["representation", "prompt", "seed", "IoU", "Chamfer", "normal err (deg)", "colour err", "watertight",
            "open / pinched edges", "height err (m)", "run s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        b = baseline[i] if baseline else None

        def cell(key, digits):
            now = fmt(r[key], digits)
            return f"{fmt(b[key], digits)} → {now}" if b else now

        edges = f"{r['open_edges']} / {r['pinched_edges']}"
        if b:
            edges = f"{b['open_edges']} / {b['pinched_edges']} → {edges}"
        lines.append(f"| {r['representation']} | {r['prompt']} | {r.get('seed', 0)} | {cell('mask_iou', 3)} | {cell('chamfer', 4)} "
                     f"| {cell('normal_error_deg', 1)} | {cell('texture_color_error', 3)} | {cell('watertight', 0)} "
                     f"| {edges} | {cell('height_error', 3)} | {cell('wall', 1)} |")
    return lines


def spread(rows: list[dict]) -> list[str]:
    """Per representation: the median over prompts and seeds with its range, watertight count, the
    cube's flat area and the median run time."""
    keys = [("mask_iou", 3), ("chamfer", 4), ("normal_error_deg", 1), ("texture_color_error", 3)]
    head = ["representation", "runs", "IoU", "Chamfer", "normal err (deg)", "worst prompt's normal err (median of seeds)",
            "colour err", "watertight", "cube: area within 5° of an axis", "run s (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rep in list(dict.fromkeys(r["representation"] for r in rows)):
        mine = [r for r in rows if r["representation"] == rep]
        cells = []
        for key, digits in keys:
            vals = [r[key] for r in mine if r[key] is not None]
            cells.append(f"{statistics.median(vals):.{digits}f} ({min(vals):.{digits}f}–{max(vals):.{digits}f})")
        by_prompt = {}
        for r in mine:
            by_prompt.setdefault(r["prompt"], []).append(r["normal_error_deg"])
        worst = max(by_prompt.items(), key=lambda kv: statistics.median(kv[1]))
        cubes = [r["flat_area"] for r in mine if "cube" in r["prompt"]]
        cube = f"{statistics.median(cubes):.2f}" if cubes else "n/a"
        lines.append(f"| {rep} | {len(mine)} | {cells[0]} | {cells[1]} | {cells[2]} | "
                     f"{worst[0]}: {statistics.median(worst[1]):.1f} | {cells[3]} | "
                     f"{sum(bool(r['watertight']) for r in mine)} of {len(mine)} | {cube} | "
                     f"{statistics.median(r['wall'] for r in mine):.1f} |")
    return lines


def summary(rows: list[dict], baseline: list[dict] | None) -> list[str]:
    lines = []
    for rep in sorted({r["representation"] for r in rows}):
        mine = [r for r in rows if r["representation"] == rep]
        parts = [f"**{rep}**: goals met on {sum(goal_met(r) for r in mine)} of {len(mine)} prompts"]
        for key in ("mask_iou", "chamfer", "normal_error_deg", "texture_color_error"):
            vals = [r[key] for r in mine if r[key] is not None]
            parts.append(f"mean {key} {statistics.mean(vals):.4g}")
        if baseline:
            theirs = [b for b in baseline if b["representation"] == rep]
            ratio = statistics.median(r["wall"] / b["wall"] for r, b in zip(mine, theirs))
            parts.append(f"median run time after / before {ratio:.3f}")
        lines.append("; ".join(parts) + ".")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", nargs="+", default=PROMPTS + FRONT_PROMPTS)
    ap.add_argument("--representations", nargs="+", default=["nerf", "nerf-sdf", "gaussians", "surfels"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--baseline", default=None, help="a checkout of the code to compare against")
    ap.add_argument("--render", nargs="*", default=["a red cube", "a blue torus"],
                    help="prompts whose GLB Blender renders (for --montage)")
    ap.add_argument("--size", type=int, default=320, help="Blender render size in pixels")
    ap.add_argument("--out", default=None, help="keep the run folders here")
    ap.add_argument("--json", default=None, help="write every row to this file")
    ap.add_argument("--montage", default=None, help="write the Blender renders, baseline above, to this PNG")
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    ap.add_argument("--refine", action="store_true", help="also refine every run (stage 2) and score it again")
    ap.add_argument("--refine-set", action="append", default=[], metavar="refine.key=value",
                    help="settings of the refinement (repeat for several)")
    ap.add_argument("overrides", nargs="*", help="extra `threedgen run` arguments (after --)")
    args = ap.parse_args()
    if args.refine and args.baseline:
        ap.error("--refine compares each run with its own refinement; leave out --baseline")

    out = Path(args.out or tempfile.mkdtemp(prefix="threedgen-assets-"))
    env = source_env(Path(args.baseline).resolve()) if args.baseline else None
    rows, baseline = [], [] if env else None
    for seed in args.seeds:
        for rep in args.representations:
            for prompt in args.prompts:
                render = prompt in args.render and seed == args.seeds[0]
                if env:
                    baseline.append(measure(prompt, rep, out / "before", args.overrides, env, render, args.size, seed))
                rows.append(measure(prompt, rep, out / "after", args.overrides, None, render, args.size, seed))
                print(f"{rep} {prompt} seed {seed}: " + ", ".join(f"{k} {fmt(rows[-1][k], 4)}" for k in METRICS),
                      file=sys.stderr)
                if args.refine:
                    baseline = baseline if baseline is not None else []
                    baseline.append(rows[-1])
                    rows[-1] = refine_once(rows[-1], out / "refined", args.refine_set, render, args.size)
                    print(f"  refined (+{rows[-1]['added']:.1f} s): " +
                          ", ".join(f"{k} {fmt(rows[-1][k], 4)}" for k in METRICS), file=sys.stderr)
                if args.json:
                    Path(args.json).write_text(json.dumps({"after": rows, "before": baseline}, indent=1))
    if args.montage:
        shown = [r for r in rows if r["blender"]]
        first, then = ("coarse", "refined") if args.refine else ("before", "after")
        tiles = ([(b, first) for b in baseline if b["blender"]] if baseline else []) + [(r, then) for r in shown]
        if tiles:
            montage([t["blender"]["image"] for t, _ in tiles],
                    [f"{t['prompt']} ({t['representation']}), {when}" for t, when in tiles], Path(args.montage),
                    columns=len({t["prompt"] for t in shown}))  # a row per representation

    if args.refine:
        report("\n".join(refine_lines(rows, baseline, args)), args.write)
        return
    lines = [f"\n## Asset quality, {datetime.date.today()}\n",
             f"`python benchmarks/asset_quality.py{' --baseline BEFORE' if baseline else ''}` on "
             f"{platform.machine()} ({platform.processor() or 'cpu'}), 2 CPU cores, torch CPU, nothing else running; "
             "one default `threedgen run` per cell (shapes prior), every run scored by this checkout's `threedgen "
             "eval` on its `mesh.glb`." + (" Cells read before → after; the two runs of a row ran back to back." if
                                            baseline else "") + "\n",
             *spread(rows), "", *table(rows, baseline), "", *summary(rows, baseline), ""]
    report("\n".join(lines), args.write)


def refine_lines(rows: list[dict], before: list[dict], args) -> list[str]:
    """The refinement's report: per representation the medians before and after with their
    ranges, the time added, and per prompt the colour of the surface facing up and of the sides."""
    head = ["representation", "stage", "runs", "IoU", "Chamfer", "normal err (deg)", "colour err",
            "prompts with colour err > 0.10", "watertight", "s added (median; share of the run)"]
    lines = [f"\n## Mesh refinement (stage 2), {datetime.date.today()}\n",
             f"`python benchmarks/asset_quality.py --refine {' '.join('--refine-set ' + x for x in args.refine_set)}` "
             f"on {platform.machine()} ({platform.processor() or 'cpu'}), 2 CPU cores, torch CPU, nothing else running: "
             "one default `threedgen run` per cell (shapes prior), then `threedgen refine` on a copy of its folder; "
             "both scored by `threedgen eval` on their `mesh.glb`.\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rep in list(dict.fromkeys(r["representation"] for r in rows)):
        for stage, group in (("coarse", [b for b in before if b["representation"] == rep]),
                             ("refined", [r for r in rows if r["representation"] == rep])):
            cells = []
            for key, digits in (("mask_iou", 3), ("chamfer", 4), ("normal_error_deg", 1), ("texture_color_error", 3)):
                vals = [r[key] for r in group if r[key] is not None]
                cells.append(f"{statistics.median(vals):.{digits}f} ({min(vals):.{digits}f}–{max(vals):.{digits}f})")
            over = sum((r["texture_color_error"] or 0) > 0.10 for r in group)
            added = ""
            if stage == "refined":
                share = statistics.median(r["added"] / r["coarse_seconds"] for r in group)
                added = f"{statistics.median(r['added'] for r in group):.1f} ({share:.0%})"
            lines.append(f"| {rep} | {stage} | {len(group)} | {' | '.join(cells)} | {over} of {len(group)} | "
                         f"{sum(bool(r['watertight']) for r in group)} of {len(group)} | {added} |")
    lines += ["", "| representation | prompt | seed | colour err | top: mesh / truth | side: mesh / truth |",
              "|---|---|---|---|---|---|"]
    for b, r in zip(before, rows):
        def region(row, name):
            c = row["colours"].get(name)
            return f"{tuple(c['mesh'])} / {tuple(c['truth'])}" if c else "n/a"
        for stage, row in (("coarse", b), ("refined", r)):
            lines.append(f"| {row['representation']} | {row['prompt']} ({stage}) | {row['seed']} | "
                         f"{fmt(row['texture_color_error'], 3)} | {region(row, 'top')} | {region(row, 'side')} |")
    return lines


if __name__ == "__main__":
    main()
