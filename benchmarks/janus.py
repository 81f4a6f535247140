"""Janus benchmark: how often each method paints a second front, on a prior biased like a 2D model.

    python benchmarks/janus.py [--cells sds sds-perp-neg esd vsd asd sds-gaussians control]
                               [--objects house mug head] [--seeds 8] [--steps 300] [--jobs 2]
                               [--front-bias 0.95] [--tag-strength 0.5] [--prior shapes|shapes-unet]
                               [--out DIR] [--write BENCHMARKS.md] [-- key=value ...]

Every run is the whole ``threedgen run`` command in a subprocess (one torch thread each, ``--jobs``
at a time; this measures quality, not speed), on the shapes prior's objects with a front, and
``threedgen eval``'s Janus metrics (``threedgen.janus``) are read from its ``metrics.json``. The
biased prior is text-only (``prior.camera_kappa=0``) with view tags that a render's view only
partly restricts (``prior.view_tag_strength``) and a share ``prior.front_bias`` of the teacher's
views on fronts. The cells:

- ``sds``, ``esd``, ``vsd``, ``asd``: the method on the biased prior, NeRF;
- ``sds-perp-neg``: SDS with Perp-Neg (``prior.perp_neg=true``), NeRF;
- ``sds-gaussians``: SDS on the biased prior, 3D Gaussians;
- ``sds-gate``: SDS on the biased prior behind the Janus gate (``--janus-retry 3``: up to three more
  seeds while the prior's own Janus check fails); the published attempt is scored, and ``attempts``
  records how many runs it took;
- ``sds-unbiased``: SDS on the text-only prior without the bias (uniform views, strict view tags),
  NeRF: what the bias adds;
- ``control``: SDS on the camera-conditioned prior (the default ``camera_kappa``), NeRF.

``--prior shapes-unet`` runs the cells on the learned teacher instead (``threedgen train-prior``):
its text + view-tag mode is the Stable Diffusion analogue, with whatever view bias training left in
it (no ``front_bias`` to set), Perp-Neg through the same helper, and ``control`` on its camera mode
(``shapes-unet-camera``); ``sds-unbiased`` has no meaning there.

A run is Janus when it has two or more front markers; each cell reports the Janus rate with a
Wilson 95 % interval; how many runs have a second part at least a quarter the size of the truth's
marker (a second front rather than a fragment) and the mean size of the largest part over the
truth's; the means of the Janus view rate, the view mutual information and the back-front PSNR
gap, with mask IoU. Results accumulate in ``DIR/results.jsonl`` (a rerun with the
same ``--out`` skips what is done; ``--rescore`` runs ``threedgen eval`` again on every recorded run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report  # noqa: E402

COLOURS = {"house": "green", "mug": "blue", "head": "yellow"}
CELLS = {
    "sds": ["--guidance", "sds"],
    "sds-perp-neg": ["--guidance", "sds", "prior.perp_neg=true"],
    "esd": ["--guidance", "esd"],
    "vsd": ["--guidance", "vsd"],
    "asd": ["--guidance", "asd"],
    "sds-gaussians": ["--guidance", "sds", "--representation", "gaussians"],
    "sds-gate": ["--guidance", "sds", "--janus-retry", "3"],
    "sds-unbiased": ["--guidance", "sds"],
    "control": ["--guidance", "sds"],
}
FAST_EXPORT = ["export.resolution=96", "export.texture=vertex", "export.video_frames=4", "export.video_resolution=32",
               "preview_every=100000"]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def prior_args(cell: str, front_bias: float, tag_strength: float, prior: str = "shapes") -> list[str]:
    if prior == "shapes-unet":
        return ["--prior", "shapes-unet-camera" if cell == "control" else "shapes-unet"]
    if cell == "control":
        return []
    if cell == "sds-unbiased":
        return ["prior.camera_kappa=0"]
    return ["prior.camera_kappa=0", f"prior.front_bias={front_bias}", f"prior.view_tag_strength={tag_strength}"]


KEYS = ("front_markers", "janus_score_prior", "janus", "janus_view_rate", "view_mi", "view_mi_truth", "back_front_psnr_gap", "mask_iou",
        "psnr", "best_yaw_degrees", "janus_yaw_degrees", "front_marker_voxels", "front_marker_voxels_truth")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def rescore(result: dict) -> dict:
    """``threedgen eval`` again on a recorded run (after a change to the metrics)."""
    proc = subprocess.run([sys.executable, "-m", "threedgen", "eval", result["run_dir"]], capture_output=True,
                          text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"eval of {result['run_dir']} failed: {proc.stderr.strip().splitlines()[-1:]}")
    m = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    return {**result, **{k: m.get(k) for k in KEYS}}


def run_one(cell: str, obj: str, seed: int, args, out: Path) -> dict:
    prompt = f"a {COLOURS[obj]} {obj}"
    cmd = [sys.executable, "-m", "threedgen", "run", "--prompt", prompt, "--seed", str(seed), "--steps",
           str(args.steps), "--out", str(out / args.prior / cell), "--no-progress", *CELLS[cell],
           *prior_args(cell, args.front_bias, args.tag_strength, args.prior), *FAST_EXPORT, *args.overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cell} {prompt!r} seed {seed} failed ({proc.returncode}): "
                         f"{proc.stderr.strip().splitlines()[-1:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    m = json.loads((run_dir / "metrics.json").read_text())
    gate = run_dir / "janus_gate.json"  # the Janus gate's attempts (sds-gate)
    attempts = len(json.loads(gate.read_text())["attempts"]) if gate.is_file() else 1
    return {"cell": cell, "prior": args.prior, "object": obj, "seed": seed, "steps": args.steps, "wall": wall, "run_dir": str(run_dir),
            "attempts": attempts, **{k: m.get(k) for k in KEYS}}


def part_sizes(r: dict) -> tuple[float, bool]:
    """The largest marker part over the truth's, and whether a second part is at least a quarter of
    the truth's marker (a second front, not a fragment)."""
    parts, truth = r.get("front_marker_voxels") or [], (r.get("front_marker_voxels_truth") or [0])[0]
    if not truth:
        return float("nan"), False
    return (parts[0] / truth if parts else 0.0), len(parts) >= 2 and parts[1] >= truth / 4


