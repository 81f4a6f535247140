"""2D Gaussian surfels: the CPU twin of gsplat's ``rasterization_2dgs`` (``splatting_2dgs``) against
gsplat's own PyTorch reference (``accumulate_2dgs``) and the CUDA kernel's rules, median depth and
distortion in closed form, normals, empty scenes, and gsplat on a GPU."""

from __future__ import annotations

import importlib
import inspect
import math

import gsplat
import nerfacc
import pytest
import torch
from image_agreement import agreement
from scipy.spatial.transform import Rotation

from threedgen.cameras import Cameras
from threedgen.representations import gsplat_reference, splatting, splatting_2dgs

W, H = 24, 20  # not square
F64 = torch.float64


def cameras(n=2):
    return Cameras.from_angles([15.0, -5.0][:n], [30.0, 200.0][:n], 2.5, 40.0, [[0.2, 0.5, 0.9], [1.0, 1.0, 1.0]][:n])


def matrices(cams, height=H, width=W, dtype=F64):
    viewmats, Ks = splatting.camera_matrices(cams.c2w.to(dtype), cams.fovy.to(dtype), height, width)
    return viewmats, Ks


def surfel_scene(n, seed, opacity=(0.05, 0.8), scale=(0.03, 0.18), dtype=F64):
    """Random surfels (any orientation, s_z unused) in a 0.8 cube at the origin; SH degree 0 colours."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=g)
    quats = torch.randn(n, 4, generator=g)
    opacities = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, generator=g)
    colors = torch.rand(n, 1, 3, generator=g)
    return [t.to(dtype).requires_grad_() for t in (means, quats, scales, opacities, colors)]


def quat_of(rotation: torch.Tensor) -> torch.Tensor:
    """wxyz quaternion of a rotation matrix."""
    x, y, z, w = Rotation.from_matrix(rotation.double().numpy()).as_quat()
    return torch.tensor([w, x, y, z], dtype=rotation.dtype)


def world_normals(viewmats, normals):
    return torch.einsum("cij,chwj->chwi", torch.linalg.inv(viewmats)[:, :3, :3], normals)


@pytest.fixture
def reference_weights(monkeypatch):
    """``accumulate_2dgs`` composites through ``nerfacc.render_weight_from_alpha``, which runs on CUDA
    only: stand in an exact CPU one (``w_i = a_i prod_{j<i} (1 - a_j)`` per ray, a padded cumulative
    product in the pairs' order) that also records the per-pair alphas gsplat's reference computed."""
    seen = {}

    def render_weight_from_alpha(alphas, packed_info=None, ray_indices=None, n_rays=None, prefix_trans=None):
        assert packed_info is None and prefix_trans is None
        counts = torch.bincount(ray_indices, minlength=n_rays)
        pos = torch.arange(len(ray_indices)) - (torch.cumsum(counts, 0) - counts)[ray_indices]
        width = int(counts.max()) + 1 if len(ray_indices) else 1
        factors = torch.ones(n_rays, width, dtype=alphas.dtype).index_put((ray_indices, pos + 1), 1 - alphas)
        trans = torch.cumprod(factors, 1)[ray_indices, pos]
        seen["alphas"] = alphas.detach()
        return alphas * trans, trans

    monkeypatch.setattr(nerfacc, "render_weight_from_alpha", render_weight_from_alpha)
    return seen


def reference_render(seen, means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, min_alpha=None):
    """gsplat's reference: every (visible surfel, pixel) pair, per pixel in increasing depth, composited by
    ``accumulate_2dgs`` with the z-depth as a fourth colour channel; with ``min_alpha``, only the pairs
    whose reference alpha reaches it. The projection is gsplat's reference with the scales ``(s_x, s_y,
    1)``: the CUDA kernel ignores ``s_z``, which the reference's normals are scaled by."""
    C, N = viewmats.shape[0], means.shape[0]
    surfel_scales = torch.cat([scales[:, :2], torch.ones_like(scales[:, 2:])], -1)
    radii, means2d, depths, ray_transforms, normals = gsplat_reference.fully_fused_projection_2dgs(
        means, quats, surfel_scales, viewmats, Ks, W, H)
    rgb = splatting.sh_to_color(0, means, colors, viewmats)
    cam, gid = torch.nonzero((radii > 0).all(-1), as_tuple=True)
    cam, gid = cam.repeat_interleave(H * W), gid.repeat_interleave(H * W)
    pix = torch.arange(H * W).repeat(len(cam) // (H * W))
    rank = torch.argsort(torch.argsort(depths.detach(), 1), 1)  # depth order within each camera
    order = torch.argsort((cam * H * W + pix) * N + rank[cam, gid])
    cam, gid, pix = cam[order], gid[order], pix[order]
    args = (means2d, ray_transforms, opacities[None].expand(C, N), torch.cat([rgb, depths[..., None]], -1), normals)
    out = gsplat_reference.accumulate_2dgs(*args, gid, pix, cam, W, H)
    pair_alpha = seen["alphas"]
    if min_alpha is not None:
        keep = pair_alpha >= min_alpha
        out = gsplat_reference.accumulate_2dgs(*args, gid[keep], pix[keep], cam[keep], W, H)
    feats, alpha, normal_sum = out
    return {"rgb": feats[..., :3] + (1 - alpha) * backgrounds[:, None, None], "alpha": alpha,
            "depth": feats[..., 3:] / alpha.clamp_min(1e-10), "normals": world_normals(viewmats, normal_sum),
            "pair_alpha": pair_alpha, "ray": cam * H * W + pix, "z": depths[cam, gid].detach(),
            "pair_feats": torch.cat([rgb, depths[..., None], normals], -1)[cam, gid].detach()}


def twin(params, viewmats, Ks, backgrounds, width=W, height=H):
    names = ("rgb", "alpha", "depth", "normals", "median", "distortion", "info")
    return dict(zip(names, splatting_2dgs.rasterize_2dgs_pytorch(*params, viewmats, Ks, width, height,
                                                                 backgrounds=backgrounds, sh_degree=0)))


def test_the_2dgs_reference_functions_are_reexported_with_the_parameters_threedgen_passes():
    where = f"gsplat {gsplat.__version__}: gsplat.cuda._torch_impl_2dgs"
    try:
        module = importlib.import_module("gsplat.cuda._torch_impl_2dgs")
    except ImportError as exc:
        pytest.fail(f"{where} cannot be imported ({exc}); update threedgen/representations/gsplat_reference.py")
    for public, name, params in (
            ("fully_fused_projection_2dgs", "_fully_fused_projection_2dgs",
             ["means", "quats", "scales", "viewmats", "Ks", "width", "height", "near_plane"]),
            ("accumulate_2dgs", "accumulate_2dgs",
             ["means2d", "ray_transforms", "opacities", "colors", "normals", "gaussian_ids", "pixel_ids", "image_ids",
              "image_width", "image_height"])):
        private = getattr(module, name, None)
        assert private is not None, f"{where}.{name} is missing"
        assert getattr(gsplat_reference, public) is private, f"gsplat_reference.{public} is not {where}.{name}"
        assert list(inspect.signature(private).parameters)[:len(params)] == params, f"{where}.{name} changed"


def test_projection_is_the_kernels_unit_normals_facing_the_camera():
    means, quats, scales, _, _ = surfel_scene(30, 0)
    viewmats, Ks = matrices(cameras())
    mine = splatting_2dgs.project_2dgs(means, quats, scales, viewmats, Ks, W, H)
    ref = gsplat_reference.fully_fused_projection_2dgs(means, quats, scales, viewmats, Ks, W, H)
    assert torch.equal(mine[0], ref[0]) and (mine[0] > 0).all(-1).sum() > 40
    for a, b in zip(mine[1:4], ref[1:4]):  # means2d, depths, ray transforms: s_z plays no part
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    normals = mine[4]
    # Unit up to the camera rotation's own float32 accuracy (Cameras are float32).
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones_like(normals[..., 0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(normals * scales[:, 2, None], ref[4], rtol=0, atol=1e-12)  # the reference's, over s_z
    means_cam = (viewmats[:, None, :3, :3] @ means[None, :, :, None])[..., 0] + viewmats[:, None, :3, 3]
    assert ((normals * means_cam).sum(-1) < 0).all()  # towards the camera


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twin_matches_accumulate_2dgs_fed_every_pair(reference_weights, seed):
    """Every (surfel, pixel) pair in the reference; the twin leaves out those with alpha < 1/255 and
    stops before the transmittance would reach 1e-4. These scenes never get that dark (checked), so the
    only difference is the left-out pairs: removing a layer of alpha ``a`` changes a composite of values
    in ``[lo, hi]`` (background included) by at most ``a (hi - lo)`` and ``1 - T`` by at most ``a``. So
    per pixel, with ``s`` the sum of the reference's alphas below 1/255 there: rgb and alpha within
    ``s``, normals (components in [-1, 1], no background) within ``2 s``, expected depth within ``2 z_max
    s / alpha``. Here ``s`` stays below 0.03, and below 1e-3 on most pixels."""
    params = surfel_scene(30, seed)
    cams = cameras()
    viewmats, Ks = matrices(cams)
    bg = cams.background.to(F64)
    mine = twin(params, viewmats, Ks, bg)
    ref = reference_render(reference_weights, *params, viewmats, Ks, bg)
    assert float(1 - ref["alpha"].detach().max()) > 1e-4  # the stop never applies
    assert 0.05 < float(mine["alpha"].detach().mean()) < 0.5
    a = ref["pair_alpha"]
    s = torch.zeros(2 * H * W, dtype=F64).index_add(0, ref["ray"], torch.where(a < 1 / 255, a, 0.0)).view(2, H, W, 1)
    assert float(s.max()) < 0.03 and float(s.median()) < 1e-3
    slack = 1e-12
    for key, bound in (("rgb", s), ("alpha", s), ("normals", 2 * s)):
        diff = (mine[key] - ref[key]).abs().detach()
        assert (diff <= bound + slack).all(), (key, float((diff - bound).max()))
    depth_bound = 2 * float(ref["z"].max()) * s / mine["alpha"].detach()
    assert ((mine["depth"] - ref["depth"]).abs().detach() <= depth_bound + slack).all()


def near_camera_scene():
    """Large surfels half a unit in front of the first camera: their 3-sigma discs cross its camera
    plane, so their footprints there are the whole image."""
    g = torch.Generator().manual_seed(0)
    n = 6
    means = 0.8 * cameras().c2w[0, :3, 3].to(F64) + 0.1 * torch.randn(n, 3, generator=g, dtype=F64)
    params = (means, torch.randn(n, 4, generator=g, dtype=F64), torch.full((n, 3), 0.3, dtype=F64),
              torch.full((n,), 0.7, dtype=F64), torch.rand(n, 1, 3, generator=g, dtype=F64))
    return [t.requires_grad_() for t in params]


@pytest.mark.parametrize("scene", ["random-0", "random-1", "random-2", "near-camera"])
def test_twin_matches_accumulate_2dgs_on_the_pairs_that_count_with_gradients(reference_weights, scene):
    """The reference fed the pairs whose own alpha reaches 1/255 (the kernel's cut-off, applied to the
    reference's alphas): the twin composites exactly that set of pairs, and its images and the
    gradients of a random weighted sum of them agree to float64 rounding (1e-10, relative 1e-9)."""
    params = near_camera_scene() if scene == "near-camera" else surfel_scene(30, int(scene[-1]))
    cams = cameras()
    viewmats, Ks = matrices(cams)
    bg = cams.background.to(F64)
    mine = twin(params, viewmats, Ks, bg)
    ref = reference_render(reference_weights, *params, viewmats, Ks, bg, min_alpha=1 / 255)
    assert float(1 - ref["alpha"].detach().max()) > 1e-4  # the stop never applies
    assert mine["info"]["n_pairs"] == int((ref["pair_alpha"] >= 1 / 255).sum())
    if scene == "near-camera":
        info = mine["info"]
        _, lo, hi = splatting_2dgs.footprints(info["means2d"], info["ray_transforms"], params[3], info["radii"], W, H)
        assert ((lo <= 0) & (hi >= torch.tensor([W, H]))).all(-1).sum() >= 3
    keys = ("rgb", "alpha", "depth", "normals")
    for key in keys:
        torch.testing.assert_close(mine[key], ref[key], rtol=0, atol=1e-10, msg=key)
    g = torch.Generator().manual_seed(len(scene))
    weights = {k: torch.rand(mine[k].shape, generator=g, dtype=F64) for k in keys}
    grads = [torch.autograd.grad(sum((out[k] * weights[k]).sum() for k in keys), params) for out in (mine, ref)]
    for name, a, b in zip(("means", "quats", "scales", "opacities", "colors"), *grads):
        assert b.abs().max() > 0.1, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def kernel_replay(alpha, ray, feats, n_rays, backgrounds):
    """``RasterizeToPixels2DGSFwd.cu``'s per-pixel loop over the depth-sorted pairs (all pixels at
    once), on per-pair alphas and ``feats = [rgb, z, normal]``: skip alpha < 1/255, stop before ``T``
    would reach ``<= 1e-4``, distortion ``+= 2 (vis z (1 - T) - vis sum(vis z))``, median the z of the
    last pair taken with ``T > 0.5``."""
    counts = torch.bincount(ray, minlength=n_rays)
    pos = torch.arange(len(ray)) - (torch.cumsum(counts, 0) - counts)[ray]
    A = torch.zeros(n_rays, int(counts.max()), dtype=F64).index_put((ray, pos), alpha)
    Fe = torch.zeros(n_rays, int(counts.max()), feats.shape[1], dtype=F64).index_put((ray, pos), feats)
    T = torch.ones(n_rays, dtype=F64)
    out = torch.zeros(n_rays, feats.shape[1], dtype=F64)
    distort, vis_z, median = (torch.zeros(n_rays, dtype=F64) for _ in range(3))
    done = torch.zeros(n_rays, dtype=torch.bool)
    for k in range(A.shape[1]):
        a, f, z = A[:, k], Fe[:, k], Fe[:, k, 3]
        use = ~done & (a >= 1 / 255)
        next_T = T * (1 - a)
        stop = use & (next_T <= 1e-4)
        done |= stop
        use &= ~stop
        vis = torch.where(use, a * T, 0.0)
        out += vis[:, None] * f
        distort += 2 * (vis * z * (1 - T) - vis * vis_z)
        vis_z += vis * z
        median = torch.where(use & (T > 0.5), z, median)
        T = torch.where(use, next_T, T)
    C = len(backgrounds)

    def image(x):
        return x.reshape(C, H, W, -1)

    return {"rgb": image(out[:, :3] + T[:, None] * backgrounds.repeat_interleave(H * W, 0)), "alpha": image(1 - T),
            "depth": image(out[:, 3] / (1 - T).clamp_min(1e-10)), "normals": image(out[:, 4:]), "median": image(median),
            "distortion": image(distort), "stopped": int(done.sum())}


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_rules_cut_off_stop_median_and_distortion_on_dense_scenes(reference_weights, seed):
    """Opaque, overlapping surfels: the CUDA kernel's loop replayed on the reference's per-pair alphas
    (every pair, depth-sorted) gives the twin's images, median depth and distortion to float64
    rounding, with the 1e-4 stop in force on many pixels."""
    params = surfel_scene(60, seed, opacity=(0.9, 0.999), scale=(0.08, 0.25))
    cams = cameras()
    viewmats, Ks = matrices(cams)
    bg = cams.background.to(F64)
    mine = twin(params, viewmats, Ks, bg)
    ref = reference_render(reference_weights, *params, viewmats, Ks, bg)
    replay = kernel_replay(ref["pair_alpha"], ref["ray"], ref["pair_feats"], 2 * H * W, bg)
    assert replay["stopped"] > 20
    assert float(mine["distortion"].detach().max()) > 0.05 and float(mine["median"].detach().max()) > 2.0
    replay["normals"] = world_normals(viewmats, replay["normals"])
    for key in ("rgb", "alpha", "depth", "normals", "median", "distortion"):
        torch.testing.assert_close(mine[key].detach(), replay[key], rtol=0, atol=1e-9, msg=key)


def axis_camera(size=33, focal=100.0):
    """A camera at the origin looking down +z (OpenCV), the image centre on the optical axis."""
    Ks = torch.tensor([[[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]]])
    return torch.eye(4)[None], Ks


def fronto_parallel(depths, opacities, scale=0.05):
    """Surfels centred on the optical axis, facing the camera: at the centre pixel ``u = v = 0`` and
    the pixel centre is ``means2d``, so alpha is the opacity exactly."""
    n = len(depths)
    means = torch.zeros(n, 3)
    means[:, 2] = torch.tensor(depths)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1)
    colors = torch.rand(n, 1, 3, generator=torch.Generator().manual_seed(0))
    return means, quats, torch.full((n, 3), scale), torch.tensor(opacities), colors


@pytest.mark.parametrize("layers, median, distortion", [
    # (z, opacity) in any order. Weights 0.3, 0.28, 0.21; T before each 1, 0.7, 0.42: the median is the
    # last surfel with more than half the light in front of it; distortion = sum_ij w_i w_j |z_i - z_j|.
    ([(3.0, 0.4), (2.0, 0.3), (4.0, 0.5)], 3.0, 2 * (0.3 * 0.28 * 1 + 0.3 * 0.21 * 2 + 0.28 * 0.21 * 1)),
    ([(2.0, 0.3)], 2.0, 0.0),  # the light never halves: the last surfel
    ([(5.0, 0.9), (2.0, 0.6)], 2.0, 2 * 0.6 * 0.36 * 3.0),  # the first takes T to 0.4
    ([(2.0, 0.5), (3.0, 0.5)], 2.0, 2 * 0.5 * 0.25 * 1.0),  # T = 0.5 exactly in front of the second: not above
])
def test_median_depth_and_distortion_in_closed_form(layers, median, distortion):
    viewmats, Ks = axis_camera()
    zs, ops = zip(*layers)
    args = fronto_parallel(list(zs), list(ops))
    out = splatting_2dgs.rasterize_2dgs_pytorch(*args, viewmats, Ks, 33, 33, backgrounds=torch.ones(1, 3), sh_degree=0)
    rgb, alpha, depth, normals, med, dist, _ = out
    T, z_sum = 1.0, 0.0
    for z, o in sorted(layers):
        z_sum += o * T * z
        T *= 1 - o
    assert float(alpha[0, 16, 16, 0]) == pytest.approx(1 - T, abs=1e-6)
    assert float(depth[0, 16, 16, 0]) == pytest.approx(z_sum / (1 - T), abs=1e-5)
    assert float(med[0, 16, 16, 0]) == median
    assert float(dist[0, 16, 16, 0]) == pytest.approx(distortion, abs=1e-6)
    # Far from the surfels (> 6 sigma): nothing, and both are 0 there.
    assert float(alpha[0, 0, 0, 0]) == 0 and float(med[0, 0, 0, 0]) == 0 and float(dist[0, 0, 0, 0]) == 0
    # Distortion is in depth units: the scene scaled by 2 about the camera (same image) doubles it.
    means, quats, scales, opacities, colors = args
    out2 = splatting_2dgs.rasterize_2dgs_pytorch(2 * means, quats, 2 * scales, opacities, colors, viewmats, Ks, 33, 33,
                                                 sh_degree=0)
    torch.testing.assert_close(out2[1], alpha, rtol=0, atol=1e-6)
    assert float(out2[4][0, 16, 16, 0]) == 2 * median
    assert float(out2[5][0, 16, 16, 0]) == pytest.approx(2 * distortion, abs=2e-6)


@pytest.mark.parametrize("flip", [False, True])
def test_a_fronto_parallel_surfel_faces_the_camera_in_the_world_frame(flip):
    """Either orientation of the plane renders the normal pointing back at the camera, weighted by
    alpha; the expected depth is the camera distance."""
    cams = Cameras.from_angles(20.0, 30.0, 2.5, 40.0)
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, 33, 33)
    rotation = cams.c2w[0, :3, :3] @ torch.diag(torch.tensor([1.0, -1.0, -1.0] if flip else [1.0, 1.0, 1.0]))
    args = (torch.zeros(1, 3), quat_of(rotation)[None], torch.tensor([[0.2, 0.1, 0.01]]), torch.tensor([0.8]),
            torch.ones(1, 1, 3))
    rgb, alpha, depth, normals, median, _, info = splatting_2dgs.rasterize_2dgs_pytorch(
        *args, viewmats, Ks, 33, 33, backgrounds=cams.background, sh_degree=0)
    to_camera = cams.c2w[0, :3, 3] / cams.c2w[0, :3, 3].norm()
    assert float(alpha[0, 16, 16, 0]) == pytest.approx(0.8, abs=1e-3)
    torch.testing.assert_close(normals[0, 16, 16], alpha[0, 16, 16, 0] * to_camera, rtol=0, atol=1e-5)
    torch.testing.assert_close(info["normals"][0, 0], torch.tensor([0.0, 0.0, -1.0]), rtol=0, atol=1e-5)
    covered = alpha[0, ..., 0] > 0.01
    cosine = (normals[0][covered] @ to_camera) / normals[0][covered].norm(dim=-1)
    assert covered.sum() > 30 and float(cosine.min()) > 1 - 1e-6
    assert float(depth[0, 16, 16, 0]) == pytest.approx(2.5, abs=1e-4)
    assert float(median[0, 16, 16, 0]) == pytest.approx(2.5, abs=1e-4)


def tilted_plane(degrees: float, extent: float, spacing: float, sigma: float, opacity: float, size: int):
    """A camera and a plane through the origin tilted ``degrees`` from its view axis, tiled with
    grey surfels: ``(cams, viewmats, Ks, normal, (means, quats, scales, opacities, colors))``."""
    cams = Cameras.from_angles(20.0, 30.0, 2.5, 40.0)
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, size, size)
    back = cams.c2w[0, :3, 2]  # towards the camera
    axis = torch.linalg.cross(back, torch.tensor([0.0, 1.0, 0.0]))
    normal = torch.tensor(Rotation.from_rotvec(math.radians(degrees) * (axis / axis.norm()).numpy()).apply(back.numpy()),
                          dtype=torch.float32)
    t1 = torch.linalg.cross(normal, torch.tensor([0.3, 0.5, 0.8]))
    t1 = t1 / t1.norm()
    t2 = torch.linalg.cross(normal, t1)
    grid = torch.arange(-extent, extent + 1e-6, spacing)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    means = a.reshape(-1, 1) * t1 + b.reshape(-1, 1) * t2
    n = len(means)
    return cams, viewmats, Ks, normal, (means, quat_of(torch.stack([t1, t2, normal], 1)).expand(n, 4),
                                        torch.tensor([sigma, sigma, 1e-3]).expand(n, 3), torch.full((n,), opacity),
                                        torch.full((n, 1, 3), 0.5))


