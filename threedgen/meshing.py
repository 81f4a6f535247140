"""Meshes from density fields: marching cubes at a given level, clean-up, vertex colours.

Orientation: threedgen's world is +Y up with the object's front towards +Z, which is glTF's
convention, so meshes are written without any axis change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mcubes
import numpy as np
import torch
import trimesh
from scipy.ndimage import binary_fill_holes

from threedgen.errors import UserError


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


def silhouette_level(values: np.ndarray, voxel: float, candidates: int = 256,
                     opaque: np.ndarray | None = None) -> float:
    """The automatic isosurface level: the density level whose silhouettes match the field's renders.

    Along every axis-aligned grid line, the field renders opaque (alpha >= 0.5) where its optical
    depth reaches ln 2; a mesh at level ``tau`` covers the line where the line's largest density
    exceeds ``tau``. The level maximises the IoU of the two over all lines of the three axes (the
    middle of the best range when several levels tie, as for a sharp field). No hand-tuned constant:
    a soft field gets a low level, a sharp one a level between its inside and outside.

    ``opaque`` replaces the volume-rendering test for representations that render otherwise
    (Gaussians): the lines' opacity flags, concatenated in the order of ``values.max(axis=a)`` for
    a = 0, 1, 2."""
    v = np.maximum(values, 0)
    if opaque is None:
        opaque = np.concatenate([(v.sum(axis=a) * voxel >= np.log(2.0)).ravel() for a in range(3)])
    peak = np.concatenate([v.max(axis=a).ravel() for a in range(3)])
    if not opaque.any():
        return float("inf")
    q = np.unique(np.quantile(peak[peak > 0], np.linspace(0, 1, candidates)))
    # Midpoints between grid values: a level equal to a sample makes marching cubes degenerate.
    cands = np.concatenate([q[:1] * 0.5, (q[1:] + q[:-1]) / 2]) if len(q) > 1 else q * 0.5
    covered = peak[None, :] > cands[:, None]
    inter = (covered & opaque[None]).sum(1)
    union = (covered | opaque[None]).sum(1)
    iou = inter / np.maximum(union, 1)
    best = cands[iou >= iou.max() - 1e-3]
    level = float(np.sqrt(best.min() * best.max()) if best.min() > 0 else best.mean())
    while np.any(values == level):  # never exactly on a sample
        level = float(np.nextafter(np.float32(level), np.float32(np.inf)))
    return level


@dataclass
class Surface:
    """A representation's surface for export: ``mesh`` (a ``trimesh.Trimesh`` in world units, +Y up,
    outward normals, no colours) and ``color_fn`` (world points ``[N,3]`` -> rgb ``[N,3]`` in [0,1],
    the representation's colour there), evaluated on ``device``."""

    mesh: object
    color_fn: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device | str = "cpu"

    @torch.no_grad()
    def colors(self, points: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """``[N,4]`` uint8 RGBA (opaque) of the colour at ``points``."""
        pts = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=self.device)
        rgb = [self.color_fn(pts[i:i + chunk]).float().cpu() for i in range(0, len(pts), chunk)]
        rgb = torch.cat(rgb) if rgb else torch.zeros(0, 3)
        return np.concatenate([(rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8),
                               np.full((len(pts), 1), 255, np.uint8)], 1)

    def colored_mesh(self):
        """A copy of the mesh with vertex colours from ``color_fn``."""

        mesh = self.mesh.copy()
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=self.colors(mesh.vertices))
        return mesh


@torch.no_grad()
def surface_from_field(density_fn, color_fn, bound: float, resolution: int, threshold: float | None = None,
                       min_component_fraction: float = 0.02, device: torch.device | str = "cpu") -> Surface:
    """Marching cubes of ``density_fn`` sampled on a ``resolution^3`` grid over ``[-bound, bound]^3``
    (see ``surface_from_grid``)."""
    check_mesh_resolution(resolution)
    values = grid_values(density_fn, bound, resolution, device)
    return surface_from_grid(values, color_fn, bound, threshold, min_component_fraction, device)


def check_mesh_resolution(resolution: int) -> None:
    if resolution < 8 or resolution > 1024:
        raise UserError(f"mesh resolution must be between 8 and 1024; got {resolution}")


@torch.no_grad()
def surface_from_grid(values: np.ndarray, color_fn, bound: float, threshold: float | None = None,
                      min_component_fraction: float = 0.02, device: torch.device | str = "cpu",
                      opaque: np.ndarray | None = None) -> Surface:
    """Marching cubes of a density grid ``values [x,y,z]`` over ``[-bound, bound]^3`` at
    ``threshold`` (None: ``silhouette_level``, with ``opaque`` if given), enclosed cavities filled;
    components with fewer than ``min_component_fraction`` of the largest one's faces (floaters)
    are dropped. The grid is padded with empty space, so every component is closed (watertight)."""

    resolution = values.shape[0]
    if not np.isfinite(values).all():
        raise UserError("the density field holds non-finite values; the run diverged and cannot be exported")
    if threshold is None:
        threshold = silhouette_level(values, 2 * bound / (resolution - 1), opaque=opaque)
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
    # Pad so the surface closes at the box's faces.
    padded = np.pad(values, 1, constant_values=0.0)
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
    return Surface(mesh, color_fn, device)
