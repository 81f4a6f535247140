"""The shapes prior: schedule, exact SDFs, vocabulary, the exact denoiser against brute force,
camera kernel, CFG branches and the on-disk cache."""

import math

import numpy as np
import pytest
import torch

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.priors.base import sd_alphas_cumprod
from threedgen.guidance.priors.config import ShapesPriorConfig
from threedgen.guidance.priors.shapes import render as shapes_render
from threedgen.guidance.priors.shapes.prior import ShapesPrior
from threedgen.guidance.priors.shapes.sdf import SDFS
from threedgen.guidance.priors.shapes.vocab import COLOURS, MARKER_COLOUR, SHAPES, parse_negative, parse_prompt


def test_alphas_cumprod_equal_stable_diffusion():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    expected = np.cumprod(1 - betas)
    ours = sd_alphas_cumprod().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear")
    assert torch.equal(sched.alphas_cumprod, sd_alphas_cumprod())


# ---- SDFs ------------------------------------------------------------------------------------

def _reference_meshes():
    import trimesh

    cone = trimesh.creation.cone(radius=0.42, height=0.84, sections=512)
    cone.apply_translation([0, 0, -0.42])
    cone.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))  # +Z -> +Y
    pyramid = trimesh.Trimesh(
        vertices=[[-0.4, -0.4, -0.4], [0.4, -0.4, -0.4], [0.4, -0.4, 0.4], [-0.4, -0.4, 0.4], [0, 0.4, 0]],
        faces=[[0, 1, 2], [0, 2, 3], [0, 4, 1], [1, 4, 2], [2, 4, 3], [3, 4, 0]])
    trimesh.repair.fix_normals(pyramid)
    box = trimesh.creation.box(extents=[0.8, 0.8, 0.8])
    return {"cube": (box, 1e-6), "pyramid": (pyramid, 1e-6), "cone": (cone, 2e-4)}