def test_depth_normals_of_a_tilted_plane_of_surfels_are_the_planes_normal():
    """A plane tilted 35 degrees from the view axis, tiled with surfels (spacing 0.05, sigma 0.04): the
    normals of the expected depth agree with the plane's (facing the camera) within 5 degrees (0.3 on
    average) away from its edges; the rendered normals, all the surfels' own, to 0.1 degree."""
    cams, viewmats, Ks, normal, plane = tilted_plane(35, 1.0, 0.05, 0.04, 0.9, 64)
    out = splatting_2dgs.rasterize_2dgs_pytorch(*plane, viewmats, Ks, 64, 64, backgrounds=cams.background,
                                                sh_degree=0)
    alpha, depth, normals = out[1], out[2], out[3]
    from_depth = splatting_2dgs.depth_normals(depth, viewmats, Ks)
    assert from_depth.shape == (1, 64, 64, 3)
    opaque = (alpha[..., 0] > 0.99).float()[:, None]
    interior = (-torch.nn.functional.max_pool2d(-opaque, 5, 1, 2))[:, 0] > 0.5  # opaque 2 pixels around
    interior[:, :2], interior[:, -2:], interior[:, :, :2], interior[:, :, -2:] = False, False, False, False
    assert interior.sum() > 2000
    facing = normal if float(normal @ cams.c2w[0, :3, 3]) > 0 else -normal
    angles = torch.rad2deg(torch.acos((from_depth[interior] @ facing).clamp(-1, 1)))
    assert float(angles.max()) < 5.0 and float(angles.mean()) < 1.0
    rendered = normals[interior] / normals[interior].norm(dim=-1, keepdim=True)
    assert float(torch.rad2deg(torch.acos((rendered @ facing).clamp(-1, 1))).max()) < 0.1


