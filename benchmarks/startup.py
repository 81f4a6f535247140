"""Start-up benchmark: wall seconds of the commands that need no training (help, listings, input
errors), and optionally the whole ``threedgen run --prompt "a red cube"`` for NeRF and Gaussians.

    python benchmarks/startup.py [--repeats 5] [--full] [--write BENCHMARKS.md] [--label TEXT]

Each command runs as a fresh process (the installed ``threedgen`` script beside this Python), one
at a time; the table gives the median and range over the repeats, the exit code, and for the full
runs the mask IoU of the median-time run. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

QUICK = [
    ("threedgen --help", ["--help"]),
    ("threedgen guidance list", ["guidance", "list"]),
    ("threedgen config keys", ["config", "keys"]),
    ("exit 2: empty prompt", ["run", "--prompt", ""]),
    ("exit 2: unknown guidance", ["run", "--prompt", "a red cube", "--guidance", "sdss"]),
    ("exit 2: unknown key", ["run", "--prompt", "a red cube", "guidance.guidance_scal=3"]),
    ("exit 2: bad value", ["run", "--prompt", "a red cube", "guidance.guidance_scale=-1"]),
    ("exit 2: prompt outside the vocabulary", ["run", "--prompt", "a red dragon"]),
]


def threedgen_command() -> list[str]:
    script = Path(sys.executable).with_name("threedgen")
    if script.exists():
        return [str(script)]
    found = shutil.which("threedgen")
    return [found] if found else [sys.executable, "-m", "threedgen"]


def time_command(argv: list[str], repeats: int) -> tuple[list[float], int, str]:
    walls, code, tail = [], 0, ""
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        code = proc.returncode
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        tail = tail[0]
    return walls, code, tail


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="also time the whole red-cube run, NeRF and Gaussians")
    ap.add_argument("--write", help="append the markdown section to this file")
    ap.add_argument("--label", default="", help="a word for the table's title (e.g. before / after)")
    args = ap.parse_args(argv)
    exe = threedgen_command()
    rows = []
    for name, extra in QUICK:
        walls, code, tail = time_command(exe + extra, args.repeats)
        rows.append((name, walls, code, tail[:70]))
        print(f"{name}: median {statistics.median(walls):.2f} s, exit {code}", flush=True)
    full_rows = []
    if args.full:
        for rep in ("nerf", "gaussians"):
            results = []
            for i in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    cmd = exe + ["run", "--prompt", "a red cube", "--representation", rep, "--no-progress",
                                 "--out", tmp]
                    start = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    wall = time.perf_counter() - start
                    iou = float("nan")
                    for metrics in Path(tmp).glob("*/metrics.json"):
                        iou = json.loads(metrics.read_text()).get("mask_iou", float("nan"))
                    results.append((wall, iou, proc.returncode))
                    print(f"run {rep} #{i}: {wall:.1f} s, IoU {iou:.3f}, exit {proc.returncode}", flush=True)
            full_rows.append((rep, results))
    lines = [f"\n### Start-up{(' (' + args.label + ')') if args.label else ''}, {date.today()}\n",
             f"Command: `python benchmarks/startup.py --repeats {args.repeats}{' --full' if args.full else ''}`; "
             f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
             f"{len(__import__('os').sched_getaffinity(0))} CPU cores; each command a fresh process; "
             f"median (range) of {args.repeats}.\n",
             "| command | median s | range s | exit |", "|---|---|---|---|"]
    for name, walls, code, _ in rows:
        lines.append(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} | {code} |")
    for rep, results in full_rows:
        walls = [w for w, _, _ in results]
        median_run = sorted(results)[len(results) // 2]
        lines.append(f"| `threedgen run --prompt \"a red cube\" --representation {rep}` (mask IoU "
                     f"{median_run[1]:.3f}) | {statistics.median(walls):.1f} | {min(walls):.1f}-{max(walls):.1f} "
                     f"| {median_run[2]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
