"""Objects with a front (house, mug, head): parts and colours, renders, vocabulary, and the biased
text-only prior (front bias, soft view tags, Perp-Neg) against a brute-force denoiser."""

import math

import numpy as np
import pytest
import torch

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.evaluate import evaluate_representation
from threedgen.guidance.classifier_free import guided_noise, mix
from threedgen.guidance.priors.base import VIEW_TAGS
from threedgen.guidance.priors.config import ShapesPriorConfig
from threedgen.guidance.priors.shapes import render as shapes_render
from threedgen.guidance.priors.shapes.prior import ShapesCondition, ShapesPrior
from threedgen.guidance.priors.shapes.sdf import PARTS, SDFS, marker_share
from threedgen.guidance.priors.shapes.vocab import COLOURS, FRONT_MARKERS, FRONT_SHAPES, MARKER_COLOUR, parse_prompt
from threedgen.representations.base import RenderOutput, Representation

FRONTS = ("house", "mug", "head")


def test_the_world_has_three_objects_with_a_front():
    assert set(FRONT_SHAPES) == set(FRONTS) == set(PARTS) == set(FRONT_MARKERS)
    assert parse_prompt("a red house") == ("red", "house")
    assert parse_prompt("The blue cup") == ("blue", "mug")
    assert parse_prompt("a grey cottage") == ("gray", "house")
    assert parse_prompt("one pink head") == ("pink", "head")


def test_the_marker_colour_is_far_from_every_prompt_colour():
    marker = np.array(MARKER_COLOUR)
    distance = {name: np.linalg.norm(marker - np.array(rgb)) for name, rgb in COLOURS.items()}
    assert min(distance, key=distance.get) == "purple" and distance["purple"] > 0.38


@pytest.mark.parametrize("shape", FRONTS)
def test_marker_sits_on_the_front_and_the_back_differs(shape):
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(200_000, 3, generator=g, dtype=torch.float64) - 0.5
    d = SDFS[shape](pts)
    surface = pts[d.abs() < 0.01]
    on_marker = surface[marker_share(shape, surface) > 0]
    assert len(on_marker) > 50
    assert on_marker[:, 2].min() > 0.2  # the marker is on the +Z side only
    # Turned half a turn the object is a different object: the front is not the back.
    turned = pts * torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    inside, inside_turned = d < 0, SDFS[shape](turned) < 0
    assert (inside ^ inside_turned).double().mean() > 0.002
    # The parts are exact distances: |grad| = 1 almost everywhere near the surface.
    near = surface[:500].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(SDFS[shape](near).sum(), near)
    assert (grad.norm(dim=-1) - 1).abs().median() < 1e-6


@pytest.mark.parametrize("shape", FRONTS)
def test_marker_shows_from_the_front_and_not_from_the_back(shape):
    cams = Cameras.from_angles([15.0, 15.0], [0.0, 180.0], 2.5, 40.0)
    maps = shapes_render.sphere_trace(shape, cams, 32, 32, 2)
    front_px, back_px = maps.marker[0].sum().item(), maps.marker[1].sum().item()
    assert front_px > 3.0 and back_px == 0.0
    # Coverage is split, never double counted: body + marker shading <= coverage.
    assert torch.all(maps.shade + maps.marker <= maps.alpha + 1e-6)
    truth = ShapesPrior.truth(f"a green {shape}")
    rgb, alpha = truth.render(cams, 32, 32)
    magenta = (rgb[..., 0] > 0.3) & (rgb[..., 2] > 0.3) & (rgb[..., 1] < 0.1)
    assert magenta[0].sum() >= 3 and magenta[1].sum() == 0


@pytest.mark.parametrize("shape", FRONTS)
def test_truth_mesh_is_closed_and_matches_the_sdf(shape):
    truth = ShapesPrior.truth(f"a red {shape}")
    mesh = truth.mesh()
    assert mesh.is_watertight
    d = truth.sdf(torch.tensor(np.asarray(mesh.vertices)))
    assert d.abs().max() < 0.01
    assert truth.has_front and truth.marker_colour == MARKER_COLOUR
    colours = truth.albedo_at(torch.tensor(np.asarray(mesh.vertices)))
    is_marker = torch.isclose(colours, torch.tensor(MARKER_COLOUR, dtype=colours.dtype)).all(-1)
    assert 0.005 < is_marker.double().mean() < 0.3
    assert torch.isclose(colours[~is_marker], torch.tensor(COLOURS["red"], dtype=colours.dtype)).all()


def test_symmetric_shapes_have_no_marker():
    truth = ShapesPrior.truth("a red cube")
    assert not truth.has_front and truth.marker_colour is None
    maps = shapes_render.sphere_trace("cube", Cameras.from_angles([15.0], [0.0], 2.5, 40.0), 16, 16, 1)
    assert maps.marker.abs().sum() == 0


