"""Rasterising 3D Gaussians: gsplat on CUDA, and a pure-PyTorch rasteriser that computes the same
image on any device.

Both paths take the same inputs and return ``(rgb, alpha, depth, info)``:
- ``means [N,3]``, ``quats [N,4]`` (wxyz, any norm), ``scales [N,3]`` (activated, > 0),
  ``opacities [N]`` (activated, in (0,1)), ``colors [N,3]`` (post-activation RGB) or SH
  coefficients ``[N,K,3]`` with ``sh_degree``;
- ``viewmats [C,4,4]`` world-to-camera (OpenCV: x right, y down, z forward), ``Ks [C,3,3]``;
- ``backgrounds [C,3]``;
- outputs ``rgb [C,H,W,3]`` composited over the background, ``alpha [C,H,W,1]``, ``depth
  [C,H,W,1]`` (expected z-depth, gsplat's "ED") and gsplat's ``info`` (``means2d``, ``radii``, ...)
  that the densification strategy reads.

What the CPU rasteriser reproduces of gsplat 1.5's CUDA kernels (``ProjectionEWA3DGSFused.cu`` and
``RasterizeToPixels3DGSFwd.cu``), so the two agree to float rounding:
- projection through gsplat's own PyTorch reference (``gsplat_reference.fully_fused_projection``):
  EWA with the Jacobian clamped at 1.3x the field of view, the low-pass term ``eps2d`` added to the
  2D covariance, near-plane culling;
- the opacity-aware screen radius ``ceil(min(3.33, sqrt(2 ln(255 o))) * sigma_xy)``; Gaussians
  with ``o < 1/255`` or off-screen are culled (radius 0);
- per pixel (centre at ``+0.5``), Gaussians in increasing camera depth; ``alpha = min(0.999, o
  exp(-q))``, skipped when ``q < 0`` or ``alpha < 1/255``; compositing stops *before* the
  Gaussian that would take the transmittance to ``<= 1e-4``; ``alpha_pixel = 1 - T``.

Speed on CPU comes from bounding boxes: each Gaussian is evaluated only on the pixels inside its
screen radius (outside it ``alpha < 1/255`` exactly, so nothing is lost), the (pixel, Gaussian)
pairs are sorted by pixel then depth, and transmittance is a segmented cumulative sum of
``log(1 - alpha)`` in float64. Autograd does the backward pass. These steps (``box_pairs``,
``composite_order``, ``accumulate``, ``exclusive_segment_sum``) are shared with the 2D-surfel twin
(``splatting_2dgs``), which differs in the projection and the per-pair alpha.
"""

from __future__ import annotations

from typing import Optional

import torch
from gsplat import rasterization

from threedgen.boxes import box_points
from threedgen.representations import gsplat_reference

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
MIN_TRANSMITTANCE = 1e-4
EXTEND_MAX = 3.33


