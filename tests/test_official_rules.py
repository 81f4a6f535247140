"""Where the official code's update rules differ in small ways from a textbook reading, the methods
follow the official code (issue 20, item 5); each rule is checked numerically here:
ISM/TSM/BSD's timesteps with the DDIM ``steps_offset`` 1 and their batch flip, the offset noise
drawn once per batch, VSD/ESD's camera dropout drawn once per batch, ASD's shifted branch under
Perp-Neg, Perp-Neg's negative scale, and ISM/TSM's azimuth-interpolated view prompts."""

import math

import pytest
import torch
from mock_prior import MockPrior

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance import GUIDANCE
from threedgen.guidance.base import sample_noise
from threedgen.guidance.classifier_free import perp_neg_conditions
from threedgen.guidance.priors.base import Prior, PromptEmbeds, sd_alphas_cumprod
from threedgen.noise import NoiseSchedule


class RecordingPrior(MockPrior):
    """The mock prior, recording every call's inputs."""

    def __init__(self):
        super().__init__()
        self.log = []

    def predict_noise(self, x_t, t, cond, views=None):
        self.log.append((x_t.clone(), t.clone(), list(cond)))
        return super().predict_noise(x_t, t, cond, views)


class TextPrior(Prior):
    """eps = x * mean(c) + c.sum(0)[:C]: tensor conditionings, so interpolated embeddings show."""

    def __init__(self):
        super().__init__()
        self.noise = NoiseSchedule(sd_alphas_cumprod())
        self.log = []

    def encode_images(self, rgb):
        return rgb * 2 - 1

    def predict_noise(self, x_t, t, cond, views=None):
        self.log.append((x_t.clone(), t.clone(), list(cond)))
        return torch.stack([x * c.mean() + c.sum(0)[: x.shape[0]].view(-1, 1, 1) for x, c in zip(x_t, cond)])


def _embeds(perp_neg=False):
    g = torch.Generator().manual_seed(0)
    e = {k: torch.randn(2, 3, generator=g) for k in ("cond", "uncond", "empty", "front", "side", "back", "overhead")}
    return PromptEmbeds("p", "", e["cond"], e["uncond"], e["empty"],
                        by_view={k: e[k] for k in ("front", "side", "back", "overhead")}, perp_neg=perp_neg)


def _images(b=2, seed=0):
    torch.manual_seed(seed)
    return torch.rand(b, 8, 8, 3).requires_grad_(True)


def _method(name, prior, **kw):
    return GUIDANCE[name].cls(GUIDANCE[name].config(**kw), prior)


# ---- ISM / TSM / BSD: timesteps with steps_offset 1 ---------------------------------------------

@pytest.mark.parametrize("name", ["tsm", "ism", "bsd"])
def test_timesteps_are_the_official_ddim_indices_plus_one(name):
    """The official code draws an index i ~ U{lo..hi-1} (torch.randint's open end) and uses the
    DDIM scheduler's timestep i + 1; with lo = 20, hi = 25: t in {21..25}, every value reached."""
    method = _method(name, MockPrior(), min_step_percent=0.02, max_step_percent=0.025)
    assert method.cfg.steps_offset == 1
    torch.manual_seed(0)
    seen = {int(method.sample_shared_timestep(3, 0, 10, "cpu", method.cfg.steps_offset)[0]) for _ in range(300)}
    assert seen == set(range(21, 26))
    plain = _method(name, MockPrior(), min_step_percent=0.02, max_step_percent=0.025, steps_offset=0)
    seen = {int(plain.sample_shared_timestep(3, 0, 10, "cpu", 0)[0]) for _ in range(300)}
    assert seen == set(range(20, 26))


@pytest.mark.parametrize("name", ["tsm", "ism", "bsd"])
def test_the_first_timestep_drawn_is_offset(name):
    prior = RecordingPrior()
    method = _method(name, prior, flip_prob=0.0, min_step_percent=0.3, max_step_percent=0.3)
    out = method(_images(), prior.encode_prompt("p"), Cameras.from_angles([0.0, 0.0], [0.0, 90.0], 2.5, 40.0), 0, 10)
    assert out.t.tolist() == [301, 301]


