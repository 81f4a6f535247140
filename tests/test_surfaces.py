"""The surface representations: the SDF NeRF (``nerf-sdf``) and 2D Gaussian surfels (``surfels``).

Closed-form checks of the SDF's density rule and regularisers, of the depth fusion that meshes the
surfels, trained shapes on each with machine-independent bounds, and their bad inputs."""

import math

import numpy as np
import pytest
import torch
from test_bad_inputs import TINY, cli_error, status_of

from threedgen.config import build_config, parse_overrides
from threedgen.representations.config import REPRESENTATIONS


def sdf_nerf(*items, field="grid"):
    cfg = build_config("sds", "nerf-sdf", overrides=parse_overrides([f"representation.field={field}", *items]),
                       flags={"prompt": "a red cube", "steps": 10})
    return REPRESENTATIONS["nerf-sdf"].cls(cfg.representation, "cpu")


# ---- the SDF: density rule and regularisers --------------------------------------------------
def test_the_laplace_density_is_half_of_one_over_beta_on_the_surface_and_symmetric():
    from threedgen.representations.sdf import laplace_density

    beta = 0.05
    sdf = torch.linspace(-1, 1, 201)
    sigma = laplace_density(sdf, beta)
    assert sigma[100].item() == pytest.approx(1 / (2 * beta))
    # Psi(s) + Psi(-s) = 1: the densities at +d and -d add up to 1/beta.
    assert torch.allclose(sigma + sigma.flip(0), torch.full_like(sigma, 1 / beta), rtol=1e-6)
    assert sigma[0].item() == pytest.approx(1 / beta, rel=1e-6)  # deep inside
    assert sigma[-1].item() == pytest.approx(0.5 * math.exp(-1 / beta) / beta, rel=1e-4)  # outside: the tail
    assert torch.all(sigma[1:] <= sigma[:-1])  # falls as the point moves out
    # Its integral along a ray crossing the surface from outside: every point inside is opaque.
    t = torch.linspace(-0.5, 0.5, 100001)
    assert (laplace_density(-t, beta).clamp_max(1 / beta) * (t[1] - t[0])).sum().item() == pytest.approx(
        0.5 / beta, rel=1e-2)


def test_the_untouched_geometry_is_a_sphere_of_the_initial_radius():
    rep = sdf_nerf("representation.init_radius=0.4")
    points = torch.randn(500, 3)
    points = points / points.norm(dim=-1, keepdim=True) * torch.rand(500, 1) * 0.9
    assert torch.allclose(rep.sdf(points), points.norm(dim=-1) - 0.4, atol=1e-6)


def test_the_eikonal_term_is_near_zero_on_a_distance_and_one_on_twice_a_distance():
    rep = sdf_nerf()
    assert rep.eikonal().item() < 0.01  # |x| - r sampled on the lattice: gradient norm 1 but near the centre
    with torch.no_grad():  # f = 2 (|x| - r): gradient norm 2, so (2 - 1)^2 = 1
        values, _ = rep._lattice_sdf()
        rep.field.density[0] += values
    assert rep.eikonal().item() == pytest.approx(1.0, abs=0.03)


def test_the_eikonal_term_sees_a_checkerboard():
    rep = sdf_nerf()
    r = rep.field.density.shape[-1]
    idx = torch.arange(r)
    board = ((idx[:, None, None] + idx[None, :, None] + idx[None, None, :]) % 2).float() * 0.02
    with torch.no_grad():
        rep.field.density[0] += board
    assert rep.eikonal().item() > 0.1  # central differences would see none of it


