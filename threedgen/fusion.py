"""A watertight mesh grid from rendered depth: truncated signed-distance (TSDF) fusion.

For surfaces that render a depth but have no field to march (2D Gaussian surfels, as the 2DGS paper
meshes them), ``fuse_depth`` renders ``fusion_cameras`` (a turntable at several elevations, with a
view from above and one from below) and fuses their depth on a ``resolution^3`` grid over
``[-bound, bound]^3``. For each view, a voxel whose image point the render covers (alpha >= 0.5,
read bilinearly between pixel centres, as is the depth, weighted by alpha) gets
``clamp((depth - distance) / truncation, -1, 1)``, positive in front of the surface, unless it lies
more than ``truncation`` behind it (hidden: no vote); a voxel whose pixel is empty is free space
(+1). The fused value is the mean of the votes. Voxels no view voted on are inside when every view
that sees them sees the object there (the visual hull), else outside, so the grid is closed and
marching cubes at 0 gives a watertight surface. Before fusion, holes a few pixels across inside each
render's silhouette are closed (``close_holes``); after it, channels a few voxels wide into the solid
(``close_solid``): both are what a cloud of translucent surfels leaves, tunnels to inner bubbles
that would become inner surfaces.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_closing, generate_binary_structure

from threedgen.cameras import Cameras

FUSION_ELEVATIONS = (-30.0, 0.0, 30.0, 60.0)
# Holes up to this many pixels across inside a render's silhouette (gaps between surfels) are
# closed before fusion: one view's hole would otherwise carve a tunnel of free space through the
# object, since the views that see the object there cast no vote.
HOLE_PIXELS = 4
# Closing of the fused solid, in voxels (see close_solid).
SOLID_CLOSING = 2


@torch.no_grad()
def close_holes(alpha: torch.Tensor, depth: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha, depth [C,S,S]`` with every hole up to ``width`` pixels across (pixels below 0.5
    opacity that a ``width + 1`` square dilation then erosion of the covered pixels covers) filled:
    opacity 1, depth the mean of the covered pixels' depths in that square around it."""
    if width < 1:
        return alpha, depth
    k = width + 1
    covered = (alpha >= 0.5).float()[:, None]
    pad = (k // 2, k - 1 - k // 2, k // 2, k - 1 - k // 2)
    closed = -F.max_pool2d(-F.max_pool2d(F.pad(covered, pad), k, 1), k, 1, padding=0)
    closed = F.pad(closed, pad)  # erosion over the same window, re-centred
    closed = closed[..., :alpha.shape[-2], :alpha.shape[-1]]
    hole = (closed[:, 0] > 0.5) & (covered[:, 0] < 0.5)
    total = F.avg_pool2d(F.pad(covered * depth[:, None], pad), k, 1)[:, 0]
    count = F.avg_pool2d(F.pad(covered, pad), k, 1)[:, 0]
    fill = total / count.clamp_min(1e-6)
    return torch.where(hole, torch.ones_like(alpha), alpha), torch.where(hole, fill, depth)


def fusion_cameras(bound: float, views_per_ring: int = 8) -> Cameras:
    """``views_per_ring`` views around at each of ``FUSION_ELEVATIONS`` (rings offset by half a
    step), plus one from straight above and one from below; 5 x ``bound`` away, 40-degree field of
    view, so the whole scene box is in every image."""
    el, az = [], []
    for ring, elevation in enumerate(FUSION_ELEVATIONS):
        for k in range(views_per_ring):
            el.append(elevation)
            az.append((k + 0.5 * (ring % 2)) * 360.0 / views_per_ring)
    el += [89.0, -89.0]
    az += [0.0, 0.0]
    return Cameras.from_angles(el, az, 5.0 * bound, 40.0)


@torch.no_grad()
def fuse_depth(render: Callable[[Cameras], tuple[torch.Tensor, torch.Tensor]], cameras: Cameras, size: int,
               bound: float, resolution: int, truncation: float, device: torch.device | str = "cpu",
               chunk: int = 4) -> np.ndarray:
    """The fused TSDF ``[R,R,R]`` (``[x,y,z]`` on ``linspace(-bound, bound, R)``), in [-1, 1],
    negative inside. ``render(cameras)`` returns ``(alpha [C,S,S], depth [C,S,S])`` at ``size`` x
    ``size`` pixels, depth being the distance along each pixel's ray."""
    lin = torch.linspace(-bound, bound, resolution, device=device)
    points = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    total = torch.zeros(len(points), device=device)
    votes = torch.zeros(len(points), device=device)
    hull = torch.ones(len(points), dtype=torch.bool, device=device)
    for start in range(0, len(cameras), chunk):
        cams = cameras[start:start + chunk].to(device)
        alpha, depth = close_holes(*render(cams), HOLE_PIXELS)
        for c in range(len(cams)):
            c2w = cams.c2w[c].to(points)
            local = (points - c2w[:3, 3]) @ c2w[:3, :3]  # camera frame (OpenGL: looking along -z)
            forward = -local[:, 2]
            focal = 0.5 * size / math.tan(math.radians(float(cams.fovy[c])) / 2)
            ahead = forward > 1e-6
            u = 0.5 * size + focal * local[:, 0] / forward.clamp_min(1e-6)
            v = 0.5 * size - focal * local[:, 1] / forward.clamp_min(1e-6)
            seen = ahead & (u >= 0) & (u < size) & (v >= 0) & (v < size)
            # Bilinear between pixel centres: the opacity, and the depth weighted by it (so an
            # edge pixel's empty neighbour does not pull the depth towards 0).
            grid = torch.stack([u / size * 2 - 1, v / size * 2 - 1], -1).view(1, 1, -1, 2)
            maps = torch.stack([alpha[c], alpha[c] * depth[c]])[None].to(points)
            a, ad = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False).view(2, -1)
            covered = a >= 0.5
            seen_depth = ad / a.clamp_min(1e-6)
            distance = (points - c2w[:3, 3]).norm(dim=-1)
            sdf = ((seen_depth - distance) / truncation).clamp(-1, 1)
            sdf = torch.where(covered, sdf, torch.ones_like(sdf))
            # a vote where the view sees the voxel, none where it lies more than the truncation
            # behind the surface (hidden: the view cannot say whether it is inside)
            weight = (seen & (~covered | (seen_depth - distance > -truncation))).float()
            total += torch.where(weight > 0, weight * sdf, torch.zeros_like(sdf))  # no NaN from unseen points
            votes += weight
            hull &= ~seen | covered
    fused = torch.where(votes > 0, total / votes.clamp_min(1e-6), torch.where(hull, -1.0, 1.0))
    return close_solid(fused.view(resolution, resolution, resolution).cpu().numpy(), SOLID_CLOSING)


def close_solid(fused: np.ndarray, iterations: int) -> np.ndarray:
    """The TSDF with its solid (``< 0``) closed by ``iterations`` voxels (a binary closing with the
    6-neighbour cross): the thin channels of free space that a translucent patch seen from a
    single view leaves into the solid are filled (at -0.5), so the cavities behind them are
    enclosed and the mesh export fills them; a concavity narrower than ``2 x iterations`` voxels
    fills as well."""
    if iterations < 1:
        return fused
    solid = fused < 0
    closed = binary_closing(solid, generate_binary_structure(3, 1), iterations=iterations, border_value=0)
    return np.where(closed & ~solid, np.float32(-0.5), fused)
