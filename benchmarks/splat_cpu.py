"""CPU Gaussian rasteriser: forward + backward seconds of `rasterize_pytorch` (bounding boxes, sorted
pairs) against a dense baseline (every Gaussian against every pixel, the same compositing rules),
both in this process, on random scenes like an early and a late score-distillation run.

    python benchmarks/splat_cpu.py [--sizes 64 128] [--counts 1000 2000 5000] [--repeats 5] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from threedgen.cameras import orbit
from threedgen.representations import splatting
from threedgen.representations.config import GaussiansConfig
from threedgen.representations.gaussians import Gaussians

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report  # noqa: E402


def dense_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds):
    """Every Gaussian against every pixel ([C, N, H*W]), depth-sorted, the kernel's thresholds."""
    means2d, depths, conics, radii = splatting.project(means, quats, scales, opacities, viewmats, Ks, width, height)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    order = torch.argsort(depths, dim=1)
    m2 = torch.gather(means2d, 1, order[..., None].expand(-1, -1, 2))
    con = torch.gather(conics, 1, order[..., None].expand(-1, -1, 3))
    op = opacities[order]
    vis = torch.gather((radii > 0).all(-1), 1, order)
    d = m2[:, :, None, :] - pix[None, None]
    q = 0.5 * (con[..., 0, None] * d[..., 0] ** 2 + con[..., 2, None] * d[..., 1] ** 2) + con[..., 1, None] * d[..., 0] * d[..., 1]
    alpha = torch.clamp_max(op[..., None] * torch.exp(-q), 0.999)
    alpha = torch.where(vis[..., None] & (q >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
    trans = torch.exp(torch.cumsum(torch.log1p(-alpha), 1) - torch.log1p(-alpha))
    alive = (trans * (1 - alpha) > 1e-4).detach()
    w = torch.where(alive, alpha * trans, torch.zeros_like(alpha))
    rgb = torch.einsum("cnp,cnk->cpk", w, colors[order])
    acc = w.sum(1)[..., None]
    rgb = rgb + (1 - acc) * backgrounds[:, None]
    return rgb.view(-1, height, width, 3), acc.view(-1, height, width, 1)


def scene(n: int, seed: int = 0):
    rep = Gaussians(GaussiansConfig(num_points=n, init_radius=0.5, init_opacity=0.5), seed=seed)
    a = rep.activated()
    return [a[k].detach().requires_grad_() for k in ("means", "quats", "scales", "opacities")] + \
           [(0.5 + 0.28 * a["colors"][:, 0]).detach().requires_grad_()]


def time_fn(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        out = fn()
        (out[0].sum() + out[1].sum()).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--counts", nargs="+", type=int, default=[1000, 2000, 5000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    cams = orbit(1, 20.0, 2.5, 40.0)
    rows = ["| Gaussians | image | pairs | boxes s (fwd+bwd) | dense s (fwd+bwd) | dense / boxes |", "|---|---|---|---|---|---|"]
    for size in args.sizes:
        viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, size, size)
        for n in args.counts:
            inputs = scene(n)
            common = (*inputs, viewmats, Ks, size, size)
            boxes = time_fn(lambda: splatting.rasterize_pytorch(*common, backgrounds=cams.background), args.repeats)
            pairs = splatting.rasterize_pytorch(*common, backgrounds=cams.background)[3]["n_pairs"]
            dense = time_fn(lambda: dense_rasterize(*common, cams.background), args.repeats) if n * size * size <= 2e7 else None
            rows.append(f"| {n} | {size}x{size} | {pairs} | {boxes:.3f} | " +
                        (f"{dense:.3f} | {dense / boxes:.1f}x |" if dense else "— (too large) | — |"))
            print(rows[-1], flush=True)
    text = (f"\n### CPU Gaussian rasteriser, {time.strftime('%Y-%m-%d')}\n\nCommand: `python benchmarks/splat_cpu.py`; "
            f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; one camera, random "
            f"Gaussians in a ball of radius 0.5 (opacity 0.5, size from the point spacing) seen from 2.5 units; "
            f"median of {args.repeats} runs after a warm-up; both rasterisers in this process.\n\n" + "\n".join(rows) + "\n")
    report(text, args.write)


if __name__ == "__main__":
    main()
