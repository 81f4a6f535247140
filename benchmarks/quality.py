"""Quality benchmark: run `threedgen run` (the whole CLI command, in a subprocess) on a list of
shapes-prior prompts and tabulate mask IoU, PSNR, Chamfer, wall seconds and steps.

    python benchmarks/quality.py [--prompts "a red cube" ...] [--repeats 1] [--out DIR]
                                 [--write BENCHMARKS.md] [-- key=value ...]

Wall seconds are the median over repeats of the whole command (start-up, prior, optimisation,
export, eval); quality numbers are those of the median-time run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPTS = ["a red cube", "a blue torus", "a green sphere", "an orange cone", "a yellow cylinder",
                   "a purple capsule", "a pink pyramid", "a white torus"]


def report(text: str, write: str | None) -> None:
    """Print a benchmark's markdown section; append it to ``write`` (e.g. BENCHMARKS.md) if given."""
    print(text)
    if write:
        with open(write, "a") as f:
            f.write(text)


def run_once(prompt: str, out: Path, extra: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "threedgen", "run", "--prompt", prompt, "--out", str(out), "--no-progress", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{prompt!r} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    status = json.loads((run_dir / "status.json").read_text())
    return {"prompt": prompt, "wall": wall, "train_seconds": status["train_seconds"], "steps": status["step"],
            "export_seconds": status.get("export_seconds", float("nan")),
            "eval_seconds": status.get("eval_seconds", float("nan")),
            "mask_iou": metrics["mask_iou"], "mask_iou_unaligned": metrics["mask_iou_unaligned"],
            "psnr": metrics["psnr"], "chamfer": metrics["chamfer"], "faces": status["mesh_faces"],
            "run_dir": str(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    ap.add_argument("overrides", nargs="*", help="extra `threedgen run` arguments (after --)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="threedgen-bench-"))
    rows = []
    for prompt in args.prompts:
        runs = sorted((run_once(prompt, out, args.overrides) for _ in range(args.repeats)), key=lambda r: r["wall"])
        row = runs[len(runs) // 2]
        row["wall"] = statistics.median(r["wall"] for r in runs)
        row["asset"] = statistics.median(r["wall"] - r["eval_seconds"] for r in runs)
        row["spread"] = f"{runs[0]['wall']:.1f}-{runs[-1]['wall']:.1f}" if len(runs) > 1 else "-"
        rows.append(row)
        print(f"{prompt:<20} IoU {row['mask_iou']:.3f} PSNR {row['psnr']:.2f} chamfer {row['chamfer']:.4f} "
              f"wall {row['wall']:.1f}s", file=sys.stderr)
    header = ("| prompt | mask IoU | IoU unaligned | PSNR (dB) | Chamfer | wall s (whole command) | wall range | "
              "s to the asset (wall - eval) | train s | export s | eval s | steps | faces |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['prompt']} | {r['mask_iou']:.3f} | {r['mask_iou_unaligned']:.3f} | {r['psnr']:.2f} | "
             f"{r['chamfer']:.4f} | {r['wall']:.1f} | {r['spread']} | {r['asset']:.1f} | {r['train_seconds']:.1f} | "
             f"{r['export_seconds']:.1f} | {r['eval_seconds']:.1f} | {r['steps']} | {r['faces']} |" for r in rows]
    cmd = "python benchmarks/quality.py" + (f" --repeats {args.repeats}" if args.repeats != 1 else "") + \
          (" -- " + " ".join(args.overrides) if args.overrides else "")
    text = (f"\n### Quality, {time.strftime('%Y-%m-%d')}\n\nCommand: `{cmd}`; machine: {platform.machine()}, "
            f"{platform.processor() or 'cpu'}, Python {platform.python_version()}; median of {args.repeats} "
            f"run(s) per prompt.\n\n{header}\n" + "\n".join(lines) + "\n")
    report(text, args.write)


if __name__ == "__main__":
    main()