def test_the_sampled_eikonal_gradient_is_the_lattice_s_forward_difference_at_the_drawn_voxels():
    from threedgen.representations.sdf import lattice_gradient, lattice_gradient_at

    values = torch.randn(9, 8, 7)
    full = lattice_gradient(values, 0.25).flatten(1)
    assert torch.equal(lattice_gradient_at(values, 0.25, 10 ** 6), full)  # more than there are: all of them
    torch.manual_seed(0)
    drawn = lattice_gradient_at(values, 0.25, 50)
    assert drawn.shape == (3, 50)
    # Every drawn column is the forward difference at one of the voxels the full lattice covers.
    distance = (drawn.T[:, None, :] - full.T[None, :, :]).abs().amax(-1).amin(-1)
    assert distance.max().item() < 1e-5
    # A linear field has the same gradient at every voxel, whichever are drawn: (z, y, x) slopes.
    lin = torch.arange(9.)[:, None, None] * 3 + torch.arange(8.)[None, :, None] * 2 + torch.arange(7.)
    assert torch.allclose(lattice_gradient_at(lin, 0.5, 64), torch.tensor([6., 4., 2.])[:, None].expand(3, 64))


@pytest.mark.parametrize("coarse, fine", [(8, 64), (16, 64), (2, 9), (5, 5)])
def test_the_coarse_grid_s_upsampling_matrix_is_linear_interpolation_end_to_end(coarse, fine):
    from threedgen.representations.sdf import linear_upsampling

    m = linear_upsampling(coarse, fine)
    assert m.shape == (fine, coarse) and torch.allclose(m.sum(1), torch.ones(fine))  # weights sum to 1
    x = torch.randn(3, coarse)
    reference = torch.nn.functional.interpolate(x[None], size=fine, mode="linear", align_corners=True)[0]
    assert torch.allclose(x @ m.T, reference, atol=1e-6)


def test_the_coarse_grid_moves_the_surface_and_the_lattice_sees_what_the_renders_see():
    rep = sdf_nerf("representation.coarse_resolution=8", "representation.init_radius=0.5")
    assert rep.coarse.shape == (1, 8, 8, 8)
    groups = {g["name"]: g for g in rep.parameter_groups()}
    assert groups["coarse"]["params"] == [rep.coarse] and groups["coarse"]["lr"] == rep.cfg.lr_coarse
    points = (torch.rand(300, 3) * 2 - 1) * 0.9 * rep.cfg.bound  # inside the box (the grids end there)
    with torch.no_grad():
        rep.coarse.fill_(0.1)  # a constant residual: a sphere 0.1 smaller
    assert torch.allclose(rep.sdf(points), points.norm(dim=-1) - 0.4, atol=1e-5)
    with torch.no_grad():  # random coarse and fine residuals: the regularisers' lattice is f at its points
        rep.coarse.normal_(0, 0.1)
        rep.field.density.normal_(0, 0.01)
    values, h = rep._lattice_sdf()
    r = values.shape[-1]
    # The coarse grid reaches the fine lattice as torch's own trilinear upsampling would take it.
    upsampled = torch.nn.functional.interpolate(rep.coarse[None], size=(r, r, r), mode="trilinear", align_corners=True)
    assert torch.allclose(rep.residual_grid(), rep.field.density + upsampled[0], atol=1e-5)
    lin = torch.linspace(-rep.cfg.bound, rep.cfg.bound, r)
    idx = torch.randint(0, r, (200, 3))
    lattice_points = torch.stack([lin[idx[:, 2]], lin[idx[:, 1]], lin[idx[:, 0]]], -1)  # [z,y,x] -> (x,y,z)
    assert torch.allclose(values[idx[:, 0], idx[:, 1], idx[:, 2]], rep.sdf(lattice_points), atol=1e-5)
    assert h == pytest.approx(2 * rep.cfg.bound / (r - 1))
    # Its gradient reaches the coarse grid through the eikonal term too.
    rep.eikonal().backward()
    assert rep.coarse.grad is not None and rep.coarse.grad.abs().sum() > 0
    assert sdf_nerf("representation.coarse_resolution=0").coarse is None
    assert sdf_nerf(field="hash").coarse is None  # the hash grid is multiresolution already


