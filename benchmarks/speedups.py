"""Before/after of the CPU speed-ups that a setting can switch off, timed in one process on one
trained run: NeRF empty-space skipping (training step and eval renders), the eval's yaw search at
32x32 instead of 64x64, and progressive resolution (a 32x32 step against a 64x64 one).

    python benchmarks/speedups.py [--repeats 7] [--write BENCHMARKS.md]

A default NeRF run of "a red cube" is trained first (``threedgen run``, the CLI's own code path);
every figure is the median of ``--repeats`` timings.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report, run_once  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from threedgen.cameras import CameraSampler, orbit
    from threedgen.evaluate import evaluate_representation
    from threedgen.guidance.priors.shapes.prior import ShapesPrior
    from threedgen.runner import load_representation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="threedgen-speedups-") as tmp:
        run_dir = run_once("a red cube", Path(tmp), [])["run_dir"]
        cfg, nerf, _ = load_representation(run_dir)
    truth = ShapesPrior().truth(cfg.prompt)
    grid = nerf.empty_grid
    sampler = CameraSampler(cfg.camera, 0)
    cams = [sampler.sample(i) for i in range(args.repeats + 1)]
    video = orbit(8, 20.0, 2.5, 40.0)
    rows = []

    def with_skip(on: bool, fn):
        nerf.empty_grid = grid if on else None
        try:
            return fn()
        finally:
            nerf.empty_grid = grid

    def train_step(size: int, skip: bool):
        it = iter(cams * 4)

        def step():
            nerf.train()
            out = nerf.render(next(it), size, size)
            out.rgb.sum().backward()
        return with_skip(skip, lambda: median_seconds(step, args.repeats))

    def eval_render(skip: bool):
        def render():
            nerf.eval()
            with torch.no_grad():
                nerf.render(video, 64, 64)
        return with_skip(skip, lambda: median_seconds(render, args.repeats))

    rows.append(("NeRF render + backward, 64x64 (training step)", "every sample", "empty space skipped",
                 train_step(64, False), train_step(64, True)))
    occupied = float(grid.occupied.float().mean())  # built on the first render
    rows.append(("NeRF render, 8 views 64x64 (eval, turntable)", "every sample", "empty space skipped",
                 eval_render(False), eval_render(True)))
    rows.append(("NeRF render + backward (progressive resolution)", "64x64", "32x32",
                 train_step(64, True), train_step(32, True)))
    eval_repeats = max(1, args.repeats // 3)
    rows.append(("eval (mask IoU yaw search + scores)", "search at 64x64", "search at 32x32",
                 median_seconds(lambda: evaluate_representation(nerf, truth, 2.5, 40.0, search_size=64), eval_repeats),
                 median_seconds(lambda: evaluate_representation(nerf, truth, 2.5, 40.0, search_size=32), eval_repeats)))
    same = [evaluate_representation(nerf, truth, 2.5, 40.0, search_size=s) for s in (64, 32)]
    lines = [f"\n### Speed-ups before/after, {time.strftime('%Y-%m-%d')}\n",
             f"Command: `python benchmarks/speedups.py --repeats {args.repeats}`; {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}. One default NeRF run of \"a red cube\" "
             f"(occupied cells after training: {occupied:.0%}); both columns timed in this process, medians of "
             f"{args.repeats} (eval: {eval_repeats}). The eval's two searches give mask IoU {same[0]['mask_iou']:.4f} / "
             f"{same[1]['mask_iou']:.4f}, yaw {same[0]['best_yaw_degrees']:+.0f} / {same[1]['best_yaw_degrees']:+.0f} deg.\n",
             "| what | before | after | before s | after s | speed-up |", "|---|---|---|---|---|---|"]
    for what, before, after, b, a in rows:
        lines.append(f"| {what} | {before} | {after} | {b:.3f} | {a:.3f} | {b / a:.2f}x |")
    report("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