@pytest.mark.parametrize("where", ["empty", "behind"])
def test_an_empty_scene_or_one_behind_the_camera_renders_the_background(where):
    cams = cameras(1)
    viewmats, Ks = matrices(cams, dtype=torch.float32)
    n = 0 if where == "empty" else 6
    # Behind: around a point half a unit behind the camera, on its line of sight.
    means = 1.2 * cams.c2w[0, :3, 3] + 0.1 * torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    params = [means, torch.randn(n, 4), torch.full((n, 3), 0.1), torch.full((n,), 0.9), torch.rand(n, 1, 3)]
    params = [p.requires_grad_() for p in params]
    out = twin(params, viewmats, Ks, cams.background)
    assert torch.equal(out["rgb"], cams.background[:, None, None].expand(1, H, W, 3))
    for key in ("alpha", "depth", "normals", "median", "distortion"):
        assert torch.equal(out[key], torch.zeros_like(out[key])), key
    assert out["info"]["n_pairs"] == 0 and (out["info"]["radii"] == 0).all()
    loss = sum(out[k].sum() for k in ("rgb", "alpha", "depth", "normals", "median", "distortion"))
    for grad in torch.autograd.grad(loss, params, allow_unused=True):
        assert grad is None or (torch.isfinite(grad).all() and (grad == 0).all())


