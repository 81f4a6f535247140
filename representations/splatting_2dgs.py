"""Rasterising 2D Gaussian surfels (2DGS, Huang et al. 2024): gsplat's ``rasterization_2dgs`` on
CUDA, and a pure-PyTorch twin that computes the same on any device (but for the departure below).

Both take ``splatting``'s inputs (``means``, ``quats``, ``scales [N,3]`` of which the surfel uses
``x, y``, ``opacities``, ``colors [N,3]`` or SH coefficients ``[N,K,3]`` with ``sh_degree``,
``viewmats``, ``Ks``, ``backgrounds [C,3]``) and return ``(rgb, alpha, depth, normals, median_depth,
distortion, info)``, with ``w_i`` the compositing weight of surfel ``i`` at a pixel:
- ``rgb [C,H,W,3]`` composited over the background, ``alpha [C,H,W,1]``;
- ``depth [C,H,W,1]``: ``sum w_i z_i / alpha``, ``z_i`` the camera z-depth of the surfel's *centre*
  (gsplat's "ED"), not of the ray-surfel intersection;
- ``normals [C,H,W,3]``: ``sum w_i n_i`` in the world frame, not normalised; ``n_i`` is the unit
  normal of the surfel's plane, flipped to face the camera;
- ``median_depth [C,H,W,1]``: ``z_i`` of the last surfel composited while the transmittance in front
  of it is still above 0.5: the one that takes the pixel's opacity to 0.5 or more, else the last one
  (0 on empty pixels);
- ``distortion [C,H,W,1]``: ``2 sum_i w_i sum_{j<i} w_j (z_i - z_j) = sum_{i,j} w_i w_j |z_i - z_j|``
  in depth units (gsplat's ``render_distort`` with ``distloss=True``: the mip-NeRF 360 term without
  its interval part, on raw z, where the 2DGS paper squares NDC depth differences);
- ``info``: ``means2d``, ``radii``, ``depths``, ``ray_transforms``, ``normals`` (camera frame) as
  gsplat's projection returns them, ``gradient_2dgs``, ``width``, ``height``, ``n_cameras``,
  ``gaussian_ids`` (None) and, for the twin, ``n_pairs`` (pairs composited). As in gsplat,
  ``means2d.grad`` only gets the 2D low-pass filter's gradient; the densification signal is
  ``gradient_2dgs.grad`` (zeros whose gradient is ``z dL/d(ray_transforms[..., :2, 2])``, the
  gradient for shifting the surfel across the screen at its depth, per pixel), for
  ``DefaultStrategy(key_for_gradient="gradient_2dgs")``.

What the twin reproduces of gsplat 1.5's kernels (``Projection2DGSFused.cu``,
``RasterizeToPixels2DGSFwd.cu``):
- the projection through gsplat's reference (``gsplat_reference.fully_fused_projection_2dgs``) with
  the scales ``(s_x, s_y, 1)``, as the kernel ignores ``s_z`` (the reference's normals are scaled by
  it); near-plane and off-screen culling by gsplat's radii;
- per (surfel, pixel centre ``p`` at ``+0.5``): ``h_u = p_x M_w - M_u``, ``h_v = p_y M_w - M_v``,
  ``(u, v)`` from their cross product (skipped when its z is 0), ``sigma = min(u^2 + v^2, 2 |p -
  means2d|^2) / 2`` (the ray-splat kernel or the 2D low-pass filter), ``alpha = min(0.999, o
  exp(-sigma))``, skipped below 1/255; surfels in increasing centre depth; compositing stops
  *before* the surfel that would take the transmittance to ``<= 1e-4``; ``alpha_pixel = 1 - T``.

Where it departs: which pixels each surfel is tried on. gsplat tries every pixel of the 16x16 tiles
that its box ``means2d +- radii`` touches; the twin tries every pixel where alpha can reach 1/255:
the screen box of the disc ``u^2 + v^2 <= 2 ln(255 o)`` (exact, from the dual conic; the whole image
where that disc crosses the camera plane) joined with the low-pass disc ``|p - means2d|^2 <= ln(255
o)``. The twin therefore equals compositing every pair, independent of tiles, where gsplat misses
pixels of a footprint that lie in tiles its box does not touch: the low-pass fringe of thin or
sub-pixel surfels (3000 random discs in four 64x64 views: 86 of 272k composited pairs, at most 0.015
of a pixel's weight). Transmittance is a float64 segmented sum of ``log(1 - alpha)`` (the kernel
multiplies in float32), and autograd does the backward pass. Pairing, ordering and compositing are
``splatting``'s, shared with the 3DGS twin.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from gsplat import rasterization_2dgs
from gsplat.utils import depth_to_normal

from threedgen.representations import gsplat_reference, splatting

LOW_PASS = 2.0  # gsplat's FILTER_INV_SQUARE_2DGS: the 2D filter's sigma is 2 |p - means2d|^2 / 2
MEDIAN_TRANSMITTANCE = 0.5


def project_2dgs(means, quats, scales, viewmats, Ks, width: int, height: int, near_plane: float = 0.01):
    """gsplat's 2DGS projection as the CUDA kernel computes it: ``radii [C,N,2]`` (int32, 0 =
    culled), ``means2d [C,N,2]``, ``depths [C,N]``, ``ray_transforms [C,N,3,3]`` and unit camera-frame
    ``normals [C,N,3]`` facing the camera; ``scales[:, 2]`` plays no part."""
    surfel_scales = torch.cat([scales[..., :2], torch.ones_like(scales[..., 2:])], -1)
    return gsplat_reference.fully_fused_projection_2dgs(means, quats, surfel_scales, viewmats, Ks, width, height,
                                                        near_plane=near_plane)


@torch.no_grad()
def footprints(means2d, ray_transforms, opacities, radii, width: int, height: int):
    """The surfels to rasterise and the screen boxes holding every pixel centre where their alpha can
    reach 1/255: ``(rows [M] = camera * N + gaussian, lo [M,2], hi [M,2])``, boxes clipped to just
    outside the image."""
    C, N = means2d.shape[:2]
    o = opacities.detach()[None].expand(C, N)
    # alpha >= 1/255 needs sigma <= ln(255 o): u^2 + v^2 <= rho2 or |p - means2d|^2 <= rho2 / 2. The
    # slack covers float32 rounding in the per-pair sigma.
    rho2 = 2.0 * torch.log((o.double() / splatting.ALPHA_THRESHOLD).clamp_min(1.0)) * (1 + 1e-3) + 1e-3
    M = ray_transforms.detach().double()
    mu, mv, mw = M[..., 0, :], M[..., 1, :], M[..., 2, :]

    def dual(a, b):  # a^T diag(rho2, rho2, -1) b: the disc's dual conic
        return rho2 * (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]) - a[..., 2] * b[..., 2]

    # The disc's image is the conic whose dual is C = M D M^T (M the ray transform, D = diag(rho2,
    # rho2, -1)); its box (tangent lines x = const, y = const) has the centre (C_uw, C_vw) / C_ww and
    # the half-extents sqrt(C_uw^2 - C_uu C_ww) / |C_ww|.
    cww = dual(mw, mw)  # < 0 where the disc lies in front of the camera plane (an ellipse)
    cuw, cvw = dual(mu, mw), dual(mv, mw)
    centre = torch.stack([cuw, cvw], -1) / cww[..., None]
    half = torch.stack([cuw * cuw - dual(mu, mu) * cww, cvw * cvw - dual(mv, mv) * cww], -1).clamp_min(0).sqrt()
    half = half / cww.abs()[..., None]
    lp = (0.5 * rho2).sqrt()[..., None]  # the low-pass disc's radius
    m = means2d.detach().double()
    lo = torch.minimum(centre - half, m - lp)
    hi = torch.maximum(centre + half, m + lp)
    whole = (cww >= 0)[..., None]  # the disc reaches the camera plane: its image is unbounded
    size = torch.tensor([width, height], dtype=lo.dtype, device=lo.device)
    lo = torch.where(whole, torch.zeros_like(lo), lo)
    hi = torch.where(whole, size.expand_as(hi), hi)
    use = (radii > 0).all(-1) & (o >= splatting.ALPHA_THRESHOLD) & (torch.isfinite(lo) & torch.isfinite(hi)).all(-1)
    rows = torch.nonzero(use.reshape(-1)).flatten()
    lo = torch.minimum(lo.reshape(-1, 2).index_select(0, rows).clamp_min(-1.0), size + 1)
    hi = torch.minimum(hi.reshape(-1, 2).index_select(0, rows).clamp_min(-1.0), size + 1)
    return rows, lo, hi


def _pair_alpha_2dgs(means2d, ray_transforms, opacities, flat, pix, width: int, n: int):
    """``(cross_z, alpha, z_hit)`` of each (camera-Gaussian row ``flat``, pixel ``pix``) pair, before
    the ``MAX_ALPHA`` clamp, as the kernel computes them: ``(u, v)`` where the pixel's ray meets the
    surfel's plane, ``alpha = o exp(-sigma)``; pairs with ``cross_z == 0`` do not count. ``z_hit`` is
    the camera z of that meeting point (the ray transform's last row is the plane's camera z as a
    function of ``(u, v, 1)``), or of the surfel's centre where the low-pass filter sets alpha."""
    dtype = means2d.dtype
    px = (pix % width).to(dtype) + 0.5
    py = torch.div(pix, width, rounding_mode="floor").to(dtype) + 0.5
    M = ray_transforms.reshape(-1, 9).index_select(0, flat)
    mu0, mu1, mu2, mv0, mv1, mv2, mw0, mw1, mw2 = M.unbind(-1)
    hu0, hu1, hu2 = px * mw0 - mu0, px * mw1 - mu1, px * mw2 - mu2
    hv0, hv1, hv2 = py * mw0 - mv0, py * mw1 - mv1, py * mw2 - mv2
    cz = hu0 * hv1 - hu1 * hv0
    u = (hu1 * hv2 - hu2 * hv1) / cz
    v = (hu2 * hv0 - hu0 * hv2) / cz
    m = means2d.reshape(-1, 2).index_select(0, flat)
    dx, dy = m[:, 0] - px, m[:, 1] - py
    disc, low_pass = u * u + v * v, LOW_PASS * (dx * dx + dy * dy)
    sigma = 0.5 * torch.minimum(disc, low_pass)
    # Where the low-pass term wins (a surfel seen edge-on or smaller than a pixel), the ray may meet
    # its plane far from the disc: the surfel's centre depth stands for it there.
    z_hit = torch.where(disc <= low_pass, mw0 * u + mw1 * v + mw2, mw2)
    return cz, opacities.index_select(0, flat % n) * torch.exp(-sigma), z_hit


