"""A differentiable triangle-mesh renderer in plain PyTorch (the same code on CPU and CUDA).

The split nvdiffrast makes, without its CUDA kernels:

1. **Visibility** (not differentiable): which triangle each pixel's ray meets first. Every
   triangle is projected into each camera; each (triangle, pixel) pair whose pixel centre lies in
   the triangle's screen bounding box is tested exactly (ray-triangle intersection along the
   camera's own pixel rays, ``Cameras.rays``), and a per-pixel minimum over the hits' distances
   (``scatter_reduce``) keeps the nearest: a z-buffer over exact ray hits. Cost grows with the
   pairs, i.e. with the pixels the mesh covers plus the triangles' count.
2. **Attributes** (differentiable in the vertex positions and the attributes): the barycentric
   coordinates of each covered pixel's hit are recomputed from the vertices with autograd on
   (Möller-Trumbore), then used to interpolate per-corner attributes (UVs) and to look up a
   texture with ``grid_sample``.

Coverage is binary per ray; ``supersample`` renders ``s x s`` rays per pixel and averages them, so
edges are antialiased (the silhouette itself carries no gradient). Pixels are the cameras'
(``Cameras.rays``: pixel centres, OpenGL camera looking down -Z), so a mesh renders exactly where
the volume renderers put the field it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from threedgen.boxes import box_points, chunk_ranges

PAIR_BUDGET = 1 << 22  # (triangle, pixel) candidates tested at once
EDGE_TOLERANCE = 1e-6  # barycentric slack: a ray through a shared edge hits one of its two triangles


@dataclass
class Fragments:
    """What a pixel ray sees: ``face [B,H,W]`` (long; -1 where it meets nothing) and, for the
    covered pixels (``mask``), the ray's ``origin`` and ``direction`` ``[N,3]``."""

    face: torch.Tensor
    origins: torch.Tensor
    directions: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.face >= 0