def camera_matrices(c2w: torch.Tensor, fovy: torch.Tensor, height: int, width: int):
    """``viewmats [C,4,4]`` (OpenCV world-to-camera) and ``Ks [C,3,3]`` for threedgen's OpenGL
    ``c2w`` and vertical field of view in degrees (square pixels, principal point at the centre)."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    viewmats = flip @ torch.linalg.inv(c2w)
    focal = 0.5 * height / torch.tan(0.5 * torch.deg2rad(fovy))
    Ks = torch.zeros(len(c2w), 3, 3, dtype=c2w.dtype, device=c2w.device)
    Ks[:, 0, 0], Ks[:, 1, 1] = focal, focal
    Ks[:, 0, 2], Ks[:, 1, 2], Ks[:, 2, 2] = 0.5 * width, 0.5 * height, 1.0
    return viewmats, Ks


def sh_to_color(sh_degree: Optional[int], means: torch.Tensor, colors: torch.Tensor, viewmats: torch.Tensor):
    """Per-camera colours ``[C,N,3]``: SH evaluated towards each camera, ``+0.5``, clamped at 0
    (gsplat's convention); plain ``[N,3]`` colours are broadcast."""
    C = viewmats.shape[0]
    if sh_degree is None:
        return colors[None].expand(C, *colors.shape)
    campos = torch.linalg.inv(viewmats)[:, :3, 3]
    dirs = means[None] - campos[:, None]
    coeffs = colors[None].expand(C, *colors.shape)
    return torch.clamp_min(gsplat_reference.spherical_harmonics(sh_degree, dirs, coeffs) + 0.5, 0.0)


def opacity_extent(opacities: torch.Tensor) -> torch.Tensor:
    """How many standard deviations out a Gaussian of opacity ``o`` stays at alpha >= 1/255:
    ``min(3.33, sqrt(2 ln(255 o)))`` (0 below 1/255), the CUDA kernel's opacity-aware extent."""
    return torch.sqrt(2.0 * torch.log((opacities / ALPHA_THRESHOLD).clamp_min(1.0))).clamp(max=EXTEND_MAX)


def project(means, quats, scales, opacities, viewmats, Ks, width: int, height: int,
            eps2d: float = 0.3, near_plane: float = 0.01):
    """gsplat's projection on any device: ``means2d [C,N,2]``, ``depths [C,N]``, ``conics [C,N,3]``
    and the opacity-aware ``radii [C,N,2]`` (int32, 0 = culled) of the CUDA kernel."""
    covars, _ = gsplat_reference.quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    ref_radii, means2d, depths, conics, _ = gsplat_reference.fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane)
    with torch.no_grad():
        a, b, c = conics.unbind(-1)
        det = (a * c - b * b).clamp_min(1e-30)
        sigma_x, sigma_y = (c / det).clamp_min(0).sqrt(), (a / det).clamp_min(0).sqrt()
        op = opacities[None].expand_as(depths)
        extend = opacity_extent(op)
        radii = torch.stack([torch.ceil(extend * sigma_x), torch.ceil(extend * sigma_y)], -1)
        mx, my = means2d[..., 0], means2d[..., 1]
        rx, ry = radii[..., 0], radii[..., 1]
        keep = ((ref_radii > 0).all(-1) & (op >= ALPHA_THRESHOLD) & ((rx > 0) | (ry > 0))
                & (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height))
        radii = torch.where(keep[..., None], radii, torch.zeros_like(radii)).int()
    return means2d, depths, conics, radii


def box_pairs(lo: torch.Tensor, hi: torch.Tensor, rows: torch.Tensor, width: int, height: int):
    """Every (row ``rows[m]``, pixel) whose pixel centre lies in the screen box ``lo[m] <= (x, y) <=
    hi[m]`` (``[M,2]``, finite): ``(rows [P], pixel ids [P])`` in row-major pixel order per box."""
    # Pixel x has its centre at x + 0.5: the box [lo, hi] holds x in [ceil(lo-.5), floor(hi-.5)].
    limit = torch.tensor([width - 1, height - 1], device=lo.device)
    first = torch.ceil(lo - 0.5).clamp_min(0).long()
    last = torch.minimum(torch.floor(hi - 0.5).long(), limit)
    owner, xy = box_points(first, last)
    return rows.index_select(0, owner), xy[:, 1] * width + xy[:, 0]


def _pairs(means2d: torch.Tensor, radii: torch.Tensor, width: int, height: int):
    """Every (camera-Gaussian row ``camera * N + gaussian``, pixel) whose pixel centre lies in the
    Gaussian's screen box ``means2d +- radii``."""
    flat = torch.nonzero((radii > 0).all(-1).reshape(-1)).flatten()  # camera * N + Gaussian
    m = means2d.detach().reshape(-1, 2).index_select(0, flat)
    r = radii.reshape(-1, 2).index_select(0, flat).to(m.dtype)
    return box_pairs(m - r, m + r, flat, width, height)


