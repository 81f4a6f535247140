"""What an artist sees in an exported mesh, measured against the truth (part of ``threedgen eval``).

All of them take the exported mesh in world units (the eval divides by ``export.scale``), turned
back onto the truth by the eval's best yaw, and a truth with ``nearest_surface`` and
``shaded_color`` (the shapes prior's ``ShapeTruth``):

- ``normal_error_deg``: the mean angle between the mesh's face normal at points sampled uniformly
  over its surface (area-weighted) and the truth's outward normal at the truth's surface point
  nearest each. Dents, pits and rounded-off edges raise it; a flat face that is flat scores ~0.
- ``texture_color_error``: the mean Euclidean RGB distance (channels in [0, 1], so at most
  sqrt(3)) between the mesh's colour at the same points (its baked texture, bilinear at the
  point's UV, or its interpolated vertex colours) and the colour the truth shows there: its albedo
  under the prior's view-independent shading, which is what a representation learns as colour.
- ``watertight`` and ``pinched_edges`` / ``open_edges``, of the mesh welded by position (a
  texture's seams are not holes): edges with more than two faces / with one face.
  ``watertight`` is trimesh's (every edge on exactly two faces, consistently wound).
- ``height`` and ``height_error``: the mesh's bounding-box extent along +Y minus the truth's, in
  metres at the export's scale (signed: a sagging underside makes it positive).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import trimesh

SAMPLES = 20000


def welded(mesh) -> trimesh.Trimesh:
    """The mesh's geometry alone, its vertices merged by position."""
    out = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
    out.merge_vertices(merge_tex=True, merge_norm=True)
    return out


def topology(mesh) -> dict:
    """``watertight``, ``open_edges`` and ``pinched_edges`` (see the module docstring)."""
    solid = welded(mesh)
    _, counts = np.unique(solid.edges_sorted, axis=0, return_counts=True)
    return {"watertight": bool(solid.is_watertight), "open_edges": int((counts == 1).sum()),
            "pinched_edges": int((counts > 2).sum())}


def rotation_y(degrees: float) -> np.ndarray:
    """The rotation about +Y that turns +Z towards +X by ``degrees`` (the azimuth's direction)."""
    a = math.radians(degrees)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples ``[N,C]`` in [0, 1] of a uint8 image ``[H,W,C]`` at glTF/OpenGL UVs (``v`` up
    from the bottom row, as trimesh loads them), clamped at the border, texel centres at half
    integers: ``grid_sample`` without ``align_corners``."""
    img = torch.from_numpy(np.array(image, np.float64)).permute(2, 0, 1)[None] / 255.0
    grid = torch.as_tensor(np.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1]], 1), dtype=torch.float64)
    out = torch.nn.functional.grid_sample(img, grid.view(1, 1, -1, 2), mode="bilinear", padding_mode="border",
                                          align_corners=False)
    return out.view(img.shape[1], -1).T.numpy()


def surface_colors(mesh, points: np.ndarray, faces: np.ndarray) -> np.ndarray | None:
    """The mesh's RGB in [0, 1] at ``points`` on ``faces``: its base-colour texture at the
    interpolated UV (times the material's base-colour factor), or its interpolated vertex colours;
    None for a mesh with neither."""
    bary = trimesh.triangles.points_to_barycentric(mesh.triangles[faces], points)
    corners = np.asarray(mesh.faces)[faces]
    visual = mesh.visual
    if visual.kind == "texture" and getattr(visual, "uv", None) is not None:
        material = visual.material
        image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
        if image is None:
            return None
        uv = (np.asarray(visual.uv)[corners] * bary[:, :, None]).sum(1)
        rgb = sample_texture(np.asarray(image.convert("RGB")), uv)
        factor = getattr(material, "baseColorFactor", None)
        return rgb * (np.asarray(factor[:3], np.float64) / 255.0 if factor is not None else 1.0)
    if visual.kind == "vertex":
        colors = np.asarray(visual.vertex_colors, np.float64)[:, :3] / 255.0
        return (colors[corners] * bary[:, :, None]).sum(1)
    return None


def surface_metrics(mesh, truth, yaw: float = 0.0, scale: float = 1.0, n: int = SAMPLES, seed: int = 0) -> dict:
    """The metrics of the module docstring for ``mesh`` (world units; the file is ``scale`` metres
    per unit) against ``truth``, the mesh turned back by ``-yaw`` degrees about +Y first."""
    if mesh is None or len(mesh.faces) == 0:
        return {"normal_error_deg": None, "texture_color_error": None, "watertight": False, "open_edges": 0,
                "pinched_edges": 0, "height": 0.0, "height_error": None}
    points, faces = trimesh.sample.sample_surface(mesh, n, seed=seed)
    back = rotation_y(-yaw)
    world = torch.as_tensor(np.asarray(points) @ back.T)
    _, true_normal = truth.nearest_surface(world)
    normal = np.asarray(mesh.face_normals)[faces] @ back.T
    cos = np.clip((normal * true_normal.numpy()).sum(1), -1.0, 1.0)
    colors = surface_colors(mesh, np.asarray(points), faces)
    color_error = None
    if colors is not None:
        color_error = float(np.linalg.norm(colors - truth.shaded_color(world).numpy(), axis=1).mean())
    true_bounds = truth.mesh().bounds
    height = float(mesh.bounds[1][1] - mesh.bounds[0][1]) * scale
    return {"normal_error_deg": float(np.degrees(np.arccos(cos)).mean()), "texture_color_error": color_error,
            **topology(mesh), "height": height,
            "height_error": height - float(true_bounds[1][1] - true_bounds[0][1]) * scale}