def test_the_curvature_of_a_sphere_is_its_mean_curvature_and_of_a_plane_zero():
    rep = sdf_nerf("representation.init_radius=0.5", "representation.density_resolution=96")
    # Near a sphere of radius r, Laplacian |x| = 2/|x|: (2/0.5)^2 = 16 within the band around it.
    assert rep.curvature().item() == pytest.approx(16.0, rel=0.1)
    with torch.no_grad():  # residual that turns f into the plane x = 0.1
        values, _ = rep._lattice_sdf()
        r = values.shape[-1]
        lin = torch.linspace(-rep.cfg.bound, rep.cfg.bound, r)
        plane = lin[None, None, :].expand(r, r, r) - 0.1  # grid index [z,y,x]: x is the last axis
        rep.field.density[0] += plane - values
    assert rep.curvature().item() < 1e-6
    assert rep.eikonal().item() < 1e-6


def test_the_hash_field_s_eikonal_term_is_near_zero_at_the_start():
    rep = sdf_nerf("representation.eikonal_points=2000", field="hash")
    assert rep.eikonal().item() < 0.01
    loss = rep.regularizer(None)
    loss.backward()
    assert rep.field.encoding.table.grad is not None


def test_beta_follows_its_schedule_and_is_saved_with_the_parameters():
    rep = sdf_nerf("representation.beta_start=0.1", "representation.beta_end=0.01", "representation.beta_anneal=0.5")
    assert float(rep.beta) == pytest.approx(0.1)
    rep.on_step(25, 100)
    assert float(rep.beta) == pytest.approx(0.1 * 0.1 ** 0.5, rel=1e-5)
    rep.on_step(80, 100)
    assert float(rep.beta) == pytest.approx(0.01, rel=1e-5)
    again = sdf_nerf("representation.beta_start=0.1", "representation.beta_end=0.01")
    again.load_state_dict(rep.state_dict())
    assert float(again.beta) == pytest.approx(0.01, rel=1e-5)


def test_the_initial_sphere_meshes_at_its_zero_level_with_true_normals():
    rep = sdf_nerf("representation.init_radius=0.45")
    mesh = rep.extract_surface(64).mesh
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radius.mean() - 0.45) < 0.005 and radius.std() < 0.005
    assert mesh.is_watertight
    centres = mesh.triangles_center / np.linalg.norm(mesh.triangles_center, axis=1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip((mesh.face_normals * centres).sum(1), -1, 1)))
    assert np.average(angle, weights=mesh.area_faces) < 3.0  # outward and radial
    alpha, colour = rep.opacity_grid(1.0, 33)
    inside = alpha > 0.5
    lin = torch.linspace(-1, 1, 33)
    norm = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).norm(dim=-1)
    assert torch.equal(inside, norm < 0.45) and colour.shape == (33, 33, 33, 3)


# ---- depth fusion ---------------------------------------------------------------------------
def sphere_render(radius, size):
    """An analytic renderer of a sphere at the origin: (alpha, ray distance) of ``size`` x ``size`` views."""

    def render(cams):
        origins, dirs = cams.rays(size, size)
        b = (origins * dirs).sum(-1)
        c = (origins * origins).sum(-1) - radius ** 2
        disc = b * b - c
        hit = disc > 0
        t = -b - torch.sqrt(disc.clamp_min(0))
        return hit.float(), torch.where(hit, t, torch.zeros_like(t))

    return render


def truth_render(sdf, size):
    """Sphere tracing of a signed distance: (alpha, ray distance) of ``size`` x ``size`` views."""

    def render(cams):
        origins, dirs = cams.rays(size, size)
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        t = torch.zeros(len(o))
        hit = torch.zeros(len(o), dtype=torch.bool)
        for _ in range(200):
            value = sdf(o + d * t[:, None])
            hit |= value < 1e-4
            t = torch.where(hit, t, t + value.clamp_min(1e-4) * 0.9)
        hit &= t < 20
        return hit.float().view(len(cams), size, size), torch.where(hit, t, torch.zeros_like(t)).view(len(cams), size, size)

    return render


