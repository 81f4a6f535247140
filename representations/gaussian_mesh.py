"""A mesh out of Gaussians: their density on a grid, marching cubes at an automatic level, colours
(vertex or texture) from the Gaussians.

- density ``sigma(x) = sum_i o_i exp(-q_i(x) / 2)`` with ``q_i`` the Mahalanobis distance of
  ``x`` to Gaussian i (DreamGaussian's extraction field), each Gaussian splatted only onto the
  voxels of its box, out to where its term falls below ``1/255`` (the rasteriser's cut-off);
- colour: the density-weighted mean of the Gaussians' colours on the same grid, read trilinearly
  at the vertices or the texels' surface points;
- level: ``threedgen.meshing.view_level`` with the opacity of the Gaussians' own renders of the
  level views, so the mesh's silhouettes match the Gaussians' renders with no hand-set threshold.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from threedgen.boxes import box_points, chunk_ranges
from threedgen.meshing import Surface, check_mesh_resolution, surface_from_grid
from threedgen.representations.fields import sample_grid
from threedgen.representations.gsplat_reference import quat_scale_to_covar_preci
from threedgen.representations.splatting import ALPHA_THRESHOLD, opacity_extent

MAX_PAIRS = 1 << 22  # (voxel, Gaussian) pairs evaluated at once


def _splat(centers, radius, size: int, weight_fn, channels: int, dims: int) -> torch.Tensor:
    """Sum ``weight_fn(index, offsets)`` (``[P, channels]``) over each Gaussian's box of grid points;
    ``centers``/``radius`` are in grid units ``[N,dims]``; returns ``[size^dims, channels]``."""
    lo = torch.ceil(centers - radius).clamp_min(0).long()
    hi = torch.floor(centers + radius).clamp_max(size - 1).long()
    count = (hi - lo + 1).clamp_min(0).prod(-1)
    out = torch.zeros(size ** dims, channels, dtype=centers.dtype, device=centers.device)
    strides = torch.tensor([size ** (dims - 1 - a) for a in range(dims)], device=centers.device)
    for a, b in chunk_ranges(count, MAX_PAIRS):
        owner, pts = box_points(lo[a:b], hi[a:b])
        if len(owner):
            owner = owner + a
            out.index_add_(0, (pts * strides).sum(-1), weight_fn(owner, pts.to(centers.dtype) - centers[owner]))
    return out


@torch.no_grad()
def density_grids(means, quats, scales, opacities, colors, bound: float, resolution: int):
    """``(density [R,R,R], colour [R,R,R,3])`` on the grid ``linspace(-bound, bound, R)`` per axis,
    indexed ``[x,y,z]``."""
    h = 2 * bound / (resolution - 1)
    covars, precis = quat_scale_to_covar_preci(quats, scales)
    centers = (means + bound) / h
    radius = opacity_extent(opacities)[:, None] * covars.diagonal(dim1=-2, dim2=-1).sqrt() / h
    precis_grid = precis * h * h  # offsets are in grid units

    def weights(owner, offset):
        q = torch.einsum("pi,pij,pj->p", offset, precis_grid[owner], offset)
        w = opacities[owner] * torch.exp(-0.5 * q)
        w = torch.where(w >= ALPHA_THRESHOLD, w, torch.zeros_like(w))
        return torch.cat([w[:, None], w[:, None] * colors[owner]], 1)

    acc = _splat(centers, radius, resolution, weights, 4, 3).view(resolution, resolution, resolution, 4)
    density = acc[..., 0]
    color = acc[..., 1:] / density[..., None].clamp_min(1e-8)
    return density, color


@torch.no_grad()
def gaussians_surface(means, quats, scales, opacities, colors, bound: float, resolution: int = 128,
                      threshold: float | None = None, shell: float = 0.0,
                      view_alpha: np.ndarray | None = None, smooth: float = 0.0,
                      values: np.ndarray | None = None) -> Surface:
    """The Gaussians' surface (+Y up, world units) with the colour grid as its colour function, at
    ``threshold`` or (None) ``meshing.view_level`` with ``view_alpha``, the Gaussians' renders of
    ``meshing.level_cameras``. With
    ``shell > 0`` a surface point's colour is seen through the shell (``meshing.Surface``) with the
    density grid as an extinction: ``sum_i o_i exp(-q_i / 2)`` over ``sqrt(2 pi)`` times the
    Gaussians' median scale, what a ray through one Gaussian of that size integrates to its
    opacity (for small opacities). ``values`` (a grid like the density's, positive inside), when
    given, is meshed at its zero level instead of the density (the surfels' fused depth)."""
    check_mesh_resolution(resolution)
    means, quats, scales = means.float(), quats.float(), scales.float()
    opacities, colors = opacities.float(), colors.float()
    density, color = density_grids(means, quats, scales, opacities, colors, bound, resolution)
    grid = color.permute(3, 2, 1, 0)  # [3,z,y,x] for grid_sample's (x, y, z) order
    extinction = (density / (math.sqrt(2 * math.pi) * scales.median())).permute(2, 1, 0)[None]

    def color_fn(points):
        return sample_grid(grid, points.to(grid) / bound)

    if values is None:
        surface = surface_from_grid(density.cpu().numpy(), color_fn, bound, threshold, device=means.device,
                                    view_alpha=view_alpha, smooth=smooth)
    else:
        surface = surface_from_grid(values, color_fn, bound, 0.0, device=means.device, smooth=smooth)
    if shell > 0:
        surface = dataclasses.replace(surface, density_fn=lambda points: sample_grid(extinction, points.to(grid) / bound)[:, 0],
                                      shell=shell)
    return surface