@pytest.mark.parametrize("shape", ["cube", "pyramid", "cone"])
def test_sdf_matches_distance_to_an_explicit_mesh(shape):
    import trimesh

    mesh, tol = _reference_meshes()[shape]
    pts = np.random.default_rng(0).uniform(-0.6, 0.6, (400, 3))
    # trimesh: positive inside; ours: negative inside.
    expected = -trimesh.proximity.signed_distance(mesh, pts)
    ours = SDFS[shape](torch.tensor(pts, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, expected, atol=tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_is_a_distance(shape):
    # |grad sdf| = 1 almost everywhere, inside the unit cube, and negative at some point.
    pts = torch.rand(2000, 3, dtype=torch.float64) * 1.2 - 0.6
    pts.requires_grad_(True)
    d = SDFS[shape](pts)
    (g,) = torch.autograd.grad(d.sum(), pts)
    norms = g.norm(dim=-1)
    assert (norms - 1).abs().lt(1e-6).float().mean() > 0.97
    assert d.min() < 0
    corners = torch.tensor([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)], dtype=torch.float64)
    assert (SDFS[shape](corners) > 0).all()


def test_truth_mesh_is_watertight_and_close_to_the_sdf():
    from threedgen.guidance.priors.shapes.prior import truth_mesh

    mesh = truth_mesh("torus", resolution=96)
    assert mesh.is_watertight
    d = SDFS["torus"](torch.tensor(mesh.vertices))
    assert d.abs().max() < 0.01


# ---- vocabulary ------------------------------------------------------------------------------

def test_prompt_parsing_and_synonyms():
    assert parse_prompt("a red cube") == ("red", "cube")
    assert parse_prompt("The Grey Donut!") == ("gray", "torus")
    assert parse_prompt("an orange ball") == ("orange", "sphere")
    assert parse_negative("red, a blue torus") == [("red", None), ("blue", "torus")]
    assert len(SHAPES) >= 7 and len(COLOURS) >= 12


@pytest.mark.parametrize("prompt", ["a hamburger", "a shiny red cube", "red", "a cube", "a red blue cube",
                                    "${oc.env:HOME}", "../../etc/passwd", "a red cube/../x"])
def test_out_of_vocabulary_lists_the_vocabulary(prompt):
    with pytest.raises(UserError) as err:
        parse_prompt(prompt)
    msg = str(err.value)
    assert "vocabulary" in msg and "torus" in msg and "purple" in msg and "\n" not in msg


# ---- the denoiser ----------------------------------------------------------------------------

def _brute_force_eps(prior: ShapesPrior, x_t, t, cond, views):
    """Every image built explicitly, posterior weights by a float64 softmax."""
    grid = prior.grid.cameras()
    marker = torch.tensor(MARKER_COLOUR, dtype=torch.float64)
    shades, markers, alphas = [], [], []
    for s in prior.shapes:
        sh, mk, al = shapes_render.cached_maps(s, prior.grid, prior.resolution, prior.cfg.supersample)
        shades.append(sh.double())
        markers.append(mk.double())
        alphas.append(al.double())
    out = []
    for i in range(x_t.shape[0]):
        bg = views.background[i].double()
        imgs, logp = [], []
        for o in cond[i].objects:
            s, c = divmod(o, len(prior.colours))
            albedo = torch.tensor(COLOURS[prior.colours[c]], dtype=torch.float64)
            for v in range(len(grid)):
                rgb = (albedo[:, None, None] * shades[s][v] + marker[:, None, None] * markers[s][v]
                       + bg[:, None, None] * (1 - alphas[s][v]))
                imgs.append(rgb * 2 - 1)
                cos = float(views.view_dirs[i].double() @ grid.view_dirs[v].double())
                logp.append(prior.cfg.camera_kappa * cos)
        X = torch.stack(imgs)
        abar = prior.alphas_cumprod[t[i]].double()
        a, s_ = abar.sqrt(), (1 - abar).sqrt()
        xt = x_t[i].double()
        logits = torch.tensor(logp, dtype=torch.float64) - ((xt - a * X) ** 2).sum((1, 2, 3)) / (2 * s_ ** 2)
        w = torch.softmax(logits, 0)
        x0 = (w[:, None, None, None] * X).sum(0)
        out.append((xt - a * x0) / s_)
    return torch.stack(out)


@pytest.mark.parametrize("t_value", [30, 300, 700, 980])
def test_denoiser_matches_brute_force(tiny_prior_cfg, t_value):
    prior = ShapesPrior(tiny_prior_cfg)
    embeds = prior.encode_prompt("a red cube", negative_prompt="")
    g = torch.Generator().manual_seed(t_value)
    views = Cameras.from_angles([15.0, 35.0, 15.0, 35.0], [10.0, 80.0, 10.0, 80.0], 2.5, 40.0,
                                torch.rand(4, 3, generator=g))
    cond = [embeds.cond, embeds.cond, embeds.uncond, embeds.uncond]
    # Inputs near a real image make the posterior sharp (the hard case for precision).
    t = torch.full((4,), t_value)
    abar = prior.alphas_cumprod[t_value]
    clean = prior.encode_images(torch.rand(4, 3, 16, 16, generator=g))
    x_t = abar.sqrt() * clean + (1 - abar).sqrt() * torch.randn(4, 3, 16, 16, generator=g)
    ours = prior.predict_noise(x_t, t, cond, views).double()
    ref = _brute_force_eps(prior, x_t, t, cond, views)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=2e-3 * max(1.0, 1 / (1 - abar).sqrt().item()))


def test_denoiser_recovers_the_noise_of_a_teacher_image(tiny_prior_cfg):
    prior = ShapesPrior(tiny_prior_cfg)
    embeds = prior.encode_prompt("a red cube")
    grid = prior.grid.cameras()
    view = 3
    cams = Cameras.from_angles(grid.elevation[view:view + 1], grid.azimuth[view:view + 1], 2.5, 40.0, (1.0, 1.0, 1.0))
    shade, _, alpha = shapes_render.cached_maps("cube", prior.grid, 16, 2)
    rgb = torch.tensor(COLOURS["red"])[:, None, None] * shade[view] + (1 - alpha[view])
    x0 = rgb[None] * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([100])
    abar = prior.alphas_cumprod[100]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = prior.predict_noise(x_t, t, [embeds.cond], cams)
    assert torch.allclose(pred, eps, atol=1e-3)


