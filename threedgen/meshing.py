"""Meshes from density fields: marching cubes at a given level, clean-up, vertex colours.

Orientation: threedgen's world is +Y up with the object's front towards +Z, which is glTF's
convention, so meshes are written without any axis change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import mcubes
import numpy as np
import torch
import trimesh
from scipy.ndimage import binary_fill_holes, gaussian_filter

from threedgen.cameras import Cameras, ray_aabb
from threedgen.errors import UserError

SHELL_SAMPLES = 8  # samples along the inward normal when a surface's colour is seen through its shell


@torch.no_grad()
def grid_values(fn: Callable[[torch.Tensor], torch.Tensor], bound: float, resolution: int,
                device: torch.device | str = "cpu", chunk: int = 2 ** 18) -> np.ndarray:
    """``fn`` on a ``resolution^3`` grid over ``[-bound, bound]^3``, indexed ``[x, y, z]``; points are
    made one x-slab at a time so memory stays at one slab plus the result."""
    lin = torch.linspace(-bound, bound, resolution, device=device)
    yz = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1).reshape(-1, 2)
    out = np.empty((resolution, resolution * resolution), np.float32)
    for i, x in enumerate(lin):
        pts = torch.cat([x.expand(yz.shape[0], 1), yz], 1)
        out[i] = torch.cat([fn(pts[j:j + chunk]).float().cpu() for j in range(0, pts.shape[0], chunk)]).numpy()
    return out.reshape(resolution, resolution, resolution)


# The views whose silhouettes pick the isosurface level: all around and from below and above, none
# along the grid's axes (a line along a box's face grazes it for its whole length).
LEVEL_VIEWS = ((-40.0, 10.0), (-40.0, 130.0), (-40.0, 250.0), (0.0, 40.0), (0.0, 100.0), (0.0, 160.0),
               (0.0, 220.0), (0.0, 280.0), (0.0, 340.0), (40.0, 70.0), (40.0, 190.0), (40.0, 310.0),
               (80.0, 25.0), (-80.0, 25.0))
LEVEL_RESOLUTION = 96


def level_cameras(bound: float) -> Cameras:
    """``LEVEL_VIEWS`` looking at the scene box's centre from 5 x ``bound`` with a 40-degree field of
    view: the whole box ``[-bound, bound]^3`` is in every image."""
    el, az = zip(*LEVEL_VIEWS)
    return Cameras.from_angles(list(el), list(az), 5.0 * bound, 40.0)


@torch.no_grad()
def view_level(values: np.ndarray, bound: float, alpha: np.ndarray | None = None, candidates: int = 256,
               size: int = LEVEL_RESOLUTION) -> float:
    """The automatic isosurface level: the density level whose silhouettes match the field's renders.

    For every pixel of ``level_cameras`` at ``size``x``size``, the ray renders opaque where its
    alpha reaches 0.5, and a mesh at level ``tau`` covers it where the ray's largest density exceeds
    ``tau``; the level maximises the IoU of the two over all pixels (the geometric middle of the best
    range when several levels tie, as for a sharp field). No hand-tuned constant: a soft field gets
    a low level, a sharp one a level between its inside and outside.

    Densities along a ray are the grid's, trilinear, about a voxel apart, on the rays through the
    box around the grid's voxels above 1 % of its peak (the others see next to nothing). ``alpha`` (the renders'
    opacity at those pixels, flattened) is for representations that render otherwise (Gaussians);
    by default it is the grid's own volume rendering, ``1 - exp(-sum sigma dt)``."""
    resolution = values.shape[0]
    voxel = 2 * bound / (resolution - 1)
    positive = np.maximum(values, 0)
    cams = level_cameras(bound)
    o, d = cams.rays(size, size)
    o, d = o.reshape(-1, 3).double(), d.reshape(-1, 3).double()
    peak = torch.zeros(len(o))
    depth = torch.zeros(len(o))
    occupied = np.argwhere(positive > 0.01 * positive.max()) if positive.max() > 0 else np.zeros((0, 3))
    if len(occupied):
        # Only rays through the box around every voxel above 1 % of the peak density, with a voxel's
        # margin: the density outside it is too faint to be a level or to make a ray opaque.
        lower = torch.as_tensor(occupied.min(0) * voxel - bound - voxel, dtype=torch.float64)
        upper = torch.as_tensor(occupied.max(0) * voxel - bound + voxel, dtype=torch.float64)
        near, far = ray_aabb(o, d, lower, upper)
        hit = torch.nonzero(far > near).flatten()
        grid = torch.as_tensor(positive, dtype=torch.float32).permute(2, 1, 0)[None, None]  # [1,1,z,y,x]
        for chunk in hit.split(1 << 12):
            step = (far[chunk] - near[chunk]) / resolution  # about a voxel
            t = near[chunk, None] + step[:, None] * (torch.arange(resolution, dtype=torch.float64) + 0.5)
            pts = (o[chunk, None] + d[chunk, None] * t[..., None]) / bound
            sigma = torch.nn.functional.grid_sample(grid, pts.float().view(1, 1, 1, -1, 3), mode="bilinear",
                                                    align_corners=True).view(len(chunk), -1)
            peak[chunk] = sigma.amax(1)
            depth[chunk] = sigma.sum(1) * step.float()
    opaque = (1 - torch.exp(-depth) >= 0.5).numpy() if alpha is None else np.asarray(alpha).reshape(-1) >= 0.5
    peak = peak.numpy()
    if not opaque.any() or not (peak > 0).any():
        return float("inf")
    q = np.quantile(peak[peak > 0], np.linspace(0, 1, candidates))
    q = np.unique(np.round(q / q[-1], 5)) * q[-1]  # peaks within 1e-5 of each other are one value
    # Midpoints between ray peaks: a level equal to a sample makes marching cubes degenerate.
    cands = np.concatenate([q[:1] * 0.5, (q[1:] + q[:-1]) / 2]) if len(q) > 1 else q * 0.5
    covered = peak[None, :] > cands[:, None]
    iou = (covered & opaque[None]).sum(1) / np.maximum((covered | opaque[None]).sum(1), 1)
    best = cands[iou >= iou.max() - 1e-3]
    level = float(np.sqrt(best.min() * best.max()) if best.min() > 0 else best.mean())
    while np.any(values == level):  # never exactly on a sample
        level = float(np.nextafter(np.float32(level), np.float32(np.inf)))
    return level