def test_tsm_noises_x0_at_t_one_and_inverts_from_there():
    """x~_0 = a_1 x + s_1 eps (the scheduler's first timestep is 1); with an interval that reaches
    below 1, s = 1: no inversion step, and e_0 is evaluated on x~_0 itself at t = 1."""
    prior = RecordingPrior()
    method = _method("ism", prior, flip_prob=0.0, interval=500, min_step_percent=0.3, max_step_percent=0.3)
    images = _images()
    torch.manual_seed(5)
    out = method(images, prior.encode_prompt("p"), Cameras.from_angles([0.0, 0.0], [0.0, 90.0], 2.5, 40.0), 0, 10)
    assert out.extras["inversion_calls"] == 1.0  # e_0(x~_s, s) alone
    torch.manual_seed(5)
    x = (images.detach() * 2 - 1).permute(0, 3, 1, 2)
    torch.randint(301, 302, (1,))  # t (the range is one value)
    eps = torch.randn_like(x) + 0.1 * torch.randn(1, 3, 1, 1)
    abar1 = prior.alphas_cumprod[1]
    x_t, t, cond = prior.log[0]
    assert t.tolist() == [1, 1] and cond == ["empty", "empty"]
    torch.testing.assert_close(x_t, abar1.sqrt() * x + (1 - abar1).sqrt() * eps)
    # with the default interval the inversion starts at 1 and strides 200: 1, 201, ..., s
    prior = RecordingPrior()
    method = _method("ism", prior, flip_prob=0.0, min_step_percent=0.5, max_step_percent=0.5)
    method(_images(), prior.encode_prompt("p"), Cameras.from_angles([0.0, 0.0], [0.0, 90.0], 2.5, 40.0), 0, 10)
    # t = 501, dT = 100 at step 0: s = 401
    assert [int(t[0]) for _, t, _ in prior.log] == [1, 201, 401, 501]


# ---- the random horizontal flip ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tsm", "bsd"])
def test_a_flipped_batch_gets_the_mirrored_gradient(name):
    """flip_prob 1 on images I gives the mirror image of the gradient that an unflipped step on the
    mirrored images gives (the same draws: the coin is drawn in both)."""
    cams = Cameras.from_angles([0.0, 10.0], [20.0, 150.0], 2.5, 40.0)
    grads, flags = [], []
    for p, flip_input in ((1.0, False), (1e-12, True)):
        images = _images()
        render = images.flip(2) if flip_input else images
        prior = MockPrior()
        torch.manual_seed(11)
        out = _method(name, prior, flip_prob=p)(render, prior.encode_prompt("p"), cams, 3, 10)
        grads.append(torch.autograd.grad(out.loss, images)[0])
        flags.append(out.extras["flipped"])
    assert flags == [1.0, 0.0]
    torch.testing.assert_close(grads[0], grads[1])
    assert not torch.allclose(grads[0], grads[0].flip(2))  # the check has teeth


def test_the_flip_is_one_coin_per_batch_at_flip_prob():
    method = _method("bsd", MockPrior())
    images = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).view(2, 2, 3, 3)
    torch.manual_seed(0)
    results = [method.maybe_flip(images) for _ in range(2000)]
    rate = sum(f for _, f in results) / len(results)
    assert abs(rate - 0.5) < 0.05
    for out, flipped in results[:20]:
        assert torch.equal(out, images.flip(2) if flipped else images)  # both views, or neither