# ---- the biased text-only prior ----------------------------------------------------------------

def _small(**kw):
    base = dict(resolution=16, elevations=[10.0, 70.0], azimuth_step=45.0, shapes=["cube", "house"], camera_kappa=0.0)
    return ShapesPriorConfig(**{**base, **kw})


def _brute_force_x0(prior: ShapesPrior, x_t, t, cond: ShapesCondition, background):
    """Every image built explicitly; log weights = front bias + log sum_tag w L_tag(v) - ||x - aX||^2/2s^2."""
    grid = prior.grid.cameras()
    az = (grid.azimuth.double() + 180) % 360 - 180
    front = az.abs() <= 45
    fb = prior.cfg.front_bias
    bias = (torch.zeros(len(grid), dtype=torch.float64) if fb is None else
            torch.where(front, fb / front.sum(), (1 - fb) / (~front).sum()).log())
    leak = 1 - prior.cfg.view_tag_strength
    tags = prior.teacher_tags
    marker = torch.tensor(MARKER_COLOUR, dtype=torch.float64)[:, None, None]
    bg = background.double()[:, None, None]
    imgs, logp = [], []
    for o in cond.objects:
        s, c = divmod(o, len(prior.colours))
        maps = shapes_render.cached_maps(prior.shapes[s], prior.grid, prior.resolution, prior.cfg.supersample)
        albedo = torch.tensor(COLOURS[prior.colours[c]], dtype=torch.float64)[:, None, None]
        for v in range(len(grid)):
            rgb = albedo * maps.shade[v].double() + marker * maps.marker[v].double() + bg * (1 - maps.alpha[v].double())
            imgs.append(rgb * 2 - 1)
            tag_w = sum(w * (1.0 if tags[v] == tag else 0.0 if "overhead" in (tag, tags[v]) else leak)
                        for tag, w in cond.views) if cond.views else 1.0
            logp.append(float(bias[v]) + (math.log(tag_w) if tag_w > 0 else -math.inf))
    X = torch.stack(imgs)
    abar = prior.noise.alphas_cumprod[t].double()
    a, s_ = abar.sqrt(), (1 - abar).sqrt()
    logits = torch.tensor(logp, dtype=torch.float64) - ((x_t.double() - a * X) ** 2).sum((1, 2, 3)) / (2 * s_ ** 2)
    w = torch.softmax(logits, 0)
    return (w[:, None, None, None] * X).sum(0)


@pytest.mark.parametrize("t_value", [50, 600, 999])
def test_biased_soft_tagged_denoiser_matches_brute_force(t_value):
    prior = ShapesPrior(_small(front_bias=0.8, view_tag_strength=0.6))
    e = prior.encode_prompt("a green house", negative_prompt="")
    back, side = e.by_view["back"], e.by_view["side"]
    conds = [back, mix(side, back, 0.3), e.cond, e.by_view["overhead"]]
    g = torch.Generator().manual_seed(t_value)
    cams = Cameras.from_angles([10.0, 10.0, 10.0, 70.0], [180.0, 120.0, 30.0, 200.0], 2.5, 40.0,
                               torch.rand(4, 3, generator=g))
    abar = prior.noise.alphas_cumprod[t_value]
    x_t = abar.sqrt() * (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1) + (1 - abar).sqrt() * torch.randn(
        4, 3, 16, 16, generator=g)
    ours = prior.predict_x0(x_t, torch.full((4,), t_value), conds, cams).double()
    for i, cond in enumerate(conds):
        ref = _brute_force_x0(prior, x_t[i], t_value, cond, cams.background[i])
        np.testing.assert_allclose(ours[i].numpy(), ref.numpy(), atol=2e-4)


def test_front_bias_sets_the_share_of_front_views_in_the_teacher():
    # At t = 999 the data barely count: the posterior over views is the prior over views. A
    # solid-colour house over a white background: the mean marker coverage tells the front share.
    prev = 0.0
    for bias in (None, 0.5, 0.9):
        prior = ShapesPrior(_small(front_bias=bias, shapes=["house"], elevations=[10.0], view_dependent_prompting=False))
        e = prior.encode_prompt("a white house")
        logits = prior.view_bias
        w = torch.softmax(logits, 0)
        expected = 3 / 8 if bias is None else bias  # azimuths 0, 45, 315 of 8 are |az| <= 45
        az = (prior.grid.cameras().azimuth.double() + 180) % 360 - 180
        assert float(w[az.abs() <= 45].sum()) == pytest.approx(expected, abs=1e-9)
        x0 = prior.predict_x0(torch.zeros(1, 3, 16, 16), torch.tensor([999]), [e.cond],
                              Cameras.from_angles([10.0], [180.0], 2.5, 40.0, (1.0, 1.0, 1.0)))
        maps = shapes_render.cached_maps("house", prior.grid, 16, 2)
        marker_mean = (w[:, None, None].float() * maps.marker).sum(0)
        # x0 = 2 (white * shade + magenta * marker + (1 - alpha)) - 1: its green channel carries
        # 0.05 marker, its red 0.90; red - green isolates the marker term.
        got = (x0[0, 0] - x0[0, 1]) / 2
        # (the data still weigh a little at t = 999: a_t^2 = 0.005)
        assert float(got.sum()) == pytest.approx(float(0.85 * marker_mean.sum()), rel=0.1)
        if bias == 0.9:
            assert got.sum() > 1.6 * prev  # 0.9 / 0.5 of the marker
        prev = float(got.sum())


