"""Step breakdown of one SDS-NeRF training step on the shapes prior: render forward, guidance
(prior call + SDS), backward, optimizer step; milliseconds, median over repeats.

    python benchmarks/step_breakdown.py [--steps 60] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from threedgen.cameras import CameraSampler
from threedgen.config import build_config, parse_overrides
from threedgen.runner import build_components


def measure(cfg, steps: int, warmup: int = 10) -> dict:
    torch.manual_seed(0)
    system = build_components(cfg, torch.device("cpu"))
    optimizers = system.configure_optimizers()
    sampler = CameraSampler(cfg.camera, 0)
    rep, guidance, size = system.representation, system.guidance, cfg.render.resolution
    parts = {"render": [], "guidance": [], "backward": [], "optimizer": []}
    for step in range(steps + warmup):
        cams = sampler.sample(step)
        t0 = time.perf_counter()
        out = rep.render(cams, size, size)
        t1 = time.perf_counter()
        g = guidance(out.rgb, system.embeds, cams, step, cfg.steps)
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad()
        g.loss.backward()
        t3 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        t4 = time.perf_counter()
        if step >= warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k].append(v)
    return {k: statistics.median(v) * 1000 for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--representation", default="nerf")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = build_config(representation=args.representation, overrides=parse_overrides(args.overrides), flags={"prompt": "a red cube"})
    runs = [measure(cfg, args.steps) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = sum(med.values())
    print(f"### Step breakdown, {time.strftime('%Y-%m-%d')}\n\nCommand: `python benchmarks/step_breakdown.py"
          f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`; {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median per-step ms over {args.steps} "
          f"steps, median of {args.repeats} runs.\n")
    print("| part | ms | share |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / total:.0%} |")
    print(f"| **total** | {total:.1f} | 100% |")


if __name__ == "__main__":
    main()
