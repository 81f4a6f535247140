"""Gaussian splatting: the CPU rasteriser against the CUDA kernel's rules (and gsplat on a GPU),
gradients, densification through the Gaussians' own optimizers, splat .ply, mesh export, end-to-end runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from image_agreement import agreement

from threedgen.cameras import Cameras, orbit
from threedgen.errors import UserError
from threedgen.representations import gsplat_reference, splatting
from threedgen.representations.config import GaussiansConfig
from threedgen.representations.gaussians import PARAM_NAMES, SH_C0, Gaussians, read_splat_ply


def random_scene(n=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
    scales = 0.02 + 0.12 * torch.rand(n, 3, generator=g)
    quats = torch.randn(n, 4, generator=g)
    opacities = 0.02 + 0.97 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors)]


def cameras(n=2):
    return Cameras.from_angles([15.0, -5.0][:n], [30.0, 200.0][:n], 2.5, 40.0, [[0.2, 0.5, 0.9], [1.0, 1.0, 1.0]][:n])


def sequential_reference(means2d, depths, conics, radii, opacities, feats, width, height, backgrounds):
    """gsplat's RasterizeToPixels3DGSFwd kernel written as a loop over depth-sorted Gaussians (all
    pixels at once): skip q < 0 or alpha < 1/255, stop before T would reach <= 1e-4."""
    C = means2d.shape[0]
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    px, py = xs.reshape(-1).double(), ys.reshape(-1).double()
    rgb, alpha, depth = [], [], []
    for c in range(C):
        T = torch.ones_like(px)
        out = torch.zeros(px.shape[0], feats.shape[-1], dtype=torch.float64)
        done = torch.zeros_like(px, dtype=torch.bool)
        for n in torch.argsort(depths[c]).tolist():
            if not (radii[c, n] > 0).all():
                continue
            dx, dy = means2d[c, n, 0].double() - px, means2d[c, n, 1].double() - py
            a, b, cc = conics[c, n].double()
            q = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
            al = torch.clamp_max(opacities[n].double() * torch.exp(-q), 0.999)
            use = ~done & (q >= 0) & (al >= 1 / 255)
            next_t = T * (1 - al)
            stop = use & (next_t <= 1e-4)
            done |= stop
            use &= ~stop
            out += torch.where(use[:, None], (al * T)[:, None] * feats[c, n].double(), 0.0)
            T = torch.where(use, next_t, T)
        rgb.append(out[:, :3] + T[:, None] * backgrounds[c].double())
        alpha.append(1 - T)
        depth.append(out[:, 3] / (1 - T).clamp_min(1e-10))
    shape = (C, height, width)
    return (torch.stack(rgb).view(*shape, 3), torch.stack(alpha).view(*shape, 1), torch.stack(depth).view(*shape, 1))


def test_cpu_rasteriser_matches_the_cuda_kernel_rules():
    means, quats, scales, opacities, colors = random_scene()
    cams = cameras()
    W, H = 24, 20  # not square
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, H, W)
    rgb, alpha, depth, info = splatting.rasterize_pytorch(means, quats, scales, opacities, colors, viewmats, Ks,
                                                          W, H, backgrounds=cams.background)
    feats = torch.cat([colors[None].expand(2, -1, -1), info["depths"][..., None]], -1)
    ref = sequential_reference(info["means2d"].detach(), info["depths"].detach(), info["conics"].detach(),
                               info["radii"], opacities, feats.detach(), W, H, cams.background)
    assert rgb.shape == (2, H, W, 3) and alpha.shape == (2, H, W, 1) and depth.shape == (2, H, W, 1)
    assert 0.05 < float(alpha.mean()) < 0.95  # the scene covers part of the image
    for mine, theirs in zip((rgb, alpha), ref[:2]):
        torch.testing.assert_close(mine.double(), theirs, atol=2e-5, rtol=0)
    covered = alpha > 0.01
    torch.testing.assert_close(depth[covered].double(), ref[2][covered], atol=1e-4, rtol=0)


def test_projection_is_gsplats_with_the_opacity_aware_radius():
    means, quats, scales, opacities, _ = random_scene()
    cams = cameras()
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, 64, 64)
    means2d, depths, conics, radii = splatting.project(means, quats, scales, opacities, viewmats, Ks, 64, 64)
    covars, _ = gsplat_reference.quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    ref_radii, ref_means2d, ref_depths, ref_conics, _ = gsplat_reference.fully_fused_projection(
        means, covars, viewmats, Ks, 64, 64)
    torch.testing.assert_close(means2d, ref_means2d)
    torch.testing.assert_close(conics, ref_conics)
    # The radius: ceil(min(3.33, sqrt(2 ln(255 o))) * sqrt(Sigma2d_xx)), Sigma2d = inverse conic.
    a, b, c = ref_conics.double().unbind(-1)
    det = a * c - b * b
    extend = torch.sqrt(2 * torch.log(255 * opacities.double())).clamp(max=3.33)
    expect = torch.stack([torch.ceil(extend * (c / det).sqrt()), torch.ceil(extend * (a / det).sqrt())], -1)
    visible = (radii > 0).all(-1)
    assert visible.sum() > 20
    assert torch.equal(radii[visible].double(), expect[visible])
    assert (radii[visible] <= ref_radii[visible]).all()  # tighter than the 3.33-sigma box
    # Projected centre: K @ (R x + t) / z, with threedgen's camera looking down -z.
    x_cam = (viewmats[:, None, :3, :3] @ means[None, :, :, None])[..., 0] + viewmats[:, None, :3, 3]
    uv = (Ks[:, None, :2, :2] @ (x_cam[..., :2] / x_cam[..., 2:])[..., None])[..., 0] + Ks[:, None, :2, 2]
    torch.testing.assert_close(means2d, uv, atol=1e-4, rtol=0)
    torch.testing.assert_close(depths, x_cam[..., 2])


def test_rasteriser_renders_a_centred_gaussian_where_the_rays_say():
    """One opaque Gaussian at the origin renders at the image centre; the expected ray distance
    there is the camera distance (threedgen's depth is along the ray, like the NeRF's)."""
    cams = Cameras.from_angles(0.0, 0.0, 2.5, 40.0)
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, 33, 33)
    means, quats = torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]])
    rgb, alpha, depth, _ = splatting.rasterize_pytorch(means, quats, torch.full((1, 3), 0.1), torch.tensor([0.9]),
                                                       torch.tensor([[1.0, 0.0, 0.0]]), viewmats, Ks, 33, 33,
                                                       backgrounds=torch.ones(1, 3))
    peak = torch.nonzero(alpha[0, ..., 0] == alpha.max())
    assert peak.tolist() == [[16, 16]]
    assert abs(float(alpha.max()) - 0.9 * math.exp(-0.5 * 0.0)) < 0.01
    assert float(depth[0, 16, 16, 0]) == pytest.approx(2.5, abs=1e-4)
    torch.testing.assert_close(rgb[0, 16, 16], torch.tensor([1.0, 0.1, 0.1]), atol=0.01, rtol=0)


def test_gradients_reach_every_parameter_and_match_finite_differences():
    torch.manual_seed(0)
    rep = Gaussians(GaussiansConfig(num_points=60, sh_degree=1, init_radius=0.4, init_opacity=0.5), seed=1)
    with torch.no_grad():  # anisotropic, rotated, with view-dependent colour
        rep.params["scales"].add_(torch.randn_like(rep.params["scales"]) * 0.3)
        rep.params["quats"].copy_(torch.randn_like(rep.params["quats"]))
        rep.params["shN"].normal_(0, 0.2)
    cams = cameras()
    weight = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(3))

    def loss_fn():
        out = rep.render(cams, 32, 32)
        return (out.rgb * weight).sum() + out.alpha.sum() + 0.1 * out.depth.sum()

    loss = loss_fn()
    loss.backward()
    for name in PARAM_NAMES:
        grad = rep.params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # Central differences on a few means coordinates (float64 parameters).
    rep.double()
    for name in PARAM_NAMES:
        rep.params[name].grad = None
    loss_fn_d = loss_fn  # float64 now
    loss = loss_fn_d()
    loss.backward()
    grads = rep.params["means"].grad.clone()
    visible = grads.abs().sum(-1).argsort(descending=True)[:4]
    for i in visible.tolist():
        for axis in range(3):
            with torch.no_grad():
                rep.params["means"][i, axis] += 1e-5
                up = float(loss_fn_d())
                rep.params["means"][i, axis] -= 2e-5
                down = float(loss_fn_d())
                rep.params["means"][i, axis] += 1e-5
            fd = (up - down) / 2e-5
            assert fd == pytest.approx(float(grads[i, axis]), rel=0.02, abs=0.02), (i, axis)


def _train_steps(rep, steps, start=0, max_steps=100):
    optimizers = rep.make_optimizers((0.9, 0.999), 1e-15)
    cams = cameras(1)
    target = torch.tensor([0.9, 0.1, 0.1])
    for step in range(start, start + steps):
        out = rep.render(cams, 32, 32)
        loss = ((out.rgb - target) ** 2).sum() * 100  # large gradients: everything wants to grow
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
        rep.on_step(step, max_steps)
    return optimizers


def test_densify_and_prune_keep_the_optimizer_consistent():
    cfg = GaussiansConfig(num_points=300, densify_every=5, densify_start=0.0, densify_stop=1.0,
                          densify_grad_threshold=1e-6, max_gaussians=5000, init_radius=0.3)
    rep = Gaussians(cfg, seed=0)
    n0 = len(rep)
    optimizers = _train_steps(rep, 11)
    assert len(rep) > n0  # grew at steps 5 and 10
    assert optimizers is rep.optimizers and list(optimizers) == list(PARAM_NAMES)  # gsplat's: one per parameter
    for name in PARAM_NAMES:
        p, opt = rep.params[name], optimizers[name]
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [p] and p.shape[0] == len(rep)
        assert opt.param_groups[0]["params"][0] is p and list(opt.state) == [p]
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
    # Pruning: make half of the Gaussians transparent; the next refinement drops them.
    with torch.no_grad():
        rep.params["opacities"][::2] = -20.0
    cfg.densify_grad_threshold = 1e9  # no growth
    n1 = len(rep)
    _train_steps(rep, 6, start=11)
    assert len(rep) <= n1 - n1 // 2 + 5
    assert all(rep.params[k].shape[0] == len(rep) for k in PARAM_NAMES)


def test_densification_respects_the_cap_and_the_run_window():
    cfg = GaussiansConfig(num_points=300, densify_every=2, densify_start=0.0, densify_stop=1.0,
                          densify_grad_threshold=1e-9, max_gaussians=400, init_radius=0.3)
    rep = Gaussians(cfg, seed=0)
    _train_steps(rep, 9)
    assert 300 < len(rep) <= 400
    late = Gaussians(GaussiansConfig(num_points=300, densify_every=2, densify_start=0.5, densify_stop=0.6,
                                     densify_grad_threshold=1e-9, init_radius=0.3), seed=0)
    _train_steps(late, 9, max_steps=100)  # steps 0-8 are before 50% of a 100-step run
    assert len(late) == 300


def test_load_state_dict_resizes_to_the_checkpoint():
    small = Gaussians(GaussiansConfig(num_points=100), seed=0)
    big = Gaussians(GaussiansConfig(num_points=250), seed=1)
    small.load_state_dict(big.state_dict())
    assert len(small) == 250
    assert torch.equal(small.params["means"], big.params["means"])


def test_splat_ply_round_trip(tmp_path):
    rep = Gaussians(GaussiansConfig(num_points=50, sh_degree=2), seed=0)
    with torch.no_grad():
        rep.params["shN"].normal_()
    (path,) = rep.export_files(tmp_path)
    assert path.name == "splats.ply"
    data = read_splat_ply(path)
    p = {k: v.detach().numpy() for k, v in rep.params.items()}
    np.testing.assert_array_equal(np.stack([data[a] for a in "xyz"], 1), p["means"])
    np.testing.assert_array_equal(np.stack([data[f"f_dc_{i}"] for i in range(3)], 1), p["sh0"][:, 0])
    # f_rest is channel-major: all of red's coefficients, then green's, then blue's (Inria's layout).
    rest = np.stack([data[f"f_rest_{i}"] for i in range(3 * 8)], 1).reshape(50, 3, 8).transpose(0, 2, 1)
    np.testing.assert_array_equal(rest, p["shN"])
    np.testing.assert_array_equal(data["opacity"], p["opacities"])
    np.testing.assert_array_equal(np.stack([data[f"scale_{i}"] for i in range(3)], 1), p["scales"])
    np.testing.assert_array_equal(np.stack([data[f"rot_{i}"] for i in range(4)], 1), p["quats"])
    header = path.read_bytes()[:400].decode("ascii", "replace")
    assert "element vertex 50" in header and "format binary_little_endian 1.0" in header


def cube_of_gaussians(half=0.3, per_axis=10, color=(0.9, 0.1, 0.1)):
    lin = torch.linspace(-half, half, per_axis)
    means = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    rep = Gaussians(GaussiansConfig(num_points=len(means), densify="none"), seed=0)
    spacing = 2 * half / (per_axis - 1)
    with torch.no_grad():
        rep.params["means"].copy_(means)
        rep.params["scales"].fill_(math.log(spacing * 0.6))
        rep.params["opacities"].fill_(4.0)
        rep.params["sh0"].copy_(((torch.tensor(color) - 0.5) / SH_C0).expand(len(means), 1, 3))
    return rep


def test_mesh_of_a_cube_of_gaussians_has_the_cube_s_size_and_colour():
    rep = cube_of_gaussians()
    mesh = rep.extract_surface(64).colored_mesh()
    assert len(mesh.faces) > 100 and mesh.is_watertight
    lo, hi = mesh.bounds
    # The splats' silhouette reaches a little beyond the outermost centres (their footprint).
    assert np.all(lo < -0.3) and np.all(lo > -0.42) and np.all(hi > 0.3) and np.all(hi < 0.42)
    rgba = mesh.visual.vertex_colors
    assert np.abs(rgba[:, :3].mean(0) - np.array([230, 26, 26])).max() < 12
    # The automatic level puts the mesh's silhouette where the splats render opaque, seen along an
    # axis (the level is fitted on axis-aligned lines): a far camera with a narrow field of view.
    with torch.no_grad():
        out = rep.render(orbit(1, 0.0, 25.0, 4.0), 64, 64)
    covered = float((out.alpha[0, ..., 0] > 0.5).sum())
    extent = mesh.bounds[1, :2] - mesh.bounds[0, :2]
    focal = 32 / math.tan(math.radians(2))
    mesh_pixels = np.prod(extent * focal / (25.0 - mesh.bounds[1, 2]))
    assert covered == pytest.approx(mesh_pixels, rel=0.08)


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="backend=gsplat needs CUDA"):
        Gaussians(GaussiansConfig(backend="gsplat"))
    with pytest.raises(UserError, match="densify=mcmc needs CUDA"):
        Gaussians(GaussiansConfig(densify="mcmc"))
    with pytest.raises(UserError, match="representation.max_gaussians"):
        GaussiansConfig(num_points=500, max_gaussians=100).check()
    with pytest.raises(UserError, match="representation.init must be one of"):
        GaussiansConfig(init="cube").check()


def test_every_method_has_a_gaussians_preset_with_its_nerf_settings():
    from threedgen.config import build_config
    from threedgen.guidance import GUIDANCE

    for method in GUIDANCE:
        g = build_config(method, "gaussians", "shapes", flags={"prompt": "a red cube"})
        n = build_config(method, "nerf", "shapes", flags={"prompt": "a red cube"})
        assert g.representation.name == "gaussians" and isinstance(g.representation, GaussiansConfig)
        assert g.guidance == n.guidance and g.steps == n.steps and g.camera == n.camera
        assert g.representation.bound == 0.75  # the shapes prior's scene box


@pytest.mark.cuda
def test_cuda_rasteriser_matches_the_cpu_rasteriser():  # pragma: no cover - GPU only
    means, quats, scales, opacities, colors = [t.cuda() for t in random_scene(n=400)]
    cams = cameras().to("cuda")
    viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, 64, 64)
    args = (means, quats, scales, opacities, colors, viewmats, Ks, 64, 64)
    mine = splatting.rasterize_pytorch(*args, backgrounds=cams.background)
    theirs = splatting.rasterize_gsplat(*args, backgrounds=cams.background)
    # gsplat's fast math flips the odd pixel at the 1/255 alpha cut: a mean bound and a bounded
    # share of outliers, not one pixel's maximum (benchmarks/gpu_image_error.py)
    for a, b in zip(mine[:2], theirs[:2]):
        close = agreement(a, b, atol=1e-4)
        assert close["ok"], close
    covered = mine[1] > 0.05
    torch.testing.assert_close(mine[2][covered], theirs[2][covered], atol=1e-3, rtol=0)


def test_cli_run_export_eval_and_resume_after_densification(tmp_path, capsys):
    """The whole CLI on Gaussians: densification changes N mid-run; resume, export and eval load the
    checkpoint's N."""
    import json

    from threedgen.cli import main
    from threedgen.runner import load_representation

    small = ["prior.shapes=[cube,torus]", "export.resolution=40", "export.video_frames=2", "export.video_resolution=32",
             "checkpoint_every=5", "preview_every=100", "representation.num_points=400",
             "representation.densify_every=3", "representation.densify_grad_threshold=0",
             "representation.densify_start=0", "representation.densify_stop=1", "representation.max_gaussians=1500"]
    assert main(["run", "--representation", "gaussians", "--prompt", "a red cube", "--steps", "8", "--out",
                 str(tmp_path), "--no-progress", *small]) == 0
    run_dir = capsys.readouterr().out.strip().splitlines()[-1]
    names = {p.name for p in Path(run_dir).iterdir()}
    assert {"mesh.glb", "mesh.obj", "mesh.ply", "splats.ply", "metrics.json", "turntable.mp4"} <= names
    _, rep, _ = load_representation(run_dir)
    grown = len(rep)
    assert 400 < grown <= 1500
    assert len(read_splat_ply(f"{run_dir}/splats.ply")["x"]) == grown
    assert main(["run", "--resume", run_dir, "--steps", "12", "--no-progress"]) == 0
    capsys.readouterr()
    status = json.loads(open(f"{run_dir}/status.json").read())
    assert status["status"] == "succeeded" and status["step"] == 12
    assert main(["export", run_dir, "--format", "glb"]) == 0
    capsys.readouterr()
    assert main(["eval", run_dir, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["mask_iou"] <= 1 and "chamfer" in metrics


def test_cli_rejects_bad_gaussian_settings(tmp_path, capsys):
    from threedgen.cli import main

    code = main(["run", "--representation", "gaussians", "--prompt", "a red cube", "--out", str(tmp_path),
                 "representation.backend=gsplat"])
    err = capsys.readouterr().err
    assert code == 2 and "backend=gsplat needs CUDA" in err and "Traceback" not in err
    code = main(["run", "--representation", "gaussians", "--prompt", "a red cube", "--out", str(tmp_path),
                 "representation.num_samples=32"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'representation.num_samples'" in err
    assert list(tmp_path.iterdir()) == []
