"""Kill and resume: a run killed with SIGKILL at random steps, resumed each time with ``--resume``,
against the same run never stopped (same seed), in the same session.

    python benchmarks/kill_resume.py [--kills 5] [--steps 250] [--random-seed N] [--write BENCHMARKS.md] [key=value ...]

Each kill is one killed run and its resume (one kill per run); the table gives the step it was
killed at, the step its checkpoint held, the scores of the resumed run and their difference from
the uninterrupted run, and the wall time of killed + resumed run against the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report  # noqa: E402

BASE = ["--prompt", "a red cube", "--seed", "0", "--no-progress", "checkpoint_every=25", "preview_every=10"]


def threedgen(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "threedgen", "run", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return time.perf_counter() - started, out.stdout.strip().splitlines()[-1]


def killed_at(args: list[str], out: Path, step: int) -> tuple[float, Path, int]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "threedgen", "run", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reached = -1
    while proc.poll() is None and reached < step:
        for status in out.glob("*/status.json"):
            try:
                reached = json.loads(status.read_text()).get("step") or 0
            except ValueError:
                pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_dir,) = out.iterdir()
    return time.perf_counter() - started, run_dir, reached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--random-seed", type=int, default=None, help="seed of the kill steps (default: random)")
    ap.add_argument("--write", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import torch

    rng = random.Random(args.random_seed)
    base = [*BASE, "--steps", str(args.steps), *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="threedgen-kill-") as tmp:
        tmp = Path(tmp)
        wall, straight_dir = threedgen([*base, "--out", str(tmp / "straight")])
        straight = json.loads((Path(straight_dir) / "metrics.json").read_text())
        for i in range(args.kills):
            target = rng.randrange(20, args.steps - 10)
            killed_s, run_dir, reached = killed_at(base, tmp / f"kill-{i}", target)
            ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] \
                if (run_dir / "checkpoints" / "last.ckpt").is_file() else 0
            resumed_s, _ = threedgen(["--resume", str(run_dir), "--no-progress"])
            m = json.loads((run_dir / "metrics.json").read_text())
            rows.append({"target": target, "reached": reached, "ckpt": ckpt, "m": m, "killed_s": killed_s,
                         "resumed_s": resumed_s})
            print({k: v for k, v in rows[-1].items() if k != "m"}, {k: m[k] for k in ("mask_iou", "psnr", "chamfer")},
                  flush=True)
    lines = [f"\n### Kill and resume, {time.strftime('%Y-%m-%d')}\n",
             f"Command: `python benchmarks/kill_resume.py --kills {args.kills} --steps {args.steps}"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`; `threedgen run {' '.join(base)}` "
             f"(NeRF, SDS, shapes prior), killed with SIGKILL once the run's status reached a random step, then "
             f"`threedgen run --resume`. Uninterrupted run: IoU {straight['mask_iou']:.4f}, PSNR "
             f"{straight['psnr']:.2f} dB, Chamfer {straight['chamfer']:.4f}, {wall:.1f} s wall.\n",
             "| killed at step | resumed from checkpoint step | IoU | ΔIoU | PSNR dB | ΔPSNR | Chamfer | ΔChamfer | "
             "killed s + resumed s | ratio to uninterrupted |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["m"]
        lines.append(f"| {r['reached']} | {r['ckpt']} | {m['mask_iou']:.4f} | {m['mask_iou'] - straight['mask_iou']:+.4f} | "
                     f"{m['psnr']:.2f} | {m['psnr'] - straight['psnr']:+.2f} | {m['chamfer']:.4f} | "
                     f"{m['chamfer'] - straight['chamfer']:+.4f} | {r['killed_s']:.1f} + {r['resumed_s']:.1f} | "
                     f"{(r['killed_s'] + r['resumed_s']) / wall:.2f} |")
    report("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
