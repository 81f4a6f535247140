"""NeRF with a signed-distance geometry: a surface with a normal by construction.

The field (the NeRF's own: dense voxel grids on CPU, the hash grid on CUDA) outputs a residual
``r(x)``; the geometry is ``f(x) = |x| - init_radius + r(x)``, a sphere at the start (``r = 0``),
negative inside. On the dense field a coarse grid (``coarse_resolution`` voxels a side) is added to
the fine one's residual: a single fine voxel moves the surface by at most its learning rate per
step, so carving the sphere into a torus or a pyramid's apex took more steps than a run has; a
coarse voxel moves a whole region at once (the hash grid is multiresolution already). Volume rendering needs a density: VolSDF's rule (Yariv et al. 2021),

    sigma(x) = Psi_beta(-f(x)) / beta,    Psi_beta the CDF of a zero-mean Laplace of scale beta,

so the density is ``1/beta`` deep inside, ``1/(2 beta)`` on the surface and falls off outside within
a few ``beta``. ``beta`` is scheduled, not learned (a score-distillation gradient is too noisy to
learn it): geometric from ``beta_start`` to ``beta_end`` over the first ``beta_anneal`` of the run,
kept in a buffer so resumes, rollbacks and exports see the value the run had. Everything after the
density (the samplers, the empty-space grid, nerfacc's compositing, the colour field) is the NeRF's.

Regularisers (``regularizer``): the eikonal term ``(|grad f| - 1)^2`` keeps ``f`` a distance
(weight ``eikonal_weight``), and an optional curvature term (the squared Laplacian of ``f``,
``curvature_weight``) smooths its normals. On the dense grid both come from finite differences over
the grid's own lattice: the eikonal term at ``eikonal_points`` random voxels each step (a new draw
every step, so every voxel is seen many times over a run), the curvature term over the band around
the surface; on the hash field, from central differences at ``eikonal_points`` random points of the
box, as threestudio does for its hash-grid SDF.

Export: marching cubes of ``f`` at its zero level (no level search: the surface is where the
geometry says), the colours through the NeRF's export (``mesh_color_shell`` sees them through the
Laplace density).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from threedgen.meshing import check_mesh_resolution, grid_values, mesh_level, surface_from_grid
from threedgen.representations.nerf import NeRF

# Finite-difference step of the hash field's eikonal term, in world units per unit of bound.
HASH_EPS = 0.005
# The curvature term counts only points this close to the surface (per unit of bound): a distance
# field's Laplacian is large far from it by nature (2/r around a sphere's centre).
CURVATURE_BAND = 0.1


def laplace_density(sdf: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """VolSDF's density ``Psi_beta(-sdf) / beta``: ``0.5 exp(-sdf/beta) / beta`` outside
    (``sdf > 0``), ``(1 - 0.5 exp(sdf/beta)) / beta`` inside; 1/(2 beta) on the surface."""
    half = 0.5 * torch.exp(-sdf.abs() / beta)
    return torch.where(sdf > 0, half, 1 - half) / beta


def lattice_gradient(values: torch.Tensor, spacing: float) -> torch.Tensor:
    """Forward differences of ``values [D,H,W]`` at every voxel but the last along each axis:
    ``[3, D-1, H-1, W-1]``. Not central differences, which are blind to a grid's checkerboard (a
    field alternating voxel by voxel has zero central difference everywhere)."""
    base = values[:-1, :-1, :-1]
    d = (values[1:, :-1, :-1] - base) / spacing
    h = (values[:-1, 1:, :-1] - base) / spacing
    w = (values[:-1, :-1, 1:] - base) / spacing
    return torch.stack([d, h, w])


def lattice_gradient_at(values: torch.Tensor, spacing: float, count: int) -> torch.Tensor:
    """``lattice_gradient`` at ``count`` voxels drawn uniformly (with replacement) from the voxels it
    covers: ``[3, count]``; all of them, ``[3, N]``, when ``count`` is not smaller. Each step sees a
    new draw, so over a run every voxel is seen many times at a fraction of the cost."""
    d, h, w = values.shape
    if count >= (d - 1) * (h - 1) * (w - 1):
        return lattice_gradient(values, spacing).flatten(1)
    flat = values.reshape(-1)
    k = torch.randint(0, d - 1, (count,), device=values.device) * (h * w) \
        + torch.randint(0, h - 1, (count,), device=values.device) * w + torch.randint(0, w - 1, (count,), device=values.device)
    base = flat[k]
    return torch.stack([flat[k + h * w] - base, flat[k + w] - base, flat[k + 1] - base]) / spacing


def linear_upsampling(coarse: int, fine: int, device=None) -> torch.Tensor:
    """The ``[fine, coarse]`` matrix of linear interpolation from ``coarse`` samples to ``fine``
    ones spanning the same interval, end points on end points (``align_corners=True``)."""
    eye = torch.eye(coarse, device=device)[None]  # torch's own interpolation of each unit sample
    return F.interpolate(eye, size=fine, mode="linear", align_corners=True)[0].T.contiguous()


def lattice_laplacian(values: torch.Tensor, spacing: float) -> torch.Tensor:
    """The 7-point Laplacian of ``values [D,H,W]`` over its interior voxels."""
    c = values[1:-1, 1:-1, 1:-1]
    total = (values[2:, 1:-1, 1:-1] + values[:-2, 1:-1, 1:-1] + values[1:-1, 2:, 1:-1] + values[1:-1, :-2, 1:-1]
             + values[1:-1, 1:-1, 2:] + values[1:-1, 1:-1, :-2] - 6 * c)
    return total / spacing ** 2


class SDFNeRF(NeRF):
    name = "nerf-sdf"

    def __init__(self, cfg, device: torch.device | str = "cpu"):
        super().__init__(cfg, device)
        self.register_buffer("beta", torch.tensor(float(cfg.beta_start)))
        self._sphere_lattice = None  # |x| - init_radius on the dense grid's lattice, made on first use
        c = cfg.coarse_resolution if self.field_kind == "grid" else 0
        # A coarse residual beside the fine grid (dense field only: the hash grid is multiresolution
        # already): one coarse voxel moves a whole region of the surface in one step.
        self.coarse = torch.nn.Parameter(torch.zeros(1, c, c, c)) if c else None
        self._upsample = None  # the coarse grid's linear-interpolation matrix onto the fine lattice

    # ---- geometry ------------------------------------------------------------------------
    def sdf_from_raw(self, raw: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return raw + points.norm(dim=-1) - self.cfg.init_radius

    def residual_grid(self) -> torch.Tensor:
        """The dense field's residual ``[1,R,R,R]``: the fine grid plus the coarse one, trilinearly
        upsampled onto the fine lattice (exact when ``R - 1`` is a multiple of the coarse grid's
        ``C - 1``, as 63 is of 7: a trilinear function is its own trilinear interpolant); the fine
        grid alone without a coarse one."""
        if self.coarse is None:
            return self.field.density
        r = self.field.density.shape[-1]
        m = self._upsample
        if m is None or m.shape[0] != r or m.device != self.coarse.device:
            m = self._upsample = linear_upsampling(self.coarse.shape[-1], r, self.coarse.device)
        # Separable: three small matrix products (what F.interpolate's trilinear, align_corners=True,
        # computes, at a fraction of its cost with its backward).
        c = self.coarse.shape[-1]
        x = (m @ self.coarse[0].reshape(c, c * c)).reshape(r, c, c)  # along z
        x = (m @ x.transpose(0, 1).reshape(c, r * c)).reshape(r, r, c).transpose(0, 1)  # along y
        return self.field.density + (x @ m.T)[None]  # along x

    def _field(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.coarse is None:
            return self.field(points)
        return self.field(points, density=self.residual_grid())

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """The signed distance ``f`` at world points ``[P,3]`` (negative inside)."""
        return self.sdf_from_raw(self._field(points)[0], points)

    def _activate(self, raw: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return laplace_density(self.sdf_from_raw(raw, points), self.beta)

    def beta_at(self, step: int, max_steps: int) -> float:
        """The scheduled sharpness after ``step`` of ``max_steps`` steps."""
        cfg = self.cfg
        span = cfg.beta_anneal * max_steps
        frac = 1.0 if span <= 0 else min(1.0, step / span)
        return cfg.beta_start * (cfg.beta_end / cfg.beta_start) ** frac

    def on_step(self, step: int, max_steps: int = 0) -> None:
        self.beta.fill_(self.beta_at(step, max_steps))
        super().on_step(step, max_steps)

    def smoothness(self):
        """None: a signed distance is kept smooth by its own terms (``regularizer``), not by
        ``loss.lambda_smooth``'s density total variation."""
        return None

    # ---- regularisers --------------------------------------------------------------------
    def _lattice_sdf(self) -> tuple[torch.Tensor, float]:
        """``f`` on the dense density grid's lattice ``[D,H,W]`` (z, y, x) and its spacing."""
        grid = self.residual_grid()[0]
        r = grid.shape[-1]
        sphere = self._sphere_lattice
        if sphere is None or sphere.device != grid.device:  # a constant: made once, not every step
            lin = torch.linspace(-self.cfg.bound, self.cfg.bound, r, device=grid.device)
            z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
            sphere = self._sphere_lattice = torch.sqrt(x * x + y * y + z * z) - self.cfg.init_radius
        return grid + sphere, 2 * self.cfg.bound / (r - 1)

    def eikonal(self, lattice: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The mean of ``(|grad f| - 1)^2``: at ``eikonal_points`` random voxels of the grid, by
        forward differences along its lattice (dense field; every voxel when there are fewer), or at
        as many uniform random points of the box (hash field)."""
        if self.field_kind == "grid":
            values, h = lattice or self._lattice_sdf()
            norm = lattice_gradient_at(values, h, self.cfg.eikonal_points).norm(dim=0)
        else:
            norm = self._hash_gradient().norm(dim=-1)
        return ((norm - 1) ** 2).mean()

    def _random_points(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``eikonal_points`` uniform points of the box and the axis offsets ``eps * I`` around them."""
        device = self.beta.device
        points = (torch.rand(self.cfg.eikonal_points, 3, device=device) * 2 - 1) * self.cfg.bound
        return points, torch.eye(3, device=device) * eps

    def _hash_gradient(self) -> torch.Tensor:
        eps = HASH_EPS * self.cfg.bound
        points, offsets = self._random_points(eps)
        probe = torch.cat([points[:, None] + offsets, points[:, None] - offsets], 1).reshape(-1, 3)
        f = self.sdf(probe).view(-1, 2, 3)
        return (f[:, 0] - f[:, 1]) / (2 * eps)

    def curvature(self, lattice: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The mean squared Laplacian of ``f`` (dense field: on the lattice; hash field: by central
        second differences at random points)."""
        if self.field_kind == "grid":
            values, h = lattice or self._lattice_sdf()
            near = (values[1:-1, 1:-1, 1:-1].detach().abs() < CURVATURE_BAND * self.cfg.bound).float()
            return ((lattice_laplacian(values, h) ** 2) * near).sum() / near.sum().clamp_min(1)
        b = self.cfg.bound
        eps = HASH_EPS * b * 4
        points, offsets = self._random_points(eps)
        probe = torch.cat([points, (points[:, None] + offsets).reshape(-1, 3), (points[:, None] - offsets).reshape(-1, 3)])
        f = self.sdf(probe)
        n = len(points)
        centre, plus, minus = f[:n], f[n:4 * n].view(n, 3), f[4 * n:].view(n, 3)
        near = (centre.detach().abs() < CURVATURE_BAND * b).float()
        laplacian = (plus + minus - 2 * centre[:, None]).sum(-1) / eps ** 2
        return (laplacian ** 2 * near).sum() / near.sum().clamp_min(1)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        if self.coarse is not None:
            groups.append({"params": [self.coarse], "lr": self.cfg.lr_coarse, "name": "coarse"})
        return groups

    def regularizer(self, out) -> torch.Tensor | None:
        cfg = self.cfg
        total = None
        # f on the dense grid's lattice, made once for both terms (None: the hash field samples its own)
        lattice = self._lattice_sdf() if self.field_kind == "grid" and (cfg.eikonal_weight or cfg.curvature_weight) else None
        if cfg.eikonal_weight:
            total = cfg.eikonal_weight * self.eikonal(lattice)
        if cfg.curvature_weight:
            term = cfg.curvature_weight * self.curvature(lattice)
            total = term if total is None else total + term
        return total

    def backends(self) -> dict:
        return {**super().backends(), "geometry": f"sdf (VolSDF density, beta {float(self.beta):.3g})"}

    # ---- export --------------------------------------------------------------------------
    @torch.no_grad()
    def sdf_grid(self, bound: float, resolution: int):
        """``-f`` on the grid ``linspace(-bound, bound, R)^3`` (``[x,y,z]``, numpy), positive inside,
        ``-inf`` outside the scene box, blurred by ``mesh_smooth`` as the export meshes it."""
        device = next(self.parameters()).device
        inside_box = lambda p: (p.abs() <= self.cfg.bound).all(-1)  # noqa: E731
        values = grid_values(lambda p: torch.where(inside_box(p), -self.sdf(p), torch.full_like(p[:, 0], -2 * bound)),
                             bound, resolution, device)
        values, _ = mesh_level(values, bound, 0.0, self.cfg.mesh_smooth)
        return values

    @torch.no_grad()
    def opacity_grid(self, bound: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha = sigmoid(-f / voxel)``: above 0.5 exactly inside the zero level the export meshes;
        the colour field at the voxel centres (see the base class)."""
        values = torch.from_numpy(self.sdf_grid(bound, resolution))
        voxel = 2 * bound / (resolution - 1)
        device = next(self.parameters()).device
        lin = torch.linspace(-bound, bound, resolution, device=device)
        points = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
        colours = torch.cat([self.color(chunk).float().cpu() for chunk in points.split(1 << 18)])
        return torch.sigmoid(values / voxel), colours.view(resolution, resolution, resolution, 3)

    @torch.no_grad()
    def extract_surface(self, resolution: int = 128):
        check_mesh_resolution(resolution)
        values = self.sdf_grid(self.cfg.bound, resolution)
        surface = surface_from_grid(values, self.color, self.cfg.bound, 0.0, device=next(self.parameters()).device)
        if self.cfg.mesh_color_shell > 0:
            surface = dataclasses.replace(surface, density_fn=self.density, shell=self.cfg.mesh_color_shell)
        return surface