@pytest.mark.parametrize("shape, min_iou", [("cube", 0.98), ("torus", 0.93), ("mug_body", 0.75)])
def test_fusing_the_truth_s_depth_gives_back_the_truth(shape, min_iou):
    """The truth's own depth (sphere-traced), fused: its voxels again, the torus's hole open
    (measured IoU on a 64^3 grid: cube 0.999, torus 0.967, mug 0.775: the mug's inside is seen only
    from above, so part of it fills)."""
    from threedgen.fusion import fuse_depth, fusion_cameras
    from threedgen.guidance.priors.shapes import sdf as shapes_sdf

    fn = getattr(shapes_sdf, shape)
    bound, resolution = 0.75, 64
    fused = fuse_depth(truth_render(fn, 128), fusion_cameras(bound), 128, bound, resolution,
                       truncation=4 * 2 * bound / (resolution - 1))
    lin = torch.linspace(-bound, bound, resolution)
    inside = (fn(torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)) < 0).numpy()
    fused_inside = fused.reshape(-1) < 0
    iou = (fused_inside & inside).sum() / (fused_inside | inside).sum()
    assert iou >= min_iou, iou
    if shape == "torus":  # the hole stays open: the axis through it is empty
        r = resolution // 2
        assert (fused[r - 1:r + 1, :, r - 1:r + 1] > 0).all()


def test_fused_depth_of_a_sphere_meshes_to_that_sphere_watertight():
    from threedgen.fusion import fuse_depth, fusion_cameras
    from threedgen.meshing import surface_from_grid

    bound, resolution = 1.0, 48
    fused = fuse_depth(sphere_render(0.6, 96), fusion_cameras(bound), 96, bound, resolution,
                       truncation=4 * 2 * bound / (resolution - 1))
    lin = np.linspace(-bound, bound, resolution)
    norm = np.linalg.norm(np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), -1), axis=-1)
    assert ((fused < 0) == (norm < 0.6))[np.abs(norm - 0.6) > 0.05].all()  # inside / outside, away from the surface
    mesh = surface_from_grid(-fused, lambda p: torch.zeros(len(p), 3), bound, 0.0).mesh
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert mesh.is_watertight and abs(radius.mean() - 0.6) < 0.01 and radius.std() < 0.01


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("representation, item, words", [
    ("nerf-sdf", "representation.eikonal_weight=-1", "representation.eikonal_weight must be a number from 0"),
    ("nerf-sdf", "representation.curvature_weight=nan", "representation.curvature_weight must be a number"),
    ("nerf-sdf", "representation.beta_end=0.5", "representation.beta_end must be a number from 0.0001 to 0.1"),
    ("nerf-sdf", "representation.mesh_threshold=5", "mesh_threshold does not apply to nerf-sdf"),
    ("nerf-sdf", "representation.coarse_resolution=1", "representation.coarse_resolution must be an integer from 2"),
    ("nerf-sdf", "representation.eikonal_points=0", "representation.eikonal_points must be an integer from 1"),
    ("nerf-sdf", "representation.sampler=marching", "representation.sampler must be one of auto, dense, occgrid"),
    ("surfels", "representation.densify=mcmc", "densify=mcmc is not offered for surfels"),
    ("surfels", "representation.normal_weight=-0.1", "representation.normal_weight must be a number from 0"),
    ("surfels", "representation.tsdf_truncation=0", "representation.tsdf_truncation must be a number from 0.5"),
    ("surfels", "representation.primitive=3d", "representation.primitive"),
    ("surfel", None, "unknown representation 'surfel'"),
])
def test_a_setting_a_surface_cannot_honour_is_one_line_exit_2_and_nothing_written(
        representation, item, words, tmp_path, capsys):
    argv = ["run", "--prompt", "a red cube", "--representation", representation, "--out", tmp_path / "o"]
    line = cli_error(capsys, argv + ([item] if item else []))
    assert words in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("representation, extra", [
    ("nerf-sdf", []),
    ("surfels", ["representation.num_points=200", "representation.regularize_from=0", "representation.mesh_view_size=32",
                 "representation.mesh_views_per_ring=4"]),
])
def test_non_finite_surface_terms_skip_the_step(representation, extra, tmp_path, monkeypatch):
    """A step whose eikonal or depth-normal term is NaN goes through the skip path: no parameter
    takes it, the run finishes."""
    cls = REPRESENTATIONS[representation].cls
    real = cls.regularizer
    calls = {"n": 0}

    def flaky(self, out):
        calls["n"] += 1
        value = real(self, out)
        return value * float("nan") if calls["n"] in (3, 4) else value

    monkeypatch.setattr(cls, "regularizer", flaky)
    run_dir = _tiny(representation, extra, tmp_path)
    st = status_of(run_dir)
    assert st["status"] == "succeeded" and st["skipped_steps"] == 2 and st["step"] == 8, st


