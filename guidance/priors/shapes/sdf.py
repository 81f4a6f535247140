"""Signed distance functions of the shapes prior's world (inside [-0.5, 0.5]^3, +Y up, front +Z).

Every function takes points ``[..., 3]`` and returns distances ``[...]`` (negative inside). The
primitives are the standard exact formulas (see Inigo Quilez's catalogue of SDFs). The objects
with a front (``PARTS``) are unions and differences of exact primitives, in two parts: the body,
which takes the prompt's colour, and the front marker, which has ``MARKER_COLOUR``. A union
(``min``) or difference (``max(a, -b)``) of exact distances has the exact zero set and sign and
never overestimates the distance, which is what sphere tracing and marching cubes need.
"""

from __future__ import annotations

from typing import Callable

import torch

SDF = Callable[[torch.Tensor], torch.Tensor]


def _length2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


def box(p: torch.Tensor, center, half) -> torch.Tensor:
    """An axis-aligned box with half-sides ``half`` around ``center``."""
    q = (p - p.new_tensor(center)).abs() - p.new_tensor(half)
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def cube(p: torch.Tensor, half: float = 0.4) -> torch.Tensor:
    return box(p, (0.0, 0.0, 0.0), (half, half, half))


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


def _segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ab = b - a
    t = (((p - a) * ab).sum(-1) / (ab * ab).sum()).clamp(0, 1)
    return (p - a - t[..., None] * ab).norm(dim=-1)


def _triangle_distance(p: torch.Tensor, a, b, c) -> torch.Tensor:
    """Unsigned distance from points to a triangle: to its plane where the projection falls inside,
    to the nearest edge otherwise."""
    n = torch.cross(b - a, c - a, dim=-1)
    n = n / n.norm()
    inside = torch.ones(p.shape[:-1], dtype=torch.bool, device=p.device)
    for u, v in ((a, b), (b, c), (c, a)):
        inside &= (torch.cross((v - u).expand_as(p), p - u, dim=-1) * n).sum(-1) >= 0
    plane = ((p - a) * n).sum(-1).abs()
    edges = torch.minimum(torch.minimum(_segment_distance(p, a, b), _segment_distance(p, b, c)),
                          _segment_distance(p, c, a))
    return torch.where(inside, plane, edges)


def pyramid(p: torch.Tensor, base: float = 0.8, height: float = 0.8) -> torch.Tensor:
    """A square pyramid: base side ``base`` at y = -height/2, apex at y = +height/2.

    Exact: by the pyramid's symmetries (x -> -x, z -> -z, x <-> z) every point folds into the wedge
    x >= z >= 0, where the nearest surface point lies on the +X side triangle or on the base; the
    point is inside when it is below the +X face's plane and above the base."""
    h, r = height / 2, base / 2
    ax, az = p[..., 0].abs(), p[..., 2].abs()
    q = torch.stack([torch.maximum(ax, az), p[..., 1], torch.minimum(ax, az)], -1)
    t = lambda *v: torch.tensor(v, dtype=p.dtype, device=p.device)  # noqa: E731
    a, b, c = t(r, -h, -r), t(0.0, h, 0.0), t(r, -h, r)
    side = _triangle_distance(q, a, b, c)
    base_d = torch.sqrt((q[..., 0] - r).clamp(min=0) ** 2 + (q[..., 2] - r).clamp(min=0) ** 2 + (q[..., 1] + h) ** 2)
    unsigned = torch.minimum(side, base_d)
    normal = t(height, base / 2, 0.0)
    plane = ((q - a) * (normal / normal.norm())).sum(-1)
    inside = (plane < 0) & (q[..., 1] > -h)
    return torch.where(inside, -unsigned, unsigned)


def pyramid_bound(p: torch.Tensor, base: float = 0.8, height: float = 0.8) -> torch.Tensor:
    """The largest of the pyramid's face-plane distances: exact inside and on the surface, a lower
    bound of the distance outside, so sphere tracing with it is safe and much cheaper."""
    h, r = height / 2, base / 2
    n = torch.tensor([height, base / 2], dtype=p.dtype, device=p.device)
    n = n / n.norm()
    side = (torch.maximum(p[..., 0].abs(), p[..., 2].abs()) - r) * n[0] + (p[..., 1] + h) * n[1]
    return torch.maximum(side, -(p[..., 1] + h))


