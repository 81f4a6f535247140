"""UV textures for exported meshes: an xatlas unwrap, then the field's colour baked into an image.

- **unwrap**: xatlas cuts the mesh into charts and packs them into the unit square with a gap of
  ``padding`` texels between charts; vertices on a seam are duplicated (one copy per chart).
- **bake**: every texel whose centre lies inside a chart triangle gets the representation's colour
  at the 3D surface point under it (barycentric interpolation of the triangle's corners); the
  rest of the image (seams, gaps, unused space) takes the colour of its nearest baked texel, so
  bilinear and mip-mapped sampling never pull in a background colour at a chart's border.

UVs follow the glTF/OpenGL convention that trimesh uses: ``u`` to the right, ``v`` up from the
image's bottom row (trimesh flips ``v`` when it writes glTF).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import xatlas
from scipy.ndimage import distance_transform_edt

from threedgen.boxes import box_points, chunk_ranges
from threedgen.errors import UserError

MAX_PAIRS = 1 << 22  # (triangle, texel) candidates tested at once


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int, padding: int = 2):
    """xatlas charts packed for a ``size``-square image: ``(vmapping [V'], faces [F,3], uv [V',2])``
    where new vertex ``k`` is old vertex ``vmapping[k]``."""

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, new_faces, uv = atlas[0]
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uv.astype(np.float32)


def texel_coordinates(uv: np.ndarray, size: int) -> np.ndarray:
    """UVs as continuous texel coordinates ``(column, row)`` where texel ``(i, j)``'s centre is
    ``(i, j)`` and row 0 is the image's top."""
    return np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], 1)


def rasterize_uv(positions: np.ndarray, faces: np.ndarray, uv: np.ndarray, size: int):
    """The 3D surface point under every texel centre covered by a triangle in UV space:
    ``(rows [K], cols [K], points [K,C])``; a texel on a shared edge is taken once. ``positions``
    ``[V,C]`` may carry more per-vertex values than a position (e.g. normals): all are
    interpolated alike."""
    tex = torch.as_tensor(texel_coordinates(uv, size), dtype=torch.float64)[torch.as_tensor(faces)]  # [F,3,2]
    pos = torch.as_tensor(positions, dtype=torch.float64)[torch.as_tensor(faces)]  # [F,3,3]
    a, b, c = tex[:, 0], tex[:, 1], tex[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    keep = area.abs() > 1e-12
    lo = torch.ceil(tex.amin(1)).clamp(0, size - 1).long()
    hi = torch.floor(tex.amax(1)).clamp(-1, size - 1).long()
    hi = torch.where(keep[:, None], hi, lo - 1)  # degenerate triangles cover nothing
    count = (hi - lo + 1).clamp_min(0).prod(-1)
    covered = torch.zeros(size * size, dtype=torch.bool)
    points = torch.zeros(size * size, pos.shape[-1], dtype=torch.float64)
    eps = 1e-9
    for s, e in chunk_ranges(count, MAX_PAIRS):
        owner, pts = box_points(lo[s:e], hi[s:e])
        if not len(owner):
            continue
        owner = owner + s
        p = pts.to(torch.float64)
        ta, tb, tc = a[owner], b[owner], c[owner]
        w_b = ((p[:, 0] - ta[:, 0]) * (tc[:, 1] - ta[:, 1]) - (p[:, 1] - ta[:, 1]) * (tc[:, 0] - ta[:, 0])) / area[owner]
        w_c = ((tb[:, 0] - ta[:, 0]) * (p[:, 1] - ta[:, 1]) - (tb[:, 1] - ta[:, 1]) * (p[:, 0] - ta[:, 0])) / area[owner]
        w_a = 1 - w_b - w_c
        inside = (w_a >= -eps) & (w_b >= -eps) & (w_c >= -eps)
        owner, p = owner[inside], pts[inside]
        w = torch.stack([w_a[inside], w_b[inside], w_c[inside]], 1)
        flat = p[:, 1] * size + p[:, 0]
        points[flat] = (w[:, :, None] * pos[owner]).sum(1)
        covered[flat] = True
    flat = torch.nonzero(covered)[:, 0]
    return (flat // size).numpy(), (flat % size).numpy(), points[flat].numpy()


def bake_texture(positions: np.ndarray, faces: np.ndarray, uv: np.ndarray, size: int,
                 colors: Callable[..., np.ndarray], normals: np.ndarray | None = None) -> np.ndarray:
    """A ``[size,size,3]`` uint8 base-colour image of ``colors`` (points ``[N,3]`` -> uint8 RGB(A),
    e.g. ``threedgen.meshing.Surface.colors``; given per-vertex ``normals``, called as
    ``colors(points, normals)`` with them interpolated too) over the surface, empty texels filled
    from their nearest baked texel (see the module docstring)."""

    attributes = positions if normals is None else np.concatenate([positions, normals], 1)
    rows, cols, values = rasterize_uv(attributes, faces, uv, size)
    if not len(rows):
        raise UserError("the texture atlas covers no texel; raise export.texture_size")
    image = np.zeros((size, size, 3), np.uint8)
    image[rows, cols] = (colors(values) if normals is None else colors(values[:, :3], values[:, 3:]))[:, :3]
    empty = np.ones((size, size), bool)
    empty[rows, cols] = False
    if empty.any():
        idx = distance_transform_edt(empty, return_distances=False, return_indices=True)
        image = image[idx[0], idx[1]]
    return image