def table(results: list[dict], cells: list[str], objects: list[str]) -> str:
    lines = ["| cell | object | runs | Janus | Janus rate [95 % CI] | 2nd part >= 1/4 truth | largest part / truth | "
             "mean JVR | mean view MI (truth) | mean PSNR gap dB | mean IoU | median wall s |", "|---" * 12 + "|"]
    for cell in cells:
        for obj in objects + ["all"]:
            rs = [r for r in results if r["cell"] == cell and (obj == "all" or r["object"] == obj)]
            if not rs or (obj == "all" and len({r["object"] for r in rs}) < 2):
                continue
            k, n = sum(bool(r["janus"]) for r in rs), len(rs)
            lo, hi = wilson(k, n)
            mean = lambda key: statistics.mean(r[key] for r in rs)  # noqa: E731
            sizes = [part_sizes(r) for r in rs]
            lines.append(f"| {cell} | {obj} | {n} | {k} | {k / n:.2f} [{lo:.2f}, {hi:.2f}] | "
                         f"{sum(big for _, big in sizes)} | {statistics.mean(s for s, _ in sizes):.2f} | "
                         f"{mean('janus_view_rate'):.2f} | {mean('view_mi'):.2f} ({mean('view_mi_truth'):.2f}) | "
                         f"{mean('back_front_psnr_gap'):+.2f} | {mean('mask_iou'):.3f} | "
                         f"{statistics.median(r['wall'] for r in rs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--objects", nargs="+", default=["house"], choices=list(COLOURS))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--front-bias", type=float, default=0.95)
    ap.add_argument("--tag-strength", type=float, default=0.5)
    ap.add_argument("--prior", default="shapes", choices=["shapes", "shapes-unet"],
                    help="shapes: the exact prior made biased; shapes-unet: the learned teacher's view-tag mode")
    ap.add_argument("--out", default=None)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    ap.add_argument("--rescore", action="store_true", help="run `threedgen eval` again on every recorded run first")
    ap.add_argument("--no-run", action="store_true", help="only tabulate what is recorded (after --rescore)")
    ap.add_argument("overrides", nargs="*", help="extra `threedgen run` arguments (after --)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="threedgen-janus-"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if args.rescore and done:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = list(pool.map(rescore, done))
        log.write_text("".join(json.dumps(r) + "\n" for r in done))
    for r in done:
        r.setdefault("prior", "shapes")
    if args.prior == "shapes-unet" and "sds-unbiased" in args.cells:
        args.cells = [c for c in args.cells if c != "sds-unbiased"]
    have = {(r["cell"], r["object"], r["seed"]) for r in done if r["steps"] == args.steps and r["prior"] == args.prior}
    todo = [] if args.no_run else [(c, o, s) for c in args.cells for o in args.objects for s in range(args.seeds)
                                   if (c, o, s) not in have]
    print(f"{len(todo)} runs to do, {len(have)} done; results in {log}", file=sys.stderr, flush=True)

    def work(job):
        r = run_one(*job, args, out)
        with log.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{r['cell']:<14} {r['object']:<6} seed {r['seed']} markers {r['front_markers']} JVR "
              f"{r['janus_view_rate']:.2f} MI {r['view_mi']:.2f} IoU {r['mask_iou']:.3f} {r['wall']:.0f}s",
              file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(work, todo))
    results = [json.loads(line) for line in log.read_text().splitlines()]
    results = [r for r in results if r["steps"] == args.steps and r["cell"] in args.cells and r["object"] in args.objects
               and r.get("prior", "shapes") == args.prior]
    cmd = (f"python benchmarks/janus.py --cells {' '.join(args.cells)} --objects {' '.join(args.objects)} "
           f"--seeds {args.seeds} --steps {args.steps} "
           + (f"--front-bias {args.front_bias} --tag-strength {args.tag_strength}" if args.prior == "shapes"
              else f"--prior {args.prior}")
           + (" -- " + " ".join(args.overrides) if args.overrides else ""))
    text = (f"\n### Janus benchmark, {time.strftime('%Y-%m-%d')}\n\nCommand: `{cmd}`; machine: {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, Python {platform.python_version()}. "
            + (f"Biased prior: text-only, front_bias {args.front_bias}, view_tag_strength {args.tag_strength} "
               "(control: camera-conditioned). " if args.prior == "shapes" else
               "Learned teacher: text + view tags (control: its camera mode). ")
            + f"{args.steps} steps per run, seeds 0, 1, 2, ... (runs: how many).\n\n" + table(results, args.cells, args.objects)
            + "\n")
    report(text, args.write)


if __name__ == "__main__":
    main()