def project(vertices: torch.Tensor, cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices ``[V,3]`` in each camera: ``(x, y) [B,V,2]`` in pixel units of a unit-focal image
    (multiply by the focal length in pixels and add the image centre) with y down, and the depth
    ``[B,V]`` along the viewing direction (positive in front of the camera)."""
    c2w = cameras.c2w.to(vertices)
    rot, eye = c2w[:, :3, :3], c2w[:, :3, 3]
    cam = torch.einsum("bji,bvj->bvi", rot, vertices[None] - eye[:, None])  # world -> camera (R^T)
    depth = -cam[..., 2]
    xy = torch.stack([cam[..., 0], -cam[..., 1]], -1) / depth.clamp_min(1e-9)[..., None]
    return xy, depth


def _intersect(origins, directions, v0, v1, v2):
    """Möller-Trumbore: ``(u, v, t)`` of rays ``[N,3]`` against triangles ``[N,3]`` (corners v0, v1,
    v2); the hit is ``(1 - u - v) v0 + u v1 + v v2`` at distance ``t``. ``det`` near 0 (a ray in
    the triangle's plane) gives non-finite values, which the callers treat as misses."""
    e1, e2 = v1 - v0, v2 - v0
    p = torch.cross(directions, e2, dim=-1)
    det = (e1 * p).sum(-1)
    inv = 1.0 / det
    s = origins - v0
    u = (s * p).sum(-1) * inv
    q = torch.cross(s, e1, dim=-1)
    v = (directions * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    return u, v, t


@torch.no_grad()
def rasterize(vertices: torch.Tensor, faces: torch.Tensor, cameras, height: int, width: int,
              near: float = 1e-3) -> Fragments:
    """The nearest triangle along every pixel ray of ``cameras`` at ``height x width`` (see the
    module docstring). ``vertices [V,3]`` (float), ``faces [F,3]`` (long), on one device."""
    device = vertices.device
    verts = vertices.detach().float()
    faces = faces.long()
    b = len(cameras)
    origins, dirs = cameras.to(device).rays(height, width)
    origins, dirs = origins.reshape(b, -1, 3), dirs.reshape(b, -1, 3)
    focal = 0.5 * height / torch.tan(0.5 * torch.deg2rad(cameras.fovy.to(device).float()))  # [B] pixels
    xy, depth = project(verts, cameras)
    px = xy * focal[:, None, None] + torch.tensor([0.5 * width, 0.5 * height], device=device)
    tri_px, tri_depth = px[:, faces], depth[:, faces]  # [B,F,3,2], [B,F,3]
    front = (tri_depth > near).all(-1)  # triangles crossing the camera plane are left out
    # Pixel centres (i + 0.5) inside each triangle's bounding box: columns x0..x1, rows y0..y1.
    lo = torch.ceil(tri_px.amin(2) - 0.5).clamp_min(0)
    hi = torch.floor(tri_px.amax(2) - 0.5)
    hi = torch.minimum(hi, torch.tensor([width - 1.0, height - 1.0], device=device))
    span = (hi - lo + 1).clamp_min(0).long()
    count = torch.where(front, span[..., 0] * span[..., 1], torch.zeros_like(span[..., 0]))  # [B,F]
    best_t = torch.full((b * height * width,), float("inf"), device=device)
    best_face = torch.full((b * height * width,), -1, dtype=torch.long, device=device)
    cam_idx, face_idx = torch.nonzero(count > 0, as_tuple=True)
    box_lo, box_hi = lo[cam_idx, face_idx].long(), hi[cam_idx, face_idx].long()  # [M,2]: (col, row)
    for s, e in chunk_ranges(count[cam_idx, face_idx], PAIR_BUDGET):
        owner, pixels = box_points(box_lo[s:e].flip(-1), box_hi[s:e].flip(-1))  # (row, col), row-major
        if len(owner):
            _nearest_hits(cam_idx[s:e][owner], face_idx[s:e][owner], pixels[:, 0] * width + pixels[:, 1], verts,
                          faces, origins, dirs, height * width, best_t, best_face)
    face = best_face.view(b, height, width)
    mask = face >= 0
    return Fragments(face, origins.view(b, height, width, 3)[mask], dirs.view(b, height, width, 3)[mask])


def _nearest_hits(cam, tri, pixel, verts, faces, origins, dirs, pixels_per_view, best_t, best_face) -> None:
    """Test the (camera, triangle, pixel) candidates and fold their hits into the per-pixel
    nearest ``best_t`` / ``best_face`` (flat ``[B*H*W]``)."""
    corners = verts[faces[tri]]  # [P,3,3]
    u, v, t = _intersect(origins[cam, pixel], dirs[cam, pixel], corners[:, 0], corners[:, 1], corners[:, 2])
    hit = (u >= -EDGE_TOLERANCE) & (v >= -EDGE_TOLERANCE) & (u + v <= 1 + EDGE_TOLERANCE) & (t > 0) & torch.isfinite(t)
    if not hit.any():
        return
    flat = (cam * pixels_per_view + pixel)[hit]
    t, tri = t[hit], tri[hit]
    best_t.scatter_reduce_(0, flat, t, reduce="amin")
    nearest = t <= best_t[flat]  # (one of) the nearest hits so far: the lowest face id among them wins
    none = torch.iinfo(torch.long).max
    winner = torch.full_like(best_face, none)
    winner.scatter_reduce_(0, flat[nearest], tri[nearest], reduce="amin")
    changed = winner != none
    best_face[changed] = winner[changed]


def barycentrics(vertices: torch.Tensor, faces: torch.Tensor, fragments: Fragments) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(bary [N,3], t [N])`` of the covered pixels' hits (``fragments.mask``
    order), from ``vertices`` as they are now (autograd flows to them)."""
    tri = fragments.face[fragments.mask]
    corners = vertices[faces[tri]]
    o, d = fragments.origins.to(vertices), fragments.directions.to(vertices)
    u, v, t = _intersect(o, d, corners[:, 0], corners[:, 1], corners[:, 2])
    return torch.stack([1 - u - v, u, v], -1), t


def interpolate(bary: torch.Tensor, corner_values: torch.Tensor, face_ids: torch.Tensor) -> torch.Tensor:
    """Per-pixel values ``[N,C]`` from per-corner values ``[F,3,C]`` of the pixels' faces."""
    return (bary[..., None] * corner_values[face_ids]).sum(1)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookups ``[N,C]`` of ``texture [C,H,W]`` (row 0 at the top, as the image file) at
    glTF UVs ``[N,2]`` (v up from the bottom row), clamped at the border, texel centres at half
    integers (``grid_sample`` without ``align_corners``): how a glTF viewer samples it."""
    grid = torch.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1]], -1).to(texture)
    out = torch.nn.functional.grid_sample(texture[None], grid.view(1, 1, -1, 2), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out.view(texture.shape[0], -1).T


def face_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """``[F,3]``: the face across each face's edge ``k`` (corners ``k`` and ``k+1``), -1 where the
    edge has no other face, or more than one (a non-manifold edge counts as open)."""
    f = faces.long()
    a, b = f.reshape(-1), f.roll(-1, dims=1).reshape(-1)
    base = int(f.max()) + 1 if len(f) else 1
    key = torch.minimum(a, b) * base + torch.maximum(a, b)
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    order = torch.argsort(key, stable=True)
    sk = key[order]
    first = torch.nonzero((sk[:-1] == sk[1:]) & (counts[inverse[order[:-1]]] == 2)).flatten()
    out = torch.full((len(key),), -1, dtype=torch.long, device=f.device)
    out[order[first]] = order[first + 1] // 3
    out[order[first + 1]] = order[first] // 3
    return out.view(-1, 3)


def antialias(color: torch.Tensor, face: torch.Tensor, depth: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
              neighbours: torch.Tensor, cameras) -> torch.Tensor:
    """Silhouette antialiasing with gradients to the vertices (the analytic antialiasing of
    nvdiffrast, Laine et al. 2020, sec. 3.3): between two neighbouring pixels whose rays meet
    different triangles, where an edge of the nearer triangle is a silhouette (its other face
    turns away from the camera, or it has none) and crosses the segment between the two pixel
    centres, the pixel on the far side of the midpoint takes the colour across the edge in
    proportion to how far the crossing lies past the midpoint. Where the crossing is moves with
    the projected vertices, so the silhouette gets a gradient that binary coverage lacks.

    ``color [B,H,W,C]`` (any channels: colour and coverage together), ``face``, ``depth`` ``[B,H,W]``
    (the rasteriser's, -1 / any for background), ``neighbours``: :func:`face_neighbours`."""
    b, h, w = face.shape
    focal = 0.5 * h / torch.tan(0.5 * torch.deg2rad(cameras.fovy.to(vertices)))
    xy, vdepth = project(vertices, cameras)
    px = xy * focal[:, None, None] + torch.tensor([0.5 * w, 0.5 * h], device=vertices.device, dtype=vertices.dtype)
    # Which faces turn towards each camera: the sign of (eye - corner) . normal.
    eye = cameras.c2w[:, :3, 3].to(vertices)
    tri = vertices[faces]
    normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    facing = ((eye[:, None, :] - tri[None, :, 0]) * normal[None]).sum(-1) > 0  # [B,F]
    flat = color.reshape(b * h * w, -1)
    deltas = torch.zeros_like(flat)
    for axis in (2, 1):  # horizontal neighbours (along x), then vertical (along y)
        fa = face.narrow(axis, 0, (w if axis == 2 else h) - 1)
        fb = face.narrow(axis, 1, (w if axis == 2 else h) - 1)
        da = depth.narrow(axis, 0, fa.shape[axis])
        db = depth.narrow(axis, 1, fb.shape[axis])
        differ = fa != fb
        cam, i, j = torch.nonzero(differ, as_tuple=True)
        if not len(cam):
            continue
        f1, f2 = fa[cam, i, j], fb[cam, i, j]
        first_front = (f2 < 0) | ((f1 >= 0) & (da[cam, i, j] <= db[cam, i, j]))
        front = torch.where(first_front, f1, f2)
        against_background = (f1 < 0) | (f2 < 0)
        # pixel centres of the pair (x, y), in pixels; the pair's index along the axis
        pa = torch.stack([j.to(px.dtype) + 0.5, i.to(px.dtype) + 0.5], -1)
        step = torch.tensor([1.0, 0.0] if axis == 2 else [0.0, 1.0], device=px.device, dtype=px.dtype)
        mid = pa + 0.5 * step
        along, across = (0, 1) if axis == 2 else (1, 0)
        best_offset = torch.zeros(len(cam), device=px.device, dtype=px.dtype)
        best_ok = torch.zeros(len(cam), device=px.device, dtype=torch.bool)
        best_true = torch.zeros(len(cam), device=px.device, dtype=torch.bool)  # a real silhouette edge
        for k in range(3):  # the first of the front triangle's silhouette edges that the pair's segment crosses
            a_idx = faces[front, k]
            b_idx = faces[front, (k + 1) % 3]
            other = neighbours[front, k]
            # A silhouette edge (its other face turns away, or there is none); against the
            # background, any edge of the front triangle: triangles about a pixel across rarely put
            # the silhouette's own triangle under a pixel centre, and the edge the segment leaves the
            # front triangle by moves with the silhouette nearby.
            true_edge = (other < 0) | ~facing[cam, other.clamp_min(0)]
            silhouette = true_edge | against_background
            va, vb = px[cam, a_idx], px[cam, b_idx]
            ok = silhouette & (vdepth[cam, a_idx] > 0) & (vdepth[cam, b_idx] > 0)
            den = vb[:, across] - va[:, across]
            s = (mid[:, across] - va[:, across]) / torch.where(den.abs() > 1e-12, den, torch.ones_like(den))
            ok = ok & (den.abs() > 1e-12) & (s >= 0) & (s <= 1)
            cross = va[:, along] + s * (vb[:, along] - va[:, along])  # where the edge meets the pair's line
            offset = cross - mid[:, along]  # past the midpoint towards the second pixel when > 0
            take = ok & (offset.detach().abs() <= 0.5) & ~best_ok
            best_offset = torch.where(take, offset, best_offset)
            best_true = torch.where(take, true_edge, best_true)
            best_ok = best_ok | take
        if not best_ok.any():
            continue
        keep = best_ok
        cam, i, j, first_front = cam[keep], i[keep], j[keep], first_front[keep]
        offset = best_offset[keep].to(color.dtype)
        # An edge inside the silhouette stands in for it (against the background) for the
        # gradient only: the image keeps the coverage the rays measured.
        offset = torch.where(best_true[keep], offset, offset - offset.detach())
        ia = (cam * h + i) * w + j
        ib = ia + (1 if axis == 2 else w)
        ca, cb = flat[ia], flat[ib]
        # front pixel first (a): offset > 0 means the front triangle reaches into b; < 0 means a is
        # partly uncovered. Front pixel second (b): the same with the direction reversed.
        sign = torch.where(first_front, torch.ones_like(offset), -torch.ones_like(offset))
        cover = offset * sign  # > 0: the front triangle covers this much of the back pixel
        front_c = torch.where(first_front[:, None], ca, cb)
        back_c = torch.where(first_front[:, None], cb, ca)
        back_idx = torch.where(first_front, ib, ia)
        front_idx = torch.where(first_front, ia, ib)
        into_back = cover.clamp_min(0)[:, None] * (front_c - back_c)
        out_of_front = (-cover).clamp_min(0)[:, None] * (back_c - front_c)
        deltas = deltas.index_add(0, back_idx, into_back).index_add(0, front_idx, out_of_front)
    return color + deltas.view_as(color)