def _moved(p: torch.Tensor, center) -> torch.Tensor:
    return p - p.new_tensor(center)


# ---- objects with a front (+Z): (body, marker) --------------------------------------------------

def house_body(p: torch.Tensor) -> torch.Tensor:
    """Walls (a box 0.64 wide and deep, from y = -0.40 to 0.10) under a pyramid roof (base 0.80,
    apex at y = 0.45)."""
    walls = box(p, (0.0, -0.15, 0.0), (0.32, 0.25, 0.32))
    roof = pyramid(_moved(p, (0.0, 0.275, 0.0)), base=0.80, height=0.35)
    return torch.minimum(walls, roof)


def house_door(p: torch.Tensor) -> torch.Tensor:
    """A door 0.20 wide and 0.30 tall standing 0.04 proud of the front wall (z = 0.32)."""
    return box(p, (0.0, -0.25, 0.33), (0.10, 0.15, 0.03))


def mug_body(p: torch.Tensor) -> torch.Tensor:
    """A cup (outer radius 0.30, y from -0.40 to 0.30, walls 0.05, open at the top) with a handle
    on its +X side (a ring in the XY plane, the part inside the cup's wall removed)."""
    outer = cylinder(_moved(p, (0.0, -0.05, 0.0)), radius=0.30, half_height=0.35)
    inner = cylinder(_moved(p, (0.0, 0.10, 0.0)), radius=0.25, half_height=0.38)  # from y = -0.28 up
    cup = torch.maximum(outer, -inner)
    q = _moved(p, (0.30, -0.05, 0.0))
    ring = _length2(_length2(q[..., 0], q[..., 1]) - 0.15, q[..., 2]) - 0.045
    handle = torch.maximum(ring, -outer)
    return torch.minimum(cup, handle)


def mug_badge(p: torch.Tensor) -> torch.Tensor:
    """A round badge (radius 0.12) on the front of the cup, about 0.03 proud of its wall."""
    q = _moved(p, (0.0, -0.05, 0.0))
    disc = cylinder(torch.stack([q[..., 0], q[..., 2] - 0.30, q[..., 1]], -1), radius=0.12, half_height=0.03)
    return disc


def head_body(p: torch.Tensor) -> torch.Tensor:
    """A head (a sphere of radius 0.36) with an ear on each side (spheres of radius 0.09 at +-X)."""
    skull = sphere(_moved(p, (0.0, 0.02, 0.0)), radius=0.36)
    ears = torch.minimum(sphere(_moved(p, (0.36, 0.04, 0.0)), radius=0.09),
                         sphere(_moved(p, (-0.36, 0.04, 0.0)), radius=0.09))
    return torch.minimum(skull, ears)


def head_nose(p: torch.Tensor) -> torch.Tensor:
    """A nose: a capsule of radius 0.08 pointing +Z, its tip 0.46 in front of the centre."""
    q = _moved(p, (0.0, -0.02, 0.0))
    z = q[..., 2] - q[..., 2].clamp(0.26, 0.38)
    return torch.sqrt(q[..., 0] ** 2 + q[..., 1] ** 2 + z * z) - 0.08


PARTS: dict[str, tuple[SDF, SDF]] = {"house": (house_body, house_door), "mug": (mug_body, mug_badge),
                                     "head": (head_body, head_nose)}


def _union(parts: tuple[SDF, SDF]) -> SDF:
    body, marker = parts
    return lambda p: torch.minimum(body(p), marker(p))


def marker_share(shape: str, points: torch.Tensor) -> torch.Tensor:
    """1 where a surface point belongs to the shape's front marker (the nearer part), else 0."""
    if shape not in PARTS:
        return torch.zeros(points.shape[:-1], dtype=points.dtype, device=points.device)
    body, marker = PARTS[shape]
    return (marker(points) < body(points)).to(points.dtype)


SDFS: dict[str, SDF] = {"cube": cube, "sphere": sphere, "cylinder": cylinder, "cone": cone,
                        "torus": torus, "capsule": capsule, "pyramid": pyramid,
                        **{name: _union(parts) for name, parts in PARTS.items()}}


# What the sphere tracer marches: a cheaper conservative bound where one exists (same zero set).
TRACE_SDFS: dict[str, SDF] = {**SDFS, "pyramid": pyramid_bound}
