"""A textured triangle mesh as a representation: what the refinement stage optimises.

The mesh comes from a run's export (``MeshStart``): a closed surface (``positions``, ``faces``)
and its xatlas charts (``uv`` per chart vertex, ``tex_faces``, ``vmapping`` from a chart vertex
to its surface vertex) with the baked base-colour image. What is optimised:

- ``texture_delta`` ``[3,R,R]``: a correction added to the baked image, sampled bilinearly at the
  same UVs (so at the export's size it is the correction upsampled). The baked image keeps its
  detail; the renders, a few hundred pixels of the object per view, steer the low frequencies,
  which is where score distillation's colour shift lives.
- with ``geometry``, ``offsets`` ``[V,3]`` of the surface vertices (one per welded vertex, so the
  chart seams never open and the mesh stays closed), regularised by the uniform Laplacian and by
  the normal consistency of neighbouring faces (the mesh regularisers of Magic3D and Fantasia3D).

Renders come from ``threedgen.rasterize`` (exact visibility, differentiable barycentrics), with the
texture as the surface's colour, unlit: the colour a volume representation learned (its shading
baked in) is what the texture holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from threedgen.boxes import box_points
from threedgen.errors import UserError
from threedgen.rasterize import antialias, barycentrics, face_neighbours, interpolate, rasterize, sample_texture
from threedgen.representations.base import RenderOutput, Representation


@dataclass
class MeshStart:
    """The mesh a refinement starts from (numpy arrays, world units): ``positions [V,3]``,
    ``faces [F,3]`` (closed surface), ``uv [V',2]`` (glTF UVs), ``tex_faces [F,3]`` (the same faces
    over the chart vertices), ``vmapping [V']`` (chart vertex -> surface vertex), ``image [T,T,3]``
    uint8 (the baked base colour, row 0 at the top)."""

    positions: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    tex_faces: np.ndarray
    vmapping: np.ndarray
    image: np.ndarray

    FIELDS = ("positions", "faces", "uv", "tex_faces", "vmapping", "image")

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_arrays(cls, arrays) -> "MeshStart":
        return cls(**{k: np.asarray(arrays[k]) for k in cls.FIELDS})

    @classmethod
    def from_textured(cls, mesh, scale: float = 1.0) -> "MeshStart":
        """From a textured ``trimesh.Trimesh`` (a loaded ``mesh.glb``: chart vertices, UVs and a
        base-colour image), in metres at ``scale`` per world unit. UserError when it has no UVs or
        no image."""
        visual = getattr(mesh, "visual", None)
        uv = getattr(visual, "uv", None) if getattr(visual, "kind", None) == "texture" else None
        material = getattr(visual, "material", None)
        image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
        if uv is None or image is None:
            raise UserError("the mesh has no UV texture to refine; export it with export.texture=uv "
                            "(threedgen export RUN_DIR --texture uv) first")
        chart_positions = np.asarray(mesh.vertices, np.float64) / scale
        # One surface vertex per position: the charts' copies of a seam vertex weld back together.
        positions, vmapping = np.unique(chart_positions.round(7), axis=0, return_inverse=True)
        vmapping = vmapping.reshape(-1)
        tex_faces = np.asarray(mesh.faces, np.int64)
        return cls(positions.astype(np.float32), vmapping[tex_faces], np.asarray(uv, np.float32), tex_faces,
                   vmapping.astype(np.int64), np.asarray(image.convert("RGB"), np.uint8))

    def surface(self) -> trimesh.Trimesh:
        return trimesh.Trimesh(self.positions, self.faces, process=False)


def face_adjacency(faces: np.ndarray) -> np.ndarray:
    """Pairs of faces sharing an edge ``[E,2]``."""
    return np.asarray(trimesh.graph.face_adjacency(faces=faces), np.int64).reshape(-1, 2)


class TexturedMesh(Representation):
    name = "mesh"

    def __init__(self, start: MeshStart, texture_resolution: int = 128, texture_lr: float = 0.01,
                 geometry: bool = False, geometry_lr: float = 1e-3, lambda_laplacian: float = 0.0,
                 lambda_normal: float = 0.0, supersample: int = 2, device: torch.device | str = "cpu"):
        super().__init__()
        if len(start.faces) == 0:
            raise UserError("the mesh to refine has no faces")
        self.geometry, self.supersample = bool(geometry), int(supersample)
        self.texture_lr, self.geometry_lr = float(texture_lr), float(geometry_lr)
        self.lambda_laplacian, self.lambda_normal = float(lambda_laplacian), float(lambda_normal)
        as_long = dict(dtype=torch.long, device=device)
        # The starting mesh comes from its own file (the refinement's start.npz), not from a
        # checkpoint: none of these buffers is saved with the parameters.
        keep = dict(persistent=False)
        self.register_buffer("positions", torch.as_tensor(start.positions, dtype=torch.float32, device=device), **keep)
        self.register_buffer("faces", torch.as_tensor(start.faces, **as_long), **keep)
        self.register_buffer("uv", torch.as_tensor(start.uv, dtype=torch.float32, device=device), **keep)
        self.register_buffer("tex_faces", torch.as_tensor(start.tex_faces, **as_long), **keep)
        self.register_buffer("vmapping", torch.as_tensor(start.vmapping, **as_long), **keep)
        self.register_buffer("corner_uv", self.uv[self.tex_faces], **keep)  # [F,3,2]
        base = torch.as_tensor(np.array(start.image), dtype=torch.float32, device=device).permute(2, 0, 1) / 255.0
        self.register_buffer("base_texture", base, **keep)  # [3,T,T]
        self.texture_delta = torch.nn.Parameter(torch.zeros(3, texture_resolution, texture_resolution, device=device))
        self.offsets = torch.nn.Parameter(torch.zeros_like(self.positions), requires_grad=self.geometry)
        edges = trimesh.Trimesh(start.positions, start.faces, process=False).edges_unique
        self.register_buffer("edges", torch.as_tensor(np.array(edges), **as_long), **keep)
        self.register_buffer("adjacent", torch.as_tensor(face_adjacency(start.faces), **as_long), **keep)
        self.register_buffer("neighbours", face_neighbours(self.faces), **keep)  # [F,3]: across each edge

    # ---- geometry ---------------------------------------------------------------------------
    def vertices(self) -> torch.Tensor:
        return self.positions + self.offsets if self.geometry else self.positions

    def face_normals(self, vertices: torch.Tensor) -> torch.Tensor:
        tri = vertices[self.faces]
        n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def regularizer(self, out: RenderOutput) -> torch.Tensor | None:
        """The uniform Laplacian of the offsets (each vertex's offset against its neighbours' mean)
        and ``1 - cos`` between neighbouring faces' normals, by their weights; None without geometry."""
        if not self.geometry or not (self.lambda_laplacian or self.lambda_normal):
            return None
        total = self.offsets.new_zeros(())
        if self.lambda_laplacian:
            a, b = self.edges[:, 0], self.edges[:, 1]
            n = len(self.positions)
            sums = torch.zeros_like(self.offsets).index_add(0, a, self.offsets[b]).index_add(0, b, self.offsets[a])
            degree = torch.zeros(n, device=sums.device).index_add(0, a, torch.ones_like(a, dtype=sums.dtype))
            degree = degree.index_add(0, b, torch.ones_like(b, dtype=sums.dtype)).clamp_min(1)
            lap = self.offsets - sums / degree[:, None]
            total = total + self.lambda_laplacian * lap.square().sum(-1).mean()
        if self.lambda_normal:
            normals = self.face_normals(self.vertices())
            cos = (normals[self.adjacent[:, 0]] * normals[self.adjacent[:, 1]]).sum(-1)
            total = total + self.lambda_normal * (1 - cos).mean()
        return total

    # ---- colour -----------------------------------------------------------------------------
    def color_at(self, uv: torch.Tensor) -> torch.Tensor:
        """The refined base colour ``[N,3]`` at UVs ``[N,2]``: the baked image plus the correction."""
        return (sample_texture(self.base_texture, uv) + sample_texture(self.texture_delta, uv)).clamp(0, 1)

    def texture_image(self) -> np.ndarray:
        """The refined texture at the baked image's size, ``[T,T,3]`` uint8."""
        with torch.no_grad():
            size = self.base_texture.shape[-2:]
            delta = torch.nn.functional.interpolate(self.texture_delta[None], size=size, mode="bilinear",
                                                    align_corners=False)[0]
            image = (self.base_texture + delta).clamp(0, 1)
        return (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)

    # ---- the contract ---------------------------------------------------------------------
    def render(self, cameras, height: int, width: int) -> RenderOutput:
        s = self.supersample
        vertices = self.vertices()
        frags = rasterize(vertices, self.faces, cameras, height * s, width * s)
        mask = frags.mask
        ids = frags.face[mask]
        bary, t = barycentrics(vertices, self.faces, frags)
        colour = self.color_at(interpolate(bary, self.corner_uv, ids))
        b = len(cameras)
        rgb = cameras.background.to(colour)[:, None, None, :].expand(b, height * s, width * s, 3).clone()
        alpha = mask.to(colour.dtype)[..., None]
        depth = torch.zeros_like(alpha)
        if len(ids):
            rgb = rgb.index_put((mask,), colour)
            depth = depth.index_put((mask,), t[:, None].to(alpha))
        if self.geometry:  # the silhouette's gradient: edges antialiased analytically
            nearest = torch.where(mask, depth[..., 0].detach(), torch.full_like(depth[..., 0], float("inf")))
            both = antialias(torch.cat([rgb, alpha], -1), frags.face, nearest, vertices, self.faces, self.neighbours,
                             cameras)
            rgb, alpha = both[..., :3], both[..., 3:]
        if s > 1:
            def pool(x):
                return torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
            rgb, alpha, depth = pool(rgb), pool(alpha), pool(depth)
        return RenderOutput(rgb, alpha, depth)

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": [self.texture_delta], "lr": self.texture_lr, "name": "texture"}]
        if self.geometry:
            groups.append({"params": [self.offsets], "lr": self.geometry_lr, "name": "offsets"})
        return groups

    def backends(self) -> dict:
        return {"rasteriser": "threedgen.rasterize (PyTorch)"}

    def surface_mesh(self) -> trimesh.Trimesh:
        """The closed surface as it is now (world units)."""
        with torch.no_grad():
            vertices = self.vertices().cpu().numpy()
        return trimesh.Trimesh(vertices, self.faces.cpu().numpy(), process=False)

    def current(self) -> MeshStart:
        """The mesh as it is now, in the starting mesh's form: refined positions and texture."""
        with torch.no_grad():
            positions = self.vertices().cpu().numpy()
        return MeshStart(positions, self.faces.cpu().numpy(), self.uv.cpu().numpy(), self.tex_faces.cpu().numpy(),
                         self.vmapping.cpu().numpy(), self.texture_image())

    @torch.no_grad()
    def opacity_grid(self, bound: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inside the closed surface (1) or not (0) at the voxel centres, by the parity of its
        crossings along +X, and the colour of the surface point nearest each voxel (the texture at
        the nearest face centre)."""
        return mesh_opacity_grid(self.surface_mesh(), self._face_colours(), bound, resolution)

    def _face_colours(self) -> np.ndarray:
        centre_uv = self.corner_uv.mean(1)
        return self.color_at(centre_uv).cpu().numpy()

    def extract_surface(self, resolution: int = 128):
        raise UserError("a refined mesh is exported as it is, not re-meshed")


def mesh_opacity_grid(mesh: trimesh.Trimesh, face_colours: np.ndarray, bound: float, resolution: int):
    """``(alpha [R,R,R], colour [R,R,R,3])`` of a closed mesh on the grid ``linspace(-bound, bound,
    R)`` per axis, indexed ``[x,y,z]``: 1 inside, by the parity of the surface crossings of a line
    along +X through each voxel row; colour of the nearest face centre."""
    lin = np.linspace(-bound, bound, resolution)
    verts = np.asarray(mesh.vertices, np.float64)
    tri = verts[np.asarray(mesh.faces)]  # [F,3,3]
    step = lin[1] - lin[0] if resolution > 1 else 1.0
    # Rows (y_j, z_k) inside each triangle's y-z bounding box; then the crossing's x by barycentrics.
    lo = np.ceil((tri[:, :, 1:].min(1) + bound) / step).astype(np.int64)
    hi = np.floor((tri[:, :, 1:].max(1) + bound) / step).astype(np.int64)
    lo, hi = np.clip(lo, 0, resolution - 1), np.clip(hi, -1, resolution - 1)

    owner, cells = box_points(torch.from_numpy(lo), torch.from_numpy(hi))
    owner, cells = owner.numpy(), cells.numpy()
    toggles = np.zeros((resolution, resolution, resolution + 1), np.int64)
    if len(owner):
        # Each row's line is moved off the grid by a tiny, irregular amount (a symbolic
        # perturbation): a line exactly through a shared edge or vertex would cross it twice or
        # not at all, and grids and meshes share their symmetries.
        p = lin[cells] + np.array([1.0e-7 * np.sqrt(2.0), 1.0e-7 * np.sqrt(3.0)]) * step  # [P,2]: (y, z)
        a, b, c = tri[owner, 0], tri[owner, 1], tri[owner, 2]
        area = (b[:, 1] - a[:, 1]) * (c[:, 2] - a[:, 2]) - (b[:, 2] - a[:, 2]) * (c[:, 1] - a[:, 1])
        ok = np.abs(area) > 1e-15
        safe = np.where(ok, area, 1.0)
        wb = ((p[:, 0] - a[:, 1]) * (c[:, 2] - a[:, 2]) - (p[:, 1] - a[:, 2]) * (c[:, 1] - a[:, 1])) / safe
        wc = ((b[:, 1] - a[:, 1]) * (p[:, 1] - a[:, 2]) - (b[:, 2] - a[:, 2]) * (p[:, 0] - a[:, 1])) / safe
        wa = 1 - wb - wc
        inside = ok & (wa >= 0) & (wb >= 0) & (wc >= 0)
        x = wa * a[:, 0] + wb * b[:, 0] + wc * c[:, 0]
        first = np.clip(np.floor((x + bound) / step).astype(np.int64) + 1, 0, resolution)  # voxels past the crossing
        np.add.at(toggles, (cells[inside, 0], cells[inside, 1], first[inside]), 1)
    parity = np.cumsum(toggles, axis=2)[:, :, :resolution] % 2  # [y,z,x]
    alpha = torch.from_numpy(parity.transpose(2, 0, 1).astype(np.float32))
    grid = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    _, nearest = cKDTree(tri.mean(1)).query(grid)
    colour = torch.from_numpy(np.asarray(face_colours, np.float32)[nearest].reshape(resolution, resolution, resolution, 3))
    return alpha, colour