def _tiny(representation, extra, out, steps=8):
    from threedgen.runner import run

    items = [i for i in TINY if not i.startswith("representation.num_samples")] + extra
    cfg = build_config("sds", representation, overrides=parse_overrides(items),
                       flags={"prompt": "a red cube", "steps": steps})
    return run(cfg, out=out, progress_bar=False)


# ---- trained shapes -------------------------------------------------------------------------
# A short default run of each surface representation on the shapes prior, scored by the eval.
# Measured here: nerf-sdf 2.7 degrees of normal error and Chamfer 0.011, surfels 35.9 degrees and
# 0.040 (a lumpy sphere: BENCHMARKS.md, "Surfaces"). The bounds leave room for another CPU's last bits, which training amplifies, and
# still fail on what the surfels' mesh was before its fixes (inner bubbles from translucent views,
# discs all facing one axis: 61-70 degrees) and on an SDF without its curvature term (15-30).
TRAINED = {
    "nerf-sdf": (["--steps", "150"], 8.0, 0.02),
    "surfels": (["--steps", "150"], 50.0, 0.06),
}


@pytest.fixture(scope="module", params=sorted(TRAINED))
def trained_sphere(request, tmp_path_factory):
    from threedgen.cli import main

    out = tmp_path_factory.mktemp(request.param)
    args, bound, chamfer = TRAINED[request.param]
    assert main(["run", "--prompt", "a green sphere", "--representation", request.param, "--seed", "0",
                 "--no-progress", "--out", str(out), "export.video_frames=4", *args]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return request.param, bound, chamfer, run_dir


def test_a_trained_sphere_is_watertight_with_true_normals(trained_sphere):
    import json

    representation, bound, chamfer, run_dir = trained_sphere
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(representation, {k: metrics[k] for k in ("mask_iou", "chamfer", "normal_error_deg", "watertight")})
    assert metrics["watertight"] and metrics["open_edges"] == 0 and metrics["pinched_edges"] == 0
    assert metrics["normal_error_deg"] < bound, metrics["normal_error_deg"]
    assert metrics["mask_iou"] > 0.9 and metrics["chamfer"] < chamfer, metrics


def test_the_sdf_carves_its_sphere_into_a_torus(tmp_path):
    """The sphere the SDF starts from must lose its top, bottom and middle to become a torus (its
    height 0.28 against the sphere's 1.0). Measured at these settings ("a purple donut", a tuning
    prompt): height error 0.02-0.04, IoU 0.91-0.95 with the coarse grid; without it the shape stays
    a tall blob (height error 0.50, IoU 0.67), which these bounds fail."""
    import json

    from threedgen.cli import main

    assert main(["run", "--prompt", "a purple donut", "--representation", "nerf-sdf", "--seed", "0",
                 "--no-progress", "--out", str(tmp_path), "export.video_frames=4"]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print({k: metrics[k] for k in ("mask_iou", "height_error", "normal_error_deg")})
    assert metrics["mask_iou"] > 0.85 and abs(metrics["height_error"]) < 0.15, metrics
