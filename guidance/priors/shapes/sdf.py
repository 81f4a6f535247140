"""Exact signed distance functions of the shapes prior's world (inside [-0.5, 0.5]^3, +Y up).

Every function takes points ``[..., 3]`` and returns distances ``[...]`` (negative inside). The
formulas are the standard exact ones for each primitive (see Inigo Quilez's catalogue of SDFs).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

SDF = Callable[[torch.Tensor], torch.Tensor]


def _length2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


def cube(p: torch.Tensor, half: float = 0.4) -> torch.Tensor:
    q = p.abs() - half
    outside = q.clamp(min=0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp(max=0)
    return outside + inside


def sphere(p: torch.Tensor, radius: float = 0.45) -> torch.Tensor:
    return p.norm(dim=-1) - radius


def cylinder(p: torch.Tensor, radius: float = 0.35, half_height: float = 0.42) -> torch.Tensor:
    dx = _length2(p[..., 0], p[..., 2]) - radius
    dy = p[..., 1].abs() - half_height
    return torch.maximum(dx, dy).clamp(max=0) + _length2(dx.clamp(min=0), dy.clamp(min=0))


def cone(p: torch.Tensor, radius: float = 0.42, half_height: float = 0.42) -> torch.Tensor:
    """A cone with its base (``radius``) at y = -half_height and its apex at y = +half_height."""
    h, r1 = half_height, radius
    qx, qy = _length2(p[..., 0], p[..., 2]), p[..., 1]
    # Distance to the base disc's rim region / caps.
    cap_r = torch.where(qy < 0, torch.full_like(qx, r1), torch.zeros_like(qx))
    ca_x = qx - torch.minimum(qx, cap_r)
    ca_y = qy.abs() - h
    # Distance to the slanted side: segment from (0, h) to (r1, -h).
    k2x, k2y = -r1, 2 * h
    t = (((0.0 - qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0, 1)
    cb_x = qx - 0.0 + k2x * t
    cb_y = qy - h + k2y * t
    sign = torch.where((cb_x < 0) & (ca_y < 0), -1.0, 1.0)
    return sign * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


def torus(p: torch.Tensor, major: float = 0.32, minor: float = 0.14) -> torch.Tensor:
    """A torus lying in the XZ plane (its hole looks up the Y axis)."""
    qx = _length2(p[..., 0], p[..., 2]) - major
    return _length2(qx, p[..., 1]) - minor


def capsule(p: torch.Tensor, radius: float = 0.22, half_length: float = 0.23) -> torch.Tensor:
    """A vertical capsule: a segment from y=-half_length to y=+half_length, thickened by radius."""
    y = p[..., 1] - p[..., 1].clamp(-half_length, half_length)
    return torch.sqrt(p[..., 0] ** 2 + y * y + p[..., 2] ** 2) - radius


def pyramid(p: torch.Tensor, base: float = 0.8, height: float = 0.8) -> torch.Tensor:
    """A square pyramid: base side ``base`` at y = -height/2, apex at y = +height/2."""
    s = base
    h = height / s  # height in units of the base side
    x, y, z = p[..., 0] / s, (p[..., 1] + height / 2) / s, p[..., 2] / s
    m2 = h * h + 0.25
    x, z = x.abs(), z.abs()
    x, z = torch.maximum(x, z), torch.minimum(x, z)  # fold so that x >= z
    x, z = x - 0.5, z - 0.5
    qx = z
    qy = h * y - 0.5 * x
    qz = h * x + 0.5 * y
    ss = (-qx).clamp(min=0)
    t = ((qy - 0.5 * z) / (m2 + 0.25)).clamp(0, 1)
    a = m2 * (qx + ss) ** 2 + qy * qy
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0, torch.zeros_like(a), torch.minimum(a, b))
    sign = torch.sign(torch.maximum(qz, -y))
    return torch.sqrt((d2 + qz * qz) / m2) * sign * s


SDFS: dict[str, SDF] = {"cube": cube, "sphere": sphere, "cylinder": cylinder, "cone": cone,
                        "torus": torus, "capsule": capsule, "pyramid": pyramid}


def truth_mesh(shape: str, resolution: int = 160):
    """A triangle mesh of the shape's zero level set (marching cubes on the exact SDF)."""
    import mcubes
    import trimesh

    bound = 0.55
    lin = torch.linspace(-bound, bound, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1)
    values = SDFS[shape](grid).numpy()
    verts, faces = mcubes.marching_cubes(-values, 0.0)
    verts = verts * (2 * bound / (resolution - 1)) - bound
    mesh = trimesh.Trimesh(np.asarray(verts, np.float64), np.asarray(faces, np.int64), process=True)
    trimesh.repair.fix_normals(mesh)
    return mesh