def test_no_flip_for_a_camera_conditioned_prior():
    from threedgen.guidance.priors.config import ShapesPriorConfig
    from threedgen.guidance.priors.shapes.prior import ShapesPrior

    small = dict(resolution=16, elevations=[10.0], azimuth_step=90.0, shapes=["cube"])
    assert ShapesPrior(ShapesPriorConfig(**small, camera_kappa=1000.0)).camera_conditioned
    assert not ShapesPrior(ShapesPriorConfig(**small, camera_kappa=0.0)).camera_conditioned
    assert not MockPrior().camera_conditioned
    class CameraMock(MockPrior):
        camera_conditioned = True  # as the learned prior with prior.camera

    method = _method("tsm", CameraMock(), flip_prob=1.0)
    images = _images()
    torch.manual_seed(0)
    assert method.maybe_flip(images) == (images, False)
    assert _method("tsm", MockPrior(), flip_prob=1.0).maybe_flip(images)[1]  # the same coin flips a text-only prior


# ---- offset noise ---------------------------------------------------------------------------------

def test_offset_noise_is_one_constant_per_channel_for_the_batch():
    x = torch.zeros(4, 3, 5, 5)
    torch.manual_seed(2)
    eps = sample_noise(x, 0.1)
    torch.manual_seed(2)
    offset = eps - torch.randn_like(x)
    assert torch.allclose(offset, offset[:1, :, :1, :1].expand_as(offset), atol=1e-6)  # same for every view and pixel
    assert offset[0, :, 0, 0].abs().min() > 0 and not torch.allclose(offset[0, 0], offset[0, 1])  # per channel
    torch.manual_seed(2)
    torch.randn_like(x)
    torch.testing.assert_close(offset[:1, :, :1, :1], 0.1 * torch.randn(1, 3, 1, 1))


# ---- VSD / ESD: camera dropout once per batch --------------------------------------------------

@pytest.mark.parametrize("name", ["vsd", "esd"])
def test_camera_dropout_keeps_all_or_none_of_a_batch(name):
    prior = MockPrior()
    method = _method(name, prior, camera_dropout=0.5)
    seen = []
    original = method.fake_score.training_loss

    def spy(x, t, eps, cond, camera, teacher):
        seen.append((camera.abs().sum(1) > 0).tolist())
        return original(x, t, eps, cond, camera, teacher)

    method.fake_score.training_loss = spy
    cams = Cameras.from_angles([0.0, 10.0, 20.0, 30.0], [0.0, 90.0, 180.0, 270.0], 2.5, 40.0)
    for seed in range(40):
        torch.manual_seed(seed)
        method(_images(4, seed), prior.encode_prompt("p"), cams, 0, 10)
    assert all(all(row) or not any(row) for row in seen)
    assert any(all(row) for row in seen) and any(not any(row) for row in seen)


# ---- ASD under Perp-Neg, and Perp-Neg's negative scale -------------------------------------------

def test_asd_shifted_branch_uses_the_interpolated_positive_under_perp_neg():
    prior = TextPrior()
    embeds = _embeds(perp_neg=True)
    cams = Cameras.from_angles([10.0, 0.0], [30.0, -120.0], 2.5, 40.0)
    torch.manual_seed(0)
    _method("asd", prior)(_images(), embeds, cams, 0, 10)
    (_, _, cond), = prior.log  # one batched call: pos, uncond, 2 negatives per view, then e_y at t2
    v = embeds.by_view
    expected = [(2 / 3) * v["front"] + (1 / 3) * v["side"],  # az 30: r = 1 - 30/90
                (2 / 3) * v["side"] + (1 / 3) * v["back"]]  # az -120: r = 2 - 120/90
    assert len(cond) == 5 * 2
    for got, want in zip(cond[-2:], expected):
        torch.testing.assert_close(got, want)
    for got, want in zip(cond[:2], expected):  # the same as CFG's positive
        torch.testing.assert_close(got, want)
    # without Perp-Neg the shifted branch takes the view tag's prompt, as CFG's positive
    prior, plain = TextPrior(), _embeds(perp_neg=False)
    torch.manual_seed(0)
    _method("asd", prior)(_images(), plain, cams, 0, 10)
    (_, _, cond), = prior.log
    assert cond[-2] is plain.by_view["front"] and cond[-1] is plain.by_view["side"]  # az 30 (< 45), az -120


