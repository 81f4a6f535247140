"""Guidance matrix: every method x a representation (NeRF by default) on shapes-world prompts, each run the whole `threedgen run`
command in a subprocess (defaults of each method's preset), tabulated as mask IoU, PSNR, Chamfer,
wall seconds and steps.

    python benchmarks/guidance_matrix.py [--methods sds vsd ...] [--prompts "a red cube" ...] [--front]
                                         [--representation nerf|gaussians] [--prior shapes|shapes-unet-camera|...]
                                         [--jobs N] [--results FILE.jsonl]
                                         [--write BENCHMARKS.md] [-- key=value ...]

One run per (method, prompt) (a repeat costs minutes per method); ``--front`` adds the objects with
a front (house, mug, head). With ``--results`` every finished cell is appended to a JSON-lines
file and a rerun skips the cells it holds, so the matrix can be run in parts (other methods,
prompts, representations) and tabulated from the merged rows. ``--jobs N`` runs N cells at once,
each with one torch thread (quality, not speed: wall seconds are then not comparable with a run
alone). Wall seconds cover the whole command (start-up, prior, optimisation, export, eval).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report, run_once  # noqa: E402

METHODS = ["sds", "vsd", "esd", "asd", "tsm", "ism", "bsd", "csm"]
PROMPTS = ["a red cube", "a blue torus", "a green sphere", "an orange cone", "a yellow cylinder", "a pink pyramid"]
FRONT_PROMPTS = ["a green house", "a blue mug", "a yellow head"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    ap.add_argument("--front", action="store_true", help="add the objects with a front: " + ", ".join(FRONT_PROMPTS))
    ap.add_argument("--representation", default="nerf", choices=["nerf", "gaussians"])
    ap.add_argument("--prior", default="shapes", help="the prior of every run (default: the exact shapes prior)")
    ap.add_argument("--jobs", type=int, default=1, help="cells at once (one torch thread each when > 1)")
    ap.add_argument("--results", default=None, help="JSON-lines file of finished cells: appended, reused on rerun")
    ap.add_argument("--out", default=None)
    ap.add_argument("--write", default=None, help="append the tables to this markdown file")
    ap.add_argument("overrides", nargs="*", help="extra `threedgen run` arguments (after --)")
    args = ap.parse_args()
    if args.front:
        args.prompts = args.prompts + [p for p in FRONT_PROMPTS if p not in args.prompts]
    out = Path(args.out or tempfile.mkdtemp(prefix="threedgen-matrix-"))
    key = lambda m, p: json.dumps([args.prior, args.representation, m, p, args.overrides])  # noqa: E731
    rows = {}
    log = Path(args.results) if args.results else None
    if log is not None and log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            rows.setdefault(r["key"], r)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else None
    # prompt by prompt, so that a matrix cut short has every method on the prompts it reached
    todo = [(m, p) for p in args.prompts for m in args.methods if key(m, p) not in rows]

    def work(cell):
        method, prompt = cell
        r = run_once(prompt, out, ["--guidance", method, "--representation", args.representation, "--prior", args.prior,
                                   *args.overrides], env=env)
        r["key"] = key(method, prompt)
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
        print(f"{method:<4} {prompt:<20} IoU {r['mask_iou']:.3f} PSNR {r['psnr']:.2f} "
              f"chamfer {r['chamfer']:.4f} wall {r['wall']:.1f}s train {r['train_seconds']:.1f}s", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for r in pool.map(work, todo):
            rows[r["key"]] = r
    rows = {(m, p): rows[key(m, p)] for m in args.methods for p in args.prompts}
    short = [p.split(" ", 1)[1] if p.startswith(("a ", "an ")) else p for p in args.prompts]
    iou = ["| method | " + " | ".join(short) + " | mean IoU | min IoU | mean PSNR | mean Chamfer | median wall s | median train s | steps |",
           "|---" * (len(short) + 8) + "|"]
    for m in args.methods:
        rs = [rows[m, p] for p in args.prompts]
        ious = [r["mask_iou"] for r in rs]
        iou.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in ious) +
                   f" | {statistics.mean(ious):.3f} | {min(ious):.3f} | {statistics.mean(r['psnr'] for r in rs):.2f} | "
                   f"{statistics.mean(r['chamfer'] for r in rs):.4f} | {statistics.median(r['wall'] for r in rs):.0f} | "
                   f"{statistics.median(r['train_seconds'] for r in rs):.0f} | {rs[0]['steps']} |")
    cmd = (f"python benchmarks/guidance_matrix.py --representation {args.representation} --prior {args.prior}"
           + (" --front" if args.front else "")
           + (" -- " + " ".join(args.overrides) if args.overrides else ""))
    name = {"nerf": "NeRF", "gaussians": "Gaussians"}[args.representation]
    text = (f"\n### Guidance matrix ({name}, {args.prior} prior), {time.strftime('%Y-%m-%d')}\n\nCommand: `{cmd}`; machine: "
            f"{platform.machine()}, 2 CPU cores, Python {platform.python_version()}, {args.jobs} run(s) at once; one run per cell, each the whole "
            f"`threedgen run --guidance M --representation R --prompt P` command with the method's preset. Cells: mask IoU (best yaw).\n\n"
            + "\n".join(iou) + "\n")
    report(text, args.write)


if __name__ == "__main__":
    main()
