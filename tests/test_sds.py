"""SDS: the gradient on a fixed input equals the formula, computed independently here."""

import pytest
import torch
from mock_prior import MockPrior

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.config import SDSConfig
from threedgen.guidance.sds import SDS


def _expected_grad(prior, images, cfg, seed, step=0, max_steps=100):
    """Replays the RNG draws (t, then eps) and applies eq. 3 of DreamFusion with diffusers' CFG."""
    x = images.permute(0, 3, 1, 2) * 2 - 1
    b = x.shape[0]
    torch.manual_seed(seed)
    lo, hi = int(1000 * cfg.min_step_percent), int(1000 * cfg.max_step_percent)
    t = torch.randint(lo, hi + 1, (b,))
    eps = torch.randn_like(x)
    abar = prior.alphas_cumprod[t].view(b, 1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps
    tt = t.view(-1, 1, 1, 1) / 1000
    e_y = 0.3 * x_t + 0.1 + tt
    e_u = -0.2 * x_t + 0.05 + tt
    cfg_eps = e_u + cfg.guidance_scale * (e_y - e_u)
    w = {"sds": 1 - abar, "uniform": torch.ones_like(abar), "fantasia3d": abar.sqrt() * (1 - abar)}[cfg.weighting]
    return w * (cfg_eps - eps), t


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
@pytest.mark.parametrize("scale", [1.0, 7.5, 100.0])
def test_sds_gradient_equals_formula(weighting, scale):
    prior = MockPrior()
    cfg = SDSConfig(guidance_scale=scale, weighting=weighting)
    sds = SDS(cfg, prior)
    images = torch.rand(2, 8, 8, 3).requires_grad_(True)
    cams = Cameras.from_angles([10.0, 20.0], [0.0, 90.0], 2.5, 40.0)
    torch.manual_seed(123)
    out = sds(images, prior.encode_prompt("p"), cams, step=0, max_steps=100)
    (grad_x,) = torch.autograd.grad(out.loss, images)
    g, t = _expected_grad(prior, images.detach(), cfg, 123)
    assert torch.equal(out.t, t)
    # d loss / d x = g / B, and x = 2 * rgb - 1, so d loss / d rgb = 2 g / B.
    expected = (2 * g / 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(grad_x, expected, rtol=1e-5, atol=1e-6)
    assert prior.calls == 1, "cond and uncond must be one batched call"
    torch.testing.assert_close(out.grad_norm, g.flatten(1).norm(dim=1).mean())


def test_grad_clip_clamps_elementwise():
    prior = MockPrior()
    cfg = SDSConfig(guidance_scale=100.0, grad_clip=0.01)
    images = torch.rand(1, 8, 8, 3).requires_grad_(True)
    cams = Cameras.from_angles([10.0], [0.0], 2.5, 40.0)
    torch.manual_seed(5)
    out = SDS(cfg, prior)(images, prior.encode_prompt("p"), cams, 0, 10)
    (grad_x,) = torch.autograd.grad(out.loss, images)
    g, _ = _expected_grad(prior, images.detach(), cfg, 5)
    torch.testing.assert_close(grad_x, (2 * g.clamp(-0.01, 0.01)).permute(0, 2, 3, 1))
    assert grad_x.abs().max() <= 0.02 + 1e-7


def test_timestep_range_and_annealing():
    prior = MockPrior()
    cfg = SDSConfig(min_step_percent=0.02, max_step_percent=[0, 0.98, 0.5, 100])
    sds = SDS(cfg, prior)
    assert sds.step_range(0, 100) == (20, 980)
    assert sds.step_range(50, 100) == (20, 740)
    assert sds.step_range(100, 100) == (20, 500)
    torch.manual_seed(0)
    ts = torch.cat([sds.sample_timesteps(64, 100, 100, "cpu") for _ in range(20)])
    assert ts.min() >= 20 and ts.max() <= 500


def test_full_timestep_range_stays_inside_the_schedule():
    sds = SDS(SDSConfig(min_step_percent=0.0, max_step_percent=1.0), MockPrior())
    assert sds.step_range(0, 10) == (0, 999)
    torch.manual_seed(0)
    assert sds.sample_timesteps(100_000, 0, 10, "cpu").max() == 999


def test_bad_settings_are_user_errors():
    # A config is checked once, with the run's (threedgen.config.merge), not again by SDS(...).
    with pytest.raises(UserError, match="weighting"):
        SDSConfig(weighting="log").check()
    with pytest.raises(UserError, match="max_step_percent"):
        SDSConfig(max_step_percent=1.5).check()