@dataclass
class Surface:
    """A representation's surface for export: ``mesh`` (a ``trimesh.Trimesh`` in world units, +Y up,
    outward normals, no colours) and ``color_fn`` (world points ``[N,3]`` -> rgb ``[N,3]`` in [0,1],
    the representation's colour there), evaluated on ``device``.

    With ``density_fn`` (points -> volume density, per world unit) and ``shell > 0``, the colour of
    a surface point is what a ray along its inward normal sees (``shell_colors``) rather than the
    colour field at the point: an isosurface of a soft field sits where the field is still
    translucent, and its colour there is half learned, half the random background's."""

    mesh: object
    color_fn: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device | str = "cpu"
    density_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    shell: float = 0.0

    @torch.no_grad()
    def colors(self, points: np.ndarray, normals: np.ndarray | None = None, chunk: int = 1 << 16) -> np.ndarray:
        """``[N,4]`` uint8 RGBA (opaque) of the colour at ``points`` (seen along ``-normals`` when
        given and the surface has a density)."""
        pts = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=self.device)
        shell = normals is not None and self.density_fn is not None and self.shell > 0
        if shell:
            nrm = torch.as_tensor(np.array(normals, np.float32), device=self.device)
            step = max(1, chunk // SHELL_SAMPLES)
            rgb = [self.shell_colors(pts[i:i + step], nrm[i:i + step]).float().cpu() for i in range(0, len(pts), step)]
        else:
            rgb = [self.color_fn(pts[i:i + chunk]).float().cpu() for i in range(0, len(pts), chunk)]
        rgb = torch.cat(rgb) if rgb else torch.zeros(0, 3)
        return np.concatenate([(rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8),
                               np.full((len(pts), 1), 255, np.uint8)], 1)

    def shell_colors(self, points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        """Volume rendering along each point's inward normal from ``shell`` outside the surface to
        ``shell`` inside (``SHELL_SAMPLES`` samples), normalised by the opacity gathered; where the
        ray gathers next to none (below 1e-3), the colour field at the point."""
        n = SHELL_SAMPLES
        unit = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        t = torch.linspace(self.shell, -self.shell, n, device=points.device)
        samples = (points[:, None, :] + t[None, :, None] * unit[:, None, :]).reshape(-1, 3)
        sigma = self.density_fn(samples).float().view(-1, n)
        rgb = self.color_fn(samples).float().view(-1, n, 3)
        alpha = 1 - torch.exp(-sigma.clamp_min(0) * (2 * self.shell / n))
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
        weights = alpha * trans
        total = weights.sum(1, keepdim=True)
        seen = (weights[..., None] * rgb).sum(1) / total.clamp_min(1e-10)
        return torch.where(total > 1e-3, seen, self.color_fn(points).float())

    def colored_mesh(self):
        """A copy of the mesh with vertex colours from ``color_fn``."""

        mesh = self.mesh.copy()
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=self.colors(mesh.vertices,
                                                                                   mesh.vertex_normals))
        return mesh


@torch.no_grad()
def surface_from_field(density_fn, color_fn, bound: float, resolution: int, threshold: float | None = None,
                       min_component_fraction: float = 0.02, device: torch.device | str = "cpu",
                       shell: float = 0.0, smooth: float = 0.0) -> Surface:
    """Marching cubes of ``density_fn`` sampled on a ``resolution^3`` grid over ``[-bound, bound]^3``
    (see ``surface_from_grid``); with ``shell > 0`` colours are seen through the surface's shell
    (see ``Surface``)."""
    check_mesh_resolution(resolution)
    values = grid_values(density_fn, bound, resolution, device)
    surface = surface_from_grid(values, color_fn, bound, threshold, min_component_fraction, device, smooth=smooth)
    return dataclasses.replace(surface, density_fn=density_fn, shell=shell) if shell > 0 else surface


def smoothed(values: np.ndarray, bound: float, smooth: float) -> np.ndarray:
    """A density grid over ``[-bound, bound]^3`` blurred by a Gaussian of standard deviation
    ``smooth`` world units (0: unchanged): pits and bumps of about that size, as a noisy field
    has, flatten; edges round by about as much."""
    if smooth <= 0:
        return values
    return gaussian_filter(values, smooth * (values.shape[0] - 1) / (2 * bound))


def mesh_level(values: np.ndarray, bound: float, threshold: float | None = None, smooth: float = 0.0,
               view_alpha: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The grid the export meshes and its isosurface level: ``values`` blurred by ``smooth``
    (``smoothed``), at ``threshold`` or (None) that grid's own ``view_level`` with ``view_alpha``.
    ``surface_from_grid`` meshes it; the representations' opacity grids put their 0.5 there."""
    values = smoothed(values, bound, smooth)
    return values, (view_level(values, bound, view_alpha) if threshold is None else threshold)


def check_mesh_resolution(resolution: int) -> None:
    if resolution < 8 or resolution > 1024:
        raise UserError(f"mesh resolution must be between 8 and 1024; got {resolution}")


@torch.no_grad()
def surface_from_grid(values: np.ndarray, color_fn, bound: float, threshold: float | None = None,
                      min_component_fraction: float = 0.02, device: torch.device | str = "cpu",
                      view_alpha: np.ndarray | None = None, smooth: float = 0.0) -> Surface:
    """Marching cubes of a density grid ``values [x,y,z]`` over ``[-bound, bound]^3`` at
    ``threshold`` (None: ``view_level``, with the renders' ``view_alpha`` if given), enclosed cavities filled;
    components with fewer than ``min_component_fraction`` of the largest one's faces (floaters)
    are dropped. The grid is padded with empty space, so every component is closed (watertight).
    ``smooth > 0`` first blurs the grid (``mesh_level``)."""

    resolution = values.shape[0]
    if not np.isfinite(values).all():
        raise UserError("the density field holds non-finite values; the run diverged and cannot be exported")
    values, threshold = mesh_level(values, bound, threshold, smooth, view_alpha)
    if not values.max() > threshold:
        raise UserError(f"the density field is empty at the isosurface level {threshold:.3g} "
                        f"(max density {values.max():.3g}); nothing to export")
    # Score distillation never sees inside an opaque object, so low-density pockets there are
    # arbitrary: fill enclosed cavities so they do not become inner surfaces (a torus's hole is
    # open to the outside and stays).

    solid = values > threshold
    cavities = binary_fill_holes(solid) & ~solid
    if cavities.any():
        values = np.where(cavities, values.max(), values)
    # Pad with empty space (0 for a density, the grid's lowest value for a negated signed distance)
    # so the surface closes at the box's faces.
    padded = np.pad(values, 1, constant_values=min(0.0, float(values.min())))
    verts, faces = mcubes.marching_cubes(padded, float(threshold))
    verts = (verts - 1) * (2 * bound / (resolution - 1)) - bound
    mesh = trimesh.Trimesh(verts, faces.astype(np.int64), process=True)
    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:
        biggest = max(len(p.faces) for p in parts)
        mesh = trimesh.util.concatenate([p for p in parts if len(p.faces) >= min_component_fraction * biggest])
    # mcubes orients faces for increasing values inside; make normals point out of the solid.
    mesh.invert()
    trimesh.repair.fix_normals(mesh)
    # A fresh mesh: invert() negates the cached normals and fix_normals may invert again, which
    # left the cache inward while the winding was outward (inward vertex normals without decimation).
    mesh = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
    return Surface(mesh, color_fn, device)
