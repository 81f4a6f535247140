"""gsplat's rasteriser against threedgen's PyTorch twin on one random scene: the ``image-error``
step of benchmarks/gpu_check.sh, and the gate the CUDA rasteriser tests share.

    python benchmarks/gpu_image_error.py [--device cuda]     # prints one JSON line; exit 1 if the gate fails

gsplat is compiled with ``-use_fast_math``: a Gaussian whose alpha sits within ~1e-5 of the 1/255
cut, or a pixel whose transmittance sits at the 1e-4 stop, is kept by one side and dropped by the
other, and shifts that pixel by up to a few 1e-3. A gate on the single largest difference would fail
on such a pixel; ``tests/image_agreement.py`` bounds the mean difference and the *share* of values
over the tolerance instead, and reports the largest difference and how many values exceed it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from image_agreement import agreement  # noqa: E402  (the gate the CUDA rasteriser tests share)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    from threedgen.cameras import Cameras  # after the arguments: --help without torch's start-up
    from threedgen.representations import splatting

    if not torch.cuda.is_available():
        print("gpu_image_error.py: CUDA is not available", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    n, height, width = 1000, 96, 128
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
    quats = torch.randn(n, 4, generator=g)
    scales = 0.01 + 0.08 * torch.rand(n, 3, generator=g)
    opacities = 0.02 + 0.97 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    scene = [t.to(args.device) for t in (means, quats, scales, opacities, colors)]
    cams = Cameras.from_angles([15.0, -5.0], [30.0, 200.0], 2.5, 40.0,
                               [[0.2, 0.5, 0.9], [1.0, 1.0, 1.0]]).to(args.device)
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, height, width)
    call = (*scene, viewmats, Ks, width, height)
    with torch.no_grad():
        mine = splatting.rasterize_pytorch(*call, backgrounds=cams.background)
        theirs = splatting.rasterize_gsplat(*call, backgrounds=cams.background)
    result = agreement(torch.cat([mine[0].flatten(), mine[1].flatten()]),
                       torch.cat([theirs[0].flatten(), theirs[1].flatten()]))
    result.update(gaussians=n, images=[len(cams), height, width], coverage=float(mine[1].mean()))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