def test_gradient_2dgs_is_the_gradient_for_moving_surfels_across_the_screen():
    """gsplat's densification statistic: ``z dL/d(ray_transforms[:2, 2])``, which is ``z / f`` times
    the loss's gradient for the centre's camera x and y (the centre's column of the ray transform is
    ``K mean_c``), for the surfels the low-pass filter never decides for (``means2d.grad`` is 0)."""
    g = torch.Generator().manual_seed(4)
    n = 20
    means = ((torch.rand(n, 3, generator=g) - 0.5) * 0.8).double().requires_grad_()
    params = [means] + [t.double().requires_grad_() for t in (
        torch.randn(n, 4, generator=g), 0.06 + 0.1 * torch.rand(n, 3, generator=g),
        0.1 + 0.8 * torch.rand(n, generator=g), torch.rand(n, 1, 3, generator=g))]
    cams = cameras(1)
    viewmats, Ks = matrices(cams, 64, 64)
    rgb, alpha, depth, normals, median, distortion, info = splatting_2dgs.rasterize_2dgs_pytorch(
        *params, viewmats, Ks, 64, 64, backgrounds=cams.background.double(), sh_degree=0)
    info["means2d"].retain_grad()
    w = torch.rand(rgb.shape, generator=g, dtype=F64)
    ((rgb * w).sum() + alpha.sum() + normals.sum() + distortion.sum()).backward()
    # The surfels the low-pass filter never decides for (no gradient through means2d).
    ray_only = (info["radii"][0] > 0).all(-1) & (info["means2d"].grad[0] == 0).all(-1)
    assert ray_only.sum() > 10 and info["gradient_2dgs"].grad[0][ray_only].abs().max() > 1e-3
    grad_cam = torch.linalg.solve(viewmats[0, :3, :3].T, means.grad.T).T  # dL/d mean_c, mean_c = R mean + t
    z, f = info["depths"][0].detach(), Ks[0, 0, 0]
    torch.testing.assert_close(info["gradient_2dgs"].grad[0][ray_only], (z[:, None] / f * grad_cam[:, :2])[ray_only],
                               rtol=1e-9, atol=1e-12)
    assert {"means2d", "radii", "width", "height", "n_cameras", "gaussian_ids"} <= info.keys()


