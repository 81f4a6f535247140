"""Step breakdown of one training step (SDS-NeRF on the shapes prior by default): render forward,
guidance (prior call + SDS), backward, optimizer step; milliseconds, median over repeats.

    python benchmarks/step_breakdown.py [--steps 60] [--repeats 3] [--guidance sds]
                                        [--priors shapes shapes-unet-camera ...] [key=value ...]

With several ``--priors`` each is measured in the same process, their repeats interleaved, and
the table gives each prior's total against the first one's (the baseline).
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
    ap.add_argument("--guidance", default="sds")
    ap.add_argument("--priors", nargs="+", default=["shapes"])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfgs = {p: build_config(args.guidance, args.representation, p, overrides=parse_overrides(args.overrides),
                            flags={"prompt": "a red cube"}) for p in args.priors}
    runs = {p: [] for p in args.priors}
    for _ in range(args.repeats):
        for p in args.priors:
            runs[p].append(measure(cfgs[p], args.steps))
    med = {p: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for p, rs in runs.items()}
    total = {p: sum(m.values()) for p, m in med.items()}
    base = args.priors[0]
    print(f"### Step breakdown, {time.strftime('%Y-%m-%d')}\n\nCommand: `python benchmarks/step_breakdown.py --guidance "
          f"{args.guidance} --representation {args.representation} --priors {' '.join(args.priors)}"
          f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`; {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {cfgs[base].render.resolution}x"
          f"{cfgs[base].render.resolution} renders; median per-step ms over {args.steps} steps, median of "
          f"{args.repeats} runs (interleaved).\n")
    print("| part | " + " | ".join(f"{p} ms (share)" for p in args.priors) + " |\n" + "|---" * (len(args.priors) + 1) + "|")
    for k in med[base]:
        print(f"| {k} | " + " | ".join(f"{med[p][k]:.1f} ({med[p][k] / total[p]:.0%})" for p in args.priors) + " |")
    print("| **total** | " + " | ".join(f"{total[p]:.1f}" for p in args.priors) + " |")
    print(f"| ratio to {base} | " + " | ".join(f"{total[p] / total[base]:.2f}" for p in args.priors) + " |")


if __name__ == "__main__":
    main()