def test_cfg_branches_differ_and_negative_prompt_narrows_uncond(tiny_prior_cfg):
    prior = ShapesPrior(tiny_prior_cfg)
    e = prior.encode_prompt("a red cube", negative_prompt="blue")
    assert len(e.cond.objects) == 1
    assert len(e.uncond.objects) == 2  # blue cube, blue torus
    assert len(e.empty.objects) == 2 * len(COLOURS)
    cams = Cameras.from_angles([20.0, 20.0], [0.0, 0.0], 2.5, 40.0)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([500, 500])
    eps = prior.predict_noise(x, t, [e.cond, e.empty], cams)
    assert (eps[0] - eps[1]).abs().mean() > 1e-3


def test_camera_kernel_pins_the_view():
    # At t=999 the data barely matter: with a sharp kernel the posterior mean is the nearest view's
    # image; text-only, it is an average over all views.
    cfg = ShapesPriorConfig(resolution=16, elevations=[10.0, 40.0], azimuth_step=90.0, shapes=["cube"],
                            camera_kappa=1e4)
    prior = ShapesPrior(cfg)
    e = prior.encode_prompt("a red cube")
    cams = Cameras.from_angles([12.0], [91.0], 2.5, 40.0)
    x0 = prior.predict_x0(torch.zeros(1, 3, 16, 16), torch.tensor([999]), [e.cond], cams)
    shade, _, alpha = shapes_render.cached_maps("cube", prior.grid, 16, 2)
    view = 1  # elevation 10, azimuth 90
    rgb = torch.tensor(COLOURS["red"])[:, None, None] * shade[view] + (1 - alpha[view])
    assert torch.allclose(x0[0], rgb * 2 - 1, atol=1e-3)


def test_text_only_view_tags_restrict_the_text_branch():
    cfg = ShapesPriorConfig(resolution=16, elevations=[10.0], azimuth_step=90.0, shapes=["cube"], camera_kappa=0.0)
    prior = ShapesPrior(cfg)
    e = prior.encode_prompt("a red cube")
    assert set(e.by_view) == {"front", "side", "back", "overhead"}
    cams = Cameras.from_angles([10.0], [180.0], 2.5, 40.0)
    assert e.cond_for(cams)[0].view_tag == "back"
    x0 = prior.predict_x0(torch.zeros(1, 3, 16, 16), torch.tensor([999]), e.cond_for(cams), cams)
    shade, _, alpha = shapes_render.cached_maps("cube", prior.grid, 16, 2)
    rgb = torch.tensor(COLOURS["red"])[:, None, None] * shade[2] + (1 - alpha[2])  # azimuth 180 = back
    assert torch.allclose(x0[0], rgb * 2 - 1, atol=1e-3)


def test_renders_are_cached_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("THREEDGEN_CACHE", str(tmp_path))
    grid = shapes_render.ViewGrid(elevations=(20.0,), azimuth_step=120.0)
    a = shapes_render.cached_maps("capsule", grid, 16, 2)
    files = list((tmp_path / "shapes").glob("capsule-16-*.npz"))
    assert len(files) == 1
    b = shapes_render.cached_maps("capsule", grid, 16, 2)  # from disk
    fresh = shapes_render.sphere_trace("capsule", grid.cameras(), 16, 16, 2)
    for x, y, z in zip(a, b, fresh):
        assert torch.equal(x, y) and torch.equal(x, z)
    files[0].write_bytes(b"not an npz")  # a damaged cache file is rendered again
    c = shapes_render.cached_maps("capsule", grid, 16, 2)
    assert torch.equal(c[0], a[0])


def test_encode_images_maps_to_minus_one_one_and_resizes(tiny_prior_cfg):
    prior = ShapesPrior(tiny_prior_cfg)
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    x = prior.encode_images(rgb)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    x.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert torch.allclose(prior.encode_images(torch.full((1, 3, 16, 16), 0.25)), torch.tensor(-0.5))


def test_pyramid_trace_bound_is_conservative_with_the_same_surface():
    from threedgen.guidance.priors.shapes.sdf import pyramid, pyramid_bound

    pts = torch.rand(5000, 3, dtype=torch.float64) * 1.4 - 0.7
    exact, bound = pyramid(pts), pyramid_bound(pts)
    assert (bound <= exact + 1e-9).all()
    inside = exact < 0
    torch.testing.assert_close(bound[inside], exact[inside])
