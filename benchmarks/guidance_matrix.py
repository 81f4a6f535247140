"""Guidance matrix: every method x a representation (NeRF by default) on shapes-prior prompts, each run the whole `threedgen run`
command in a subprocess (defaults of each method's preset), tabulated as mask IoU, PSNR, Chamfer,
wall seconds and steps.

    python benchmarks/guidance_matrix.py [--methods sds vsd ...] [--prompts "a red cube" ...]
                                         [--representation nerf|gaussians]
                                         [--write BENCHMARKS.md] [-- key=value ...]

One run per (method, prompt) (a repeat costs minutes per method). Wall seconds cover the whole
command (start-up, prior, optimisation, export, eval).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report, run_once  # noqa: E402

METHODS = ["sds", "vsd", "esd", "asd", "tsm", "ism", "bsd", "csm"]
PROMPTS = ["a red cube", "a blue torus", "a green sphere", "an orange cone", "a yellow cylinder", "a pink pyramid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    ap.add_argument("--representation", default="nerf", choices=["nerf", "gaussians"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--write", default=None, help="append the tables to this markdown file")
    ap.add_argument("overrides", nargs="*", help="extra `threedgen run` arguments (after --)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="threedgen-matrix-"))
    rows = {}
    for method in args.methods:
        for prompt in args.prompts:
            r = run_once(prompt, out, ["--guidance", method, "--representation", args.representation, *args.overrides])
            rows[method, prompt] = r
            print(f"{method:<4} {prompt:<20} IoU {r['mask_iou']:.3f} PSNR {r['psnr']:.2f} "
                  f"chamfer {r['chamfer']:.4f} wall {r['wall']:.1f}s train {r['train_seconds']:.1f}s", file=sys.stderr, flush=True)
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
    cmd = (f"python benchmarks/guidance_matrix.py --representation {args.representation}"
           + (" -- " + " ".join(args.overrides) if args.overrides else ""))
    name = {"nerf": "NeRF", "gaussians": "Gaussians"}[args.representation]
    text = (f"\n### Guidance matrix ({name}, shapes prior), {time.strftime('%Y-%m-%d')}\n\nCommand: `{cmd}`; machine: "
            f"{platform.machine()}, 2 CPU cores, Python {platform.python_version()}; one run per cell, each the whole "
            f"`threedgen run --guidance M --representation R --prompt P` command with the method's preset. Cells: mask IoU (best yaw).\n\n"
            + "\n".join(iou) + "\n")
    report(text, args.write)


if __name__ == "__main__":
    main()