def test_perp_neg_scale_scales_the_negative_weights():
    """w_i = k (a exp(-b r) + c): k = -1 is threestudio's, -0.5 ScaleDreamer's SD config."""
    cams = Cameras.from_angles([0.0, 0.0, 0.0, 70.0], [20.0, 60.0, 150.0, 0.0], 2.5, 40.0)
    base = perp_neg_conditions(_embeds(True), cams).weights
    half = _embeds(True)
    half.perp_neg_scale = -0.5
    torch.testing.assert_close(perp_neg_conditions(half, cams).weights, 0.5 * base)
    r = 1 - 20 / 90
    assert base[0].tolist() == pytest.approx([-(4 * math.exp(-0.5 * r) - 2.426), -(4 * math.exp(-0.5 * (1 - r)) - 2.426)])
    assert base[3].tolist() == [0.0, 0.0]  # overhead: no negatives


@pytest.mark.parametrize("name, scale", [("asd", -0.5), ("sds", -1.0), ("tsm", -1.0)])
def test_each_method_applies_its_perp_neg_scale(name, scale):
    assert GUIDANCE[name].config().perp_neg_scale == scale
    method = _method(name, TextPrior(), perp_neg_scale=-0.25)
    seen = []
    method.forward = lambda images, embeds, *rest: seen.append(embeds.perp_neg_scale)
    embeds = _embeds(perp_neg=True)
    method(_images(), embeds, Cameras.from_angles([0.0, 0.0], [0.0, 90.0], 2.5, 40.0), 0, 10)
    assert seen == [-0.25] and embeds.perp_neg_scale == -1.0  # the run's embeds are not changed


def test_perp_neg_scale_is_checked():
    with pytest.raises(UserError, match="guidance.perp_neg_scale must be a number from -10 to 0"):
        GUIDANCE["sds"].config(perp_neg_scale=0.5).check()
    with pytest.raises(UserError, match="guidance.flip_prob"):
        GUIDANCE["ism"].config(flip_prob=1.5).check()
    with pytest.raises(UserError, match="guidance.steps_offset must be an integer"):
        GUIDANCE["bsd"].config(steps_offset=0.5).check()


# ---- ISM / TSM / BSD: the view prompts interpolated by azimuth -----------------------------------

@pytest.mark.parametrize("name", ["ism", "tsm", "bsd"])
def test_cfg_prompt_interpolates_the_view_prompts_by_azimuth(name):
    """LucidDreamer's train.py: |az| < 90: r front + (1 - r) side, r = 1 - |az|/90; beyond:
    r side + (1 - r) back, r = 2 - |az|/90; overhead cameras keep the overhead prompt."""
    embeds = _embeds()
    v = embeds.by_view
    cams = Cameras.from_angles([10.0, 0.0, 20.0, 75.0], [30.0, -60.0, 135.0, 10.0], 2.5, 40.0)
    expected = [(2 / 3) * v["front"] + (1 / 3) * v["side"], (1 / 3) * v["front"] + (2 / 3) * v["side"],
                0.5 * v["side"] + 0.5 * v["back"], v["overhead"]]
    prior = TextPrior()
    torch.manual_seed(0)
    _method(name, prior, flip_prob=0.0)(_images(4), embeds, cams, 0, 10)
    _, _, cond = prior.log[-1]  # the CFG call: positives first, then the uncond
    for got, want in zip(cond[:4], expected):
        torch.testing.assert_close(got, want)
    assert all(c is embeds.uncond for c in cond[4:8])
    prior = TextPrior()
    torch.manual_seed(0)
    _method(name, prior, flip_prob=0.0, view_interpolation=False)(_images(4), embeds, cams, 0, 10)
    _, _, cond = prior.log[-1]
    assert [next(k for k, e in v.items() if e is c) for c in cond[:4]] == ["front", "side", "side", "overhead"]


def test_interpolation_falls_back_to_the_prompt_without_view_prompts():
    cams = Cameras.from_angles([0.0], [30.0], 2.5, 40.0)
    assert MockPrior().encode_prompt("p").interpolated_for(cams) == ["cond"]