def outside_gsplat_tiles(means, quats, scales, opacities, viewmats, Ks, width, height, tile=16):
    """``[C,H,W]``: pixels where a surfel's footprint reaches outside the 16x16 tiles that gsplat's box
    ``means2d +- radii`` touches (the kernel never tries those pairs; the twin does)."""
    with torch.no_grad():
        radii, means2d, _, ray_transforms, _ = splatting_2dgs.project_2dgs(means, quats, scales, viewmats, Ks, width,
                                                                           height)
        rows, lo, hi = splatting_2dgs.footprints(means2d, ray_transforms, opacities, radii, width, height)
        flat, pix = splatting.box_pairs(lo, hi, rows, width, height)
        m, r = means2d.reshape(-1, 2)[flat], radii.reshape(-1, 2)[flat].to(means2d.dtype)
        xy = torch.stack([pix % width, pix // width], -1)
        in_tiles = ((xy // tile >= torch.floor((m - r) / tile)) & (xy // tile < torch.ceil((m + r) / tile))).all(-1)
        cam = flat // means.shape[0]
        mask = torch.zeros(len(viewmats) * height * width, dtype=torch.bool, device=means.device)
        mask[(cam * height * width + pix)[~in_tiles]] = True
        return mask.view(len(viewmats), height, width)


@pytest.mark.cuda
def test_cuda_2dgs_rasteriser_matches_the_twin():  # pragma: no cover - GPU only
    """gsplat's kernel against the twin, away from the few pixels where a footprint leaves gsplat's
    tiles: images to float32 rounding, and the median depth on all but pixels where the two
    transmittances straddle 0.5."""
    n = 400
    g = torch.Generator().manual_seed(0)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
    scales = 0.05 + 0.1 * torch.rand(n, 3, generator=g)
    args = [t.cuda() for t in (means, torch.randn(n, 4, generator=g), scales, 0.05 + 0.9 * torch.rand(n, generator=g),
                               torch.randn(n, 4, 3, generator=g) * 0.3)]
    cams = cameras().to("cuda")
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, 64, 64)
    kw = {"backgrounds": cams.background, "sh_degree": 1}
    mine = splatting_2dgs.rasterize_2dgs_pytorch(*args, viewmats, Ks, 64, 64, **kw)
    theirs = splatting_2dgs.rasterize_2dgs_gsplat(*args, viewmats, Ks, 64, 64, **kw)
    same = ~outside_gsplat_tiles(*args[:4], viewmats, Ks, 64, 64)
    assert same.float().mean() > 0.98
    for a, b in zip(mine[:2], theirs[:2]):  # fast math: a mean bound and a bounded share of outliers
        close = agreement(a[same], b[same], atol=1e-4)
        assert close["ok"], close
    covered = same & (mine[1][..., 0] > 0.05)
    for k in (2, 3, 5):  # depth, normals, distortion
        torch.testing.assert_close(mine[k][covered], theirs[k][covered], atol=2e-3, rtol=0)
    assert ((mine[4] - theirs[4]).abs()[covered] < 1e-3).float().mean() > 0.99


def test_intersection_depth_follows_a_tilted_plane_where_centre_depth_steps():
    """``depth_at="intersection"`` (the mesh export's depth): on a plane tilted 50 degrees, tiled
    with large surfels (spacing 0.1, sigma 0.08), the expected depth is the plane's own z-depth
    (mean error under 0.1 % of the distance), where gsplat's centre depth is off by the discs'
    extent."""
    cams, viewmats, Ks, normal, plane = tilted_plane(50, 1.5, 0.1, 0.08, 0.95, 48)
    args = (*plane, viewmats, Ks, 48, 48)
    hit = splatting_2dgs.rasterize_2dgs_pytorch(*args, sh_degree=0, depth_at="intersection")
    centre = splatting_2dgs.rasterize_2dgs_pytorch(*args, sh_degree=0)
    # The plane's z-depth at each pixel: the plane through the origin, in the camera frame.
    n_cam = viewmats[0, :3, :3] @ normal
    offset = float(n_cam @ viewmats[0, :3, 3])
    ys, xs = torch.meshgrid(torch.arange(48) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    rays = torch.stack([(xs - Ks[0, 0, 2]) / Ks[0, 0, 0], (ys - Ks[0, 1, 2]) / Ks[0, 1, 1], torch.ones_like(xs)], -1)
    truth = offset / (rays @ n_cam)
    opaque = hit[1][0, ..., 0] > 0.99
    assert opaque.sum() > 1000
    error_hit = (hit[2][0, ..., 0] - truth)[opaque].abs()
    error_centre = (centre[2][0, ..., 0] - truth)[opaque].abs()
    # Measured: mean 0.0006 against the centre depth's 0.061 (a few pixels where two discs' edges
    # meet keep a centre depth through the low-pass term).
    assert float(error_hit.mean()) < 0.002 and float(torch.quantile(error_hit, 0.95)) < 0.01, error_hit
    assert float(error_centre.mean()) > 10 * float(error_hit.mean())
    torch.testing.assert_close(hit[1], centre[1])  # the same image otherwise
    with pytest.raises(ValueError, match="depth_at"):
        splatting_2dgs.rasterize_2dgs_pytorch(*args, sh_degree=0, depth_at="surface")