def rasterize_2dgs_pytorch(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                           backgrounds: Optional[torch.Tensor] = None, sh_degree: Optional[int] = None,
                           near_plane: float = 0.01, depth_at: str = "centre"):
    """The pure-PyTorch 2DGS rasteriser (see the module docstring); differentiable in ``means``,
    ``quats``, ``scales[:, :2]``, ``opacities`` and ``colors``. ``depth_at="intersection"`` takes
    each pair's depth (expected, median, distortion) where the pixel's ray meets the surfel's plane,
    as the 2DGS paper does, instead of at the surfel's centre as gsplat's kernel does: depth maps
    without the steps of a disc's extent (the mesh export fuses those)."""
    if depth_at not in ("centre", "intersection"):
        raise ValueError(f"depth_at must be 'centre' or 'intersection'; got {depth_at!r}")
    C, N = viewmats.shape[0], means.shape[0]
    radii, means2d, depths, ray_transforms, normals = project_2dgs(means, quats, scales, viewmats, Ks, width, height,
                                                                   near_plane)
    grad = splatting.needs_grad(means, quats, scales, opacities, colors)
    # gsplat's densification statistic: zeros standing for a screen-space shift of each surfel's
    # centre column (z times the shift in pixels), which leaves every value as it is.
    gradient_2dgs = torch.zeros_like(means2d, requires_grad=grad)
    if grad:
        shift = depths.detach()[..., None] * gradient_2dgs
        ray_transforms = ray_transforms + F.pad(F.pad(shift, (0, 1))[..., None], (2, 0))
    rgb_n = splatting.sh_to_color(sh_degree, means, colors, viewmats)  # [C,N,3]
    feats = torch.cat([rgb_n, depths[..., None], normals], -1)  # colour, z-depth, normal: composited alike
    rows, lo, hi = footprints(means2d, ray_transforms, opacities, radii, width, height)
    flat, pix = splatting.box_pairs(lo, hi, rows, width, height)  # flat = camera * N + Gaussian
    with torch.no_grad():
        cz, alpha, _ = _pair_alpha_2dgs(means2d.detach(), ray_transforms.detach(), opacities.detach(), flat, pix,
                                     width, N)
        keep = (cz != 0) & (alpha >= splatting.ALPHA_THRESHOLD)
    flat, pix, ray, alpha, trans = splatting.composite_order(flat, pix, alpha, keep, depths.detach(), width, height)
    n_rays = C * height * width
    with torch.no_grad():  # the median: the last pair with more than half the light left in front of it
        P = flat.numel()
        front = torch.where(trans > MEDIAN_TRANSMITTANCE, torch.arange(P, device=flat.device), -1)
        last = torch.full((n_rays,), -1, dtype=torch.long, device=flat.device).scatter_reduce(0, ray, front, "amax")
        # row C * N (a zero depth appended below) for pixels with no such pair
        median_row = torch.cat([flat, flat.new_full((1,), C * N)]).index_select(0, torch.where(last >= 0, last, P))
    if grad:  # the differentiable part, on the kept pairs only, already in compositing order
        _, alpha, _ = _pair_alpha_2dgs(means2d, ray_transforms, opacities, flat, pix, width, N)
        alpha = torch.clamp_max(alpha, splatting.MAX_ALPHA)
        trans = splatting.transmittance(alpha, ray, n_rays)
    weight = alpha * trans
    pair_feats = feats.reshape(C * N, 7).index_select(0, flat)
    pair_depth = None
    if depth_at == "intersection":
        _, _, pair_depth = _pair_alpha_2dgs(means2d, ray_transforms, opacities, flat, pix, width, N)
        pair_feats = torch.cat([pair_feats[:, :3], pair_depth[:, None], pair_feats[:, 4:]], 1)
    out = splatting.accumulate(ray, weight[:, None] * torch.cat([pair_feats, torch.ones_like(weight[:, None])], -1),
                               n_rays)
    # Distortion, the kernel's sum of 2 w_i (z_i (1 - T_i) - sum_{j<i} w_j z_j), in float64 (the two
    # terms nearly cancel).
    z, w = pair_feats[:, 3].double(), weight.double()
    terms = 2.0 * w * (z * (1.0 - trans.double()) - splatting.exclusive_segment_sum(w * z, ray, n_rays))
    distortion = splatting.accumulate(ray, terms[:, None], n_rays).to(means.dtype)
    if pair_depth is None:
        median = torch.cat([depths.reshape(-1), depths.new_zeros(1)]).index_select(0, median_row)
    else:  # the median pair's own depth (its index in pair order, P for none)
        median = torch.cat([pair_depth, pair_depth.new_zeros(1)]).index_select(0, torch.where(last >= 0, last, P))
    out = out.view(C, height, width, 8)
    acc = out[..., 7:]
    rgb = out[..., :3]
    if backgrounds is not None:
        rgb = rgb + (1.0 - acc) * backgrounds[:, None, None, :]
    depth = out[..., 3:4] / acc.clamp_min(1e-10)
    normals_world = torch.einsum("cij,chwj->chwi", torch.linalg.inv(viewmats)[:, :3, :3], out[..., 4:7])
    info = {"means2d": means2d, "radii": radii, "depths": depths, "ray_transforms": ray_transforms,
            "normals": normals, "gradient_2dgs": gradient_2dgs, "width": width, "height": height, "n_cameras": C,
            "gaussian_ids": None, "n_pairs": int(flat.numel())}
    return (rgb, acc, depth, normals_world, median.view(C, height, width, 1), distortion.view(C, height, width, 1),
            info)


def rasterize_2dgs_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                          backgrounds: Optional[torch.Tensor] = None, sh_degree: Optional[int] = None,
                          near_plane: float = 0.01):  # pragma: no cover - CUDA only
    """gsplat's fused CUDA 2DGS rasteriser with the same conventions as ``rasterize_2dgs_pytorch``."""
    colors_out, alpha, normals, _, distortion, median, info = rasterization_2dgs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=near_plane,
        sh_degree=sh_degree, packed=False, backgrounds=backgrounds, render_mode="RGB+ED", distloss=True)
    return colors_out[..., :3], alpha, colors_out[..., 3:], normals, median, distortion, info


def depth_normals(depth: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:
    """World-frame unit normals ``[C,H,W,3]`` of z-depth maps ``[C,H,W,1]``: gsplat's
    ``depth_to_normal`` (central differences of the back-projected points; zero on the border),
    facing the camera like the surfels' normals."""
    return depth_to_normal(depth, torch.linalg.inv(viewmats), Ks)
