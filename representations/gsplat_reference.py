"""gsplat's pure-PyTorch reference functions: the one module that imports them.

gsplat ships a PyTorch version of each CUDA kernel in its private modules
``gsplat.cuda._torch_impl`` (3DGS) and ``gsplat.cuda._torch_impl_2dgs`` (2DGS surfels) and has no
public API for them. The CPU rasterisers (``splatting``, ``splatting_2dgs``) and the Gaussians' mesh
extraction (``gaussian_mesh``) are built on them, so that the CPU path computes what the CUDA kernels
compute. Being private, they may move or change in any gsplat release: pyproject.toml pins
``gsplat>=1.5.3,<1.6`` (``GSPLAT_RANGE``), this module imports them and re-exports them under public
names, and ``tests/test_gsplat_reference.py`` (``tests/test_surfels_raster.py`` for the 2DGS ones)
fails with the gsplat version and the missing or changed name when an upgrade breaks them.
Everything else imports them from here.

- ``quat_scale_to_covar_preci(quats [...,4], scales [...,3], compute_covar=True,
  compute_preci=True)``: ``(covars [...,3,3], precisions [...,3,3])`` (None where not computed),
  ``R diag(s)^2 R^T`` and its inverse, ``quats`` wxyz of any norm;
- ``fully_fused_projection(means [N,3], covars [N,3,3], viewmats [C,4,4], Ks [C,3,3], width,
  height, eps2d=0.3, near_plane=0.01)``: ``(radii [C,N,2] int, means2d [C,N,2], depths [C,N],
  conics [C,N,3], compensations)``, the EWA projection with ``eps2d`` added to the 2D covariance;
- ``spherical_harmonics(degree, dirs [...,3], coeffs [...,K,3])``: the colour ``[...,3]`` of the SH
  coefficients towards ``dirs`` (normalised inside), without the ``+0.5`` offset;
- ``fully_fused_projection_2dgs(means [N,3], quats [N,4], scales [N,3], viewmats [C,4,4], Ks [C,3,3],
  width, height, near_plane=0.01, far_plane=1e10, eps=0)``: ``(radii [C,N,2] int, means2d [C,N,2],
  depths [C,N], ray_transforms [C,N,3,3], normals [C,N,3])``: ``ray_transforms = K [s_x t_u | s_y t_v
  | mean_c]`` (the 2DGS paper's ``KWH``, rows ``M_u, M_v, M_w``; ``t_u, t_v`` the splat's tangent
  axes in camera coordinates), ``means2d`` the centre of the screen box of the splat's 1-sigma disc
  and ``radii`` ``ceil(3.33 e)`` for its half-extents ``e``, the camera-frame normal
  ``R_cam R_quat[:, 2]`` flipped to face the camera and, unlike the CUDA kernel's, multiplied by
  ``scales[..., 2]``;
- ``accumulate_2dgs(means2d [C,N,2], ray_transforms [C,N,3,3], opacities [C,N], colors [C,N,D],
  normals [C,N,3], gaussian_ids [M], pixel_ids [M], image_ids [M], image_width, image_height)``:
  ``(colors [C,H,W,D], alphas [C,H,W,1], normals [C,H,W,3])``, the (Gaussian, pixel) pairs given,
  composited in the order given with the ray-splat kernel ``alpha = min(0.999, o exp(-min(u^2+v^2,
  2 |p - means2d|^2) / 2))``, with neither the kernel's 1/255 cut-off nor its early stop; it
  composites through nerfacc, whose ``render_weight_from_alpha`` runs on CUDA only.
"""

from __future__ import annotations

from gsplat.cuda._torch_impl import _fully_fused_projection as fully_fused_projection
from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci as quat_scale_to_covar_preci
from gsplat.cuda._torch_impl import _spherical_harmonics as spherical_harmonics
from gsplat.cuda._torch_impl_2dgs import _fully_fused_projection_2dgs as fully_fused_projection_2dgs
from gsplat.cuda._torch_impl_2dgs import accumulate_2dgs

GSPLAT_RANGE = ">=1.5.3,<1.6"  # the versions these private names were checked against (pyproject.toml)

__all__ = ["GSPLAT_RANGE", "accumulate_2dgs", "fully_fused_projection", "fully_fused_projection_2dgs",
           "quat_scale_to_covar_preci", "spherical_harmonics"]