def test_view_tags_restrict_hard_by_default_and_softly_below_strength_one():
    # Views: elevation 10 (front/side/back by azimuth) and 70 (overhead), 8 azimuths each.
    hard = ShapesPrior(_small(shapes=["house"]))
    soft = ShapesPrior(_small(shapes=["house"], view_tag_strength=0.5))
    ids = torch.arange(16)
    back = (("back", 1.0),)
    assert torch.isinf(hard.log_tag_weights(back, ids)).sum() == 15  # only (10, 180) is "back"
    w = soft.log_tag_weights(back, ids).exp()
    assert sorted(w[:8].tolist()) == [0.5] * 7 + [1.0]  # the azimuth tags leak into each other...
    assert w[8:].tolist() == [0.0] * 8  # ...but never across the overhead line
    w = soft.log_tag_weights((("overhead", 1.0),), ids).exp()
    assert w.tolist() == [0.0] * 8 + [1.0] * 8


def test_mix_interpolates_view_tags_like_text_embeddings():
    a = ShapesCondition((3,), (("front", 1.0),))
    b = ShapesCondition((3,), (("side", 1.0),))
    m = mix(a, b, 0.25)
    assert dict(m.views) == {"front": 0.25, "side": 0.75} and m.objects == (3,)
    assert mix(a, b, 1.0).views == (("front", 1.0),) and mix(a, b, 1.0).view_tag == "front"
    assert m.view_tag is None
    with pytest.raises(ValueError):
        a.mix(ShapesCondition((4,), (("side", 1.0),)), 0.5)
    torch.testing.assert_close(mix(torch.ones(2), torch.zeros(2), 0.25), torch.full((2,), 0.25))


def test_perp_neg_runs_on_the_text_only_shapes_prior():
    prior = ShapesPrior(_small(front_bias=0.8, view_tag_strength=0.5, perp_neg=True))
    e = prior.encode_prompt("a green house")
    assert e.perp_neg and set(e.by_view) == set(VIEW_TAGS)
    cams = Cameras.from_angles([10.0, 10.0, 10.0], [0.0, 100.0, 180.0], 2.5, 40.0, (1.0, 1.0, 1.0))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 400)
    out = guided_noise(prior, x, t, e, cams, 7.5)
    plain = guided_noise(prior, x, t, ShapesPrior(_small(front_bias=0.8, view_tag_strength=0.5)).encode_prompt(
        "a green house"), cams, 7.5)
    assert torch.isfinite(out.eps).all() and out.eps.shape == x.shape
    # At the back, the front is a negative: Perp-Neg changes the guided noise there.
    assert (out.eps[2] - plain.eps[2]).abs().mean() > 1e-3


def test_prompts_cannot_ask_for_the_marker_colour():
    with pytest.raises(UserError, match="reserved for the front markers"):
        parse_prompt("a magenta house")


class _TruthField(Representation):
    """A truth-perfect result: renders the true object (sphere traced) for any camera."""

    def __init__(self, truth):
        super().__init__()
        self.truth = truth

    def render(self, cameras, height, width):
        rgb, alpha = self.truth.render(cameras, height, width)
        return RenderOutput(rgb, alpha[..., None], torch.zeros_like(alpha[..., None]))


@pytest.mark.parametrize("shape", FRONTS)
def test_eval_scores_a_truth_perfect_field_at_least_0_99(shape):
    truth = ShapesPrior.truth(f"a blue {shape}")
    m = evaluate_representation(_TruthField(truth), truth, 2.5, 40.0, mesh=truth.mesh(), size=32)
    assert m["mask_iou"] >= 0.99 and m["mask_iou_unaligned"] >= 0.99
    assert m["best_yaw_degrees"] == 0.0 and m["chamfer"] < 0.005
    assert m["janus_view_rate"] == 0.0 and m["view_mi"] == pytest.approx(m["view_mi_truth"], abs=1e-6)
    assert m["front_markers"] is None  # this field has no opacity grid: the marker count needs one
