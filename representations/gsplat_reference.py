"""gsplat's pure-PyTorch reference functions: the one module that imports them.

gsplat ships a PyTorch version of each CUDA kernel in its private module
``gsplat.cuda._torch_impl`` and has no public API for them. The CPU rasteriser (``splatting``) and
the Gaussians' mesh extraction (``gaussian_mesh``) are built on three of them, so that the CPU path
computes what the CUDA kernels compute. Being private, they may move or change in any gsplat
release: pyproject.toml pins ``gsplat>=1.5.3,<1.6`` (``GSPLAT_RANGE``), this module imports them
and re-exports them under public names, and ``tests/test_gsplat_reference.py`` fails with the gsplat
version and the missing or changed name when an upgrade breaks them. Everything else imports them
from here.

- ``quat_scale_to_covar_preci(quats [...,4], scales [...,3], compute_covar=True,
  compute_preci=True)``: ``(covars [...,3,3], precisions [...,3,3])`` (None where not computed),
  ``R diag(s)^2 R^T`` and its inverse, ``quats`` wxyz of any norm;
- ``fully_fused_projection(means [N,3], covars [N,3,3], viewmats [C,4,4], Ks [C,3,3], width,
  height, eps2d=0.3, near_plane=0.01)``: ``(radii [C,N,2] int, means2d [C,N,2], depths [C,N],
  conics [C,N,3], compensations)``, the EWA projection with ``eps2d`` added to the 2D covariance;
- ``spherical_harmonics(degree, dirs [...,3], coeffs [...,K,3])``: the colour ``[...,3]`` of the SH
  coefficients towards ``dirs`` (normalised inside), without the ``+0.5`` offset.
"""

from __future__ import annotations

from gsplat.cuda._torch_impl import _fully_fused_projection as fully_fused_projection
from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci as quat_scale_to_covar_preci
from gsplat.cuda._torch_impl import _spherical_harmonics as spherical_harmonics

GSPLAT_RANGE = ">=1.5.3,<1.6"  # the versions these private names were checked against (pyproject.toml)

__all__ = ["GSPLAT_RANGE", "fully_fused_projection", "quat_scale_to_covar_preci", "spherical_harmonics"]