def exclusive_segment_sum(x: torch.Tensor, ray: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per pair, the sum of ``x`` over the earlier pairs of its ray (pairs sorted by ray), in float64:
    one global cumulative sum less each ray's sum before its first pair."""
    csum = torch.cumsum(x, 0)
    counts = torch.bincount(ray, minlength=n_rays)
    seg_end = torch.cumsum(counts, 0)
    seg_base = torch.cat([csum.new_zeros(1), csum])[seg_end - counts]  # sum before each ray's first pair
    return csum - x - seg_base[ray]


def transmittance(alpha: torch.Tensor, ray: torch.Tensor, n_rays: int):
    """Exclusive transmittance of each pair (pairs sorted by ray, then depth): a segmented
    cumulative sum of ``log(1 - alpha)`` in float64."""
    log1m = torch.log1p(-alpha.double())
    return torch.exp(exclusive_segment_sum(log1m, ray, n_rays)).to(alpha.dtype)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate through any of ``tensors`` here."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@torch.no_grad()
def composite_order(flat, pix, alpha, keep, depths, width: int, height: int):
    """The pairs that composite, in compositing order (no gradient): of the (camera-Gaussian row
    ``flat``, pixel ``pix``) pairs, those ``keep`` marks, sorted by (camera, pixel) then by the
    Gaussian's depth in that camera (``depths [C,N]``), ``alpha`` clamped at ``MAX_ALPHA``, and each
    ray cut before the pair that would take its transmittance to ``<= MIN_TRANSMITTANCE`` (those
    pairs are a suffix of the ray's and never contribute). Returns ``(flat, pix, ray, alpha,
    trans)`` of the pairs left, ``ray = camera * H * W + pixel`` and ``trans`` the transmittance in
    front of each pair."""
    C, N = depths.shape
    rank = torch.empty_like(depths, dtype=torch.long)  # each Gaussian's place in its camera's depth order
    rank.scatter_(1, torch.argsort(depths, dim=1), torch.arange(N, device=depths.device).expand(C, N).contiguous())
    cam = torch.div(flat, N, rounding_mode="floor")
    kept = torch.nonzero(keep).flatten()
    flat, pix, cam, alpha = (t.index_select(0, kept) for t in (flat, pix, cam, alpha))
    key = (cam * (height * width) + pix) * N + rank.reshape(-1).index_select(0, flat)
    order = torch.argsort(key)
    flat, pix, cam = flat.index_select(0, order), pix.index_select(0, order), cam.index_select(0, order)
    ray = cam * (height * width) + pix
    alpha = torch.clamp_max(alpha.index_select(0, order), MAX_ALPHA)
    trans = transmittance(alpha, ray, C * height * width)
    alive = trans * (1 - alpha) > MIN_TRANSMITTANCE
    return flat[alive], pix[alive], ray[alive], alpha[alive], trans[alive]


def accumulate(ray: torch.Tensor, values: torch.Tensor, n_rays: int) -> torch.Tensor:
    """``[n_rays, D]`` sums of the pairs' ``values [P,D]`` per ray."""
    out = torch.zeros(n_rays, values.shape[-1], dtype=values.dtype, device=values.device)
    return out.index_add(0, ray, values)


def _pair_alpha(means2d, conics, opacities, flat, pix, width: int, n: int):
    """``(q, alpha)`` of each (camera-Gaussian row ``flat``, pixel ``pix``) pair, before the
    ``MAX_ALPHA`` clamp: the Gaussian's Mahalanobis half-distance at the pixel centre and
    ``opacity * exp(-q)``."""
    dtype = means2d.dtype
    px = (pix % width).to(dtype) + 0.5
    py = torch.div(pix, width, rounding_mode="floor").to(dtype) + 0.5
    m = means2d.reshape(-1, 2).index_select(0, flat)
    dx, dy = m[:, 0] - px, m[:, 1] - py
    a, b, c = conics.reshape(-1, 3).index_select(0, flat).unbind(-1)
    q = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    return q, opacities.index_select(0, flat % n) * torch.exp(-q)


def rasterize_pytorch(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                      backgrounds: Optional[torch.Tensor] = None, sh_degree: Optional[int] = None,
                      eps2d: float = 0.3, near_plane: float = 0.01):
    """The pure-PyTorch rasteriser (see the module docstring); differentiable in every input."""
    C, N = viewmats.shape[0], means.shape[0]
    means2d, depths, conics, radii = project(means, quats, scales, opacities, viewmats, Ks, width, height,
                                             eps2d, near_plane)
    rgb_n = sh_to_color(sh_degree, means, colors, viewmats)  # [C,N,3]
    feats = torch.cat([rgb_n, depths[..., None]], -1)  # colour + z-depth, composited alike
    flat, pix = _pairs(means2d, radii, width, height)  # flat = camera * N + Gaussian
    with torch.no_grad():
        # Which pairs count (q >= 0, alpha >= 1/255), in compositing order, up to where each ray's
        # transmittance runs out.
        q, alpha = _pair_alpha(means2d.detach(), conics.detach(), opacities.detach(), flat, pix, width, N)
        keep = (q >= 0) & (alpha >= ALPHA_THRESHOLD)
    flat, pix, ray, alpha, trans = composite_order(flat, pix, alpha, keep, depths.detach(), width, height)
    n_rays = C * height * width
    if needs_grad(means, quats, scales, opacities, colors):
        # The differentiable part, on the kept pairs only, already in compositing order.
        _, alpha = _pair_alpha(means2d, conics, opacities, flat, pix, width, N)
        alpha = torch.clamp_max(alpha, MAX_ALPHA)
        trans = transmittance(alpha, ray, n_rays)
    weight = alpha * trans
    out = accumulate(ray, weight[:, None] * feats.reshape(C * N, 4).index_select(0, flat), n_rays)
    acc = torch.zeros(n_rays, dtype=means.dtype, device=means.device).index_add(0, ray, weight)
    out, acc = out.view(C, height, width, 4), acc.view(C, height, width, 1)
    rgb = out[..., :3]
    if backgrounds is not None:
        rgb = rgb + (1.0 - acc) * backgrounds[:, None, None, :]
    depth = out[..., 3:] / acc.clamp_min(1e-10)
    info = {"means2d": means2d, "radii": radii, "depths": depths, "conics": conics, "width": width,
            "height": height, "n_cameras": C, "gaussian_ids": None, "n_pairs": int(flat.numel())}
    return rgb, acc, depth, info


def rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                     backgrounds: Optional[torch.Tensor] = None, sh_degree: Optional[int] = None,
                     eps2d: float = 0.3, near_plane: float = 0.01):  # pragma: no cover - CUDA only
    """gsplat's fused CUDA rasteriser with the same conventions as ``rasterize_pytorch``."""
    colors_out, alpha, info = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        eps2d=eps2d, sh_degree=sh_degree, packed=False, backgrounds=backgrounds, render_mode="RGB+ED",
        rasterize_mode="classic")
    return colors_out[..., :3], alpha, colors_out[..., 3:], info


def ray_distance_scale(Ks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[C,H,W,1]`` factors that turn z-depth into distance along each pixel's ray."""
    ys, xs = torch.meshgrid(torch.arange(height, device=Ks.device, dtype=Ks.dtype) + 0.5,
                            torch.arange(width, device=Ks.device, dtype=Ks.dtype) + 0.5, indexing="ij")
    u = (xs[None] - Ks[:, 0, 2, None, None]) / Ks[:, 0, 0, None, None]
    v = (ys[None] - Ks[:, 1, 2, None, None]) / Ks[:, 1, 1, None, None]
    return torch.sqrt(1 + u * u + v * v)[..., None]
