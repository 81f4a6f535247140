"""Cost of one shapes-prior call (cond + uncond for one 64x64 view, as SDS makes it): camera-
conditioned and text-only, for the seven primitives' world and the whole world (with the three
objects that have a front), in one process; milliseconds, median of many calls.

    python benchmarks/prior_call.py [--calls 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.priors.config import ShapesPriorConfig
from threedgen.guidance.priors.shapes.prior import ShapesPrior

PRIMITIVES = ["cube", "sphere", "cylinder", "cone", "torus", "capsule", "pyramid"]


def time_call(shapes, camera_kappa: float, calls: int) -> float:
    prior = ShapesPrior(ShapesPriorConfig(camera_kappa=camera_kappa, shapes=shapes))
    e = prior.encode_prompt("a red cube")
    cams = Cameras.from_angles([20.0, 20.0], [30.0, 30.0], 2.5, 40.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    conds = e.cond_for(cams[:1]) + [e.uncond]
    for _ in range(5):
        prior.predict_noise(x, t, conds, cams)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        prior.predict_noise(x, t, conds, cams)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, shapes in (("7 primitives", PRIMITIVES), ("all 10 shapes", None)):
        rows.append((name, time_call(shapes, 1000.0, args.calls), time_call(shapes, 0.0, args.calls)))
    print(f"Command: `python benchmarks/prior_call.py --calls {args.calls} --threads {args.threads}`; "
          f"{platform.machine()}, {args.threads} threads, {time.strftime('%Y-%m-%d')}\n")
    print("| world | objects | camera-conditioned ms | text-only ms |\n|---|---|---|---|")
    for name, cam, text in rows:
        n = 12 * (7 if name.startswith("7") else 10)
        print(f"| {name} | {n} | {cam:.1f} | {text:.1f} |")


if __name__ == "__main__":
    main()
