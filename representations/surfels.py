"""2D Gaussian surfels (2DGS, Huang et al. 2024): oriented discs with a normal by construction.

The parameters are the 3D Gaussians' (``gaussians.py``: the same ``splats.ply``, densification
through gsplat's ``DefaultStrategy``, the same optimizers); a surfel is the disc spanned by its
first two scaled axes, its normal the third axis (its third scale is kept thin and only thickens
the colour grid of the export). Rendering: gsplat's ``rasterization_2dgs`` on CUDA where its kernels
load, the matched pure-PyTorch twin (``splatting_2dgs``) elsewhere; both give the colour, the
opacity, the expected and median depth, the rendered normal and the depth distortion.

Regularisers (the 2DGS paper's, from ``regularize_from`` of the run on, as its schedule starts
them late): depth-normal consistency, ``normal_weight`` times the mean over pixels of
``1 - n . N`` (``n`` the rendered surfel normal, ``N`` the normal of the median-depth map, weighted
by the opacity), and depth distortion, ``distortion_weight`` times the mean per-pixel distortion.

Export: the expected depth (where each ray meets each surfel, as the 2DGS paper takes it, not gsplat's
surfel-centre depth) of ``threedgen.fusion.fusion_cameras`` fused into a TSDF on the export's
grid (``threedgen.fusion``), meshed at its zero level: watertight by construction. Colours come from
the surfels' colour grid as for the 3D Gaussians.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from threedgen.fusion import fuse_depth, fusion_cameras
from threedgen.meshing import check_mesh_resolution
from threedgen.representations import splatting
from threedgen.representations.base import RenderOutput
from threedgen.representations.gaussian_mesh import density_grids, gaussians_surface
from threedgen.representations.gaussians import SH_C0, Gaussians
from threedgen.representations.splatting_2dgs import depth_normals, rasterize_2dgs_gsplat, rasterize_2dgs_pytorch

THICKNESS = 0.05  # a new surfel's third scale, as a fraction of its first two


class Surfels(Gaussians):
    name = "surfels"
    # gsplat's screen-space densification statistic for 2DGS (means2d's gradient carries only the
    # low-pass term's), which both rasterisers give
    grad_key = "gradient_2dgs"

    def __init__(self, cfg, device: torch.device | str = "cpu", seed: Optional[int] = None):
        super().__init__(cfg, device, seed)
        g = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        with torch.no_grad():
            self.params["scales"][:, 2] += math.log(THICKNESS)
            # Random orientations (uniform rotations): discs all facing one axis would be edge-on,
            # so invisible, from the side (gsplat's 2DGS trainer starts from random quaternions too).
            quats = torch.randn(len(self), 4, generator=g)
            self.params["quats"].copy_(quats / quats.norm(dim=-1, keepdim=True))
        self.register_buffer("progress", torch.zeros(()))

    def _make_strategy(self):
        strategy, state = super()._make_strategy()
        strategy.key_for_gradient = self.grad_key
        return strategy, state

    # ---- rendering -----------------------------------------------------------------------
    def render(self, cameras, height: int, width: int, exact_depth: bool = False) -> RenderOutput:
        """With ``exact_depth`` (the export's depth fusion), the PyTorch twin on any device, depths
        taken where each ray meets each surfel (``depth_at="intersection"``)."""
        a = self.activated()
        dtype = a["means"].dtype
        viewmats, Ks = splatting.camera_matrices(cameras.c2w.to(dtype), cameras.fovy.to(dtype), height, width)
        args = (a["means"], a["quats"], a["scales"], a["opacities"], a["colors"], viewmats, Ks, width, height)
        kwargs = {"backgrounds": cameras.background.to(viewmats), "sh_degree": self.cfg.sh_degree}
        if exact_depth:
            outputs = rasterize_2dgs_pytorch(*args, **kwargs, depth_at="intersection")
        else:
            outputs = (rasterize_2dgs_gsplat if self.backend == "gsplat" else rasterize_2dgs_pytorch)(*args, **kwargs)
        rgb, alpha, depth, normals, median, distortion, info = outputs
        training = self.training and torch.is_grad_enabled()
        if training and info[self.grad_key].requires_grad:
            info[self.grad_key].retain_grad()  # the densification statistic
            self._info = info
        to_distance = splatting.ray_distance_scale(Ks, height, width)
        aux = {"median_depth": median * to_distance, "normals": normals, "distortion": distortion}
        if training:
            aux["depth_normals"] = depth_normals(median, viewmats, Ks)
        return RenderOutput(rgb, alpha, depth * to_distance, aux)

    def on_step(self, step: int, max_steps: int = 0) -> None:
        self.progress.fill_(step / max_steps if max_steps else 0.0)
        super().on_step(step, max_steps)

    def regularizer(self, out: RenderOutput) -> torch.Tensor | None:
        cfg = self.cfg
        if float(self.progress) < cfg.regularize_from or "depth_normals" not in out.aux:
            return None
        total = out.rgb.new_zeros(())
        if cfg.normal_weight:
            agree = (out.aux["normals"] * out.aux["depth_normals"]).sum(-1, keepdim=True)
            total = total + cfg.normal_weight * ((1 - agree) * out.alpha.detach()).mean()
        if cfg.distortion_weight:
            total = total + cfg.distortion_weight * out.aux["distortion"].mean()
        return total

    def smoothness(self):
        """None: surfels are flat by construction (``loss.lambda_smooth`` flattens 3D Gaussians)."""
        return None

    def backends(self) -> dict:
        return {**super().backends(), "primitive": "2D surfels"}

    # ---- export --------------------------------------------------------------------------
    @torch.no_grad()
    def fused_grid(self, bound: float, resolution: int) -> np.ndarray:
        """The TSDF of the expected depth of ``fusion_cameras`` on the grid ``linspace(-bound,
        bound, resolution)^3`` (``[x,y,z]``), negative inside (``threedgen.fusion``)."""
        cfg = self.cfg
        size = cfg.mesh_view_size

        def render(cams):
            out = self.render(cams, size, size, exact_depth=True)
            return out.alpha[..., 0], out.depth[..., 0]

        was_training = self.training
        self.eval()
        try:
            cams = fusion_cameras(bound, cfg.mesh_views_per_ring)
            voxel = 2 * bound / (resolution - 1)
            return fuse_depth(render, cams, size, bound, resolution, cfg.tsdf_truncation * voxel,
                              self.params["means"].device)
        finally:
            self.train(was_training)

    def _grids(self, bound: float, resolution: int):
        """Means, quats, scales, opacities and degree-0 colours for the colour grid of a
        ``resolution^3`` grid: the thin axis at least a voxel (a thinner disc falls between samples)."""
        a = self.activated()
        rgb = torch.clamp(SH_C0 * self.params["sh0"][:, 0] + 0.5, 0, 1)
        scales = a["scales"].clone()
        scales[:, 2] = scales[:, 2].clamp_min(2 * bound / (resolution - 1))
        return a["means"].float(), a["quats"].float(), scales.float(), a["opacities"].float(), rgb.float()

    @torch.no_grad()
    def opacity_grid(self, bound: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha = sigmoid(-8 tsdf)`` of the fused grid the export meshes (above 0.5 exactly
        inside its zero level); the colour is the density-weighted mean of the surfels' colours
        (see the base class)."""
        fused = torch.from_numpy(self.fused_grid(bound, resolution))
        _, colour = density_grids(*self._grids(bound, resolution), bound, resolution)
        return torch.sigmoid(-8 * fused), colour.cpu()

    @torch.no_grad()
    def extract_surface(self, resolution: int = 128):
        check_mesh_resolution(resolution)
        bound = self.cfg.bound
        values = -self.fused_grid(bound, resolution)
        return gaussians_surface(*self._grids(bound, resolution), bound, resolution, None,
                                 self.cfg.mesh_color_shell, None, self.cfg.mesh_smooth, values=values)
