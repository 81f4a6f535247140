"""Perp-Neg: the guided eps equals the published combination, computed independently here on a
prior whose predictions are a known function of the text embedding."""

import math

import pytest
import torch

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.classifier_free import guided_noise
from threedgen.guidance.priors.base import Prior, PromptEmbeds, sd_alphas_cumprod
from threedgen.noise import NoiseSchedule


class LinearTextPrior(Prior):
    """eps(x, t, c) = x * mean(c) + c.sum(0)[:C] broadcast: linear in the embedding, so embedding
    interpolation shows in the output."""

    def __init__(self):
        super().__init__()
        self.noise = NoiseSchedule(sd_alphas_cumprod())
        self.batches = []

    def predict_noise(self, x_t, t, cond, views=None):
        self.batches.append(x_t.shape[0])
        out = []
        for x, c in zip(x_t, cond):
            out.append(x * c.mean() + c.sum(0)[: x.shape[0]].view(-1, 1, 1))
        return torch.stack(out)


def _embeds(perp_neg=True):
    g = torch.Generator().manual_seed(0)
    e = {k: torch.randn(2, 3, generator=g) for k in ("cond", "uncond", "empty", "front", "side", "back", "overhead")}
    return PromptEmbeds("p", "", e["cond"], e["uncond"], e["empty"],
                        by_view={k: e[k] for k in ("front", "side", "back", "overhead")}, perp_neg=perp_neg)


def _f(a, b, c, r):
    return a * math.exp(-b * r) + c


def _expected(prior, x, embeds, elevation, azimuth, scale):
    """Armandpour et al.'s eq. 8 with threestudio's view interpolation, one camera at a time."""
    v = embeds.by_view
    e = lambda emb: prior.predict_noise(x[None], torch.zeros(1, dtype=torch.long), [emb])[0]  # noqa: E731
    e_u = e(embeds.uncond)
    if elevation > 60:
        return e_u + scale * (e(v["overhead"]) - e_u)
    az = (azimuth + 180) % 360 - 180
    if abs(az) < 90:
        r = 1 - abs(az) / 90
        pos, negs = r * v["front"] + (1 - r) * v["side"], [v["front"], v["side"]]
        w = [-_f(4, 0.5, -2.426, r), -_f(4, 0.5, -2.426, 1 - r)]
    else:
        r = 2 - abs(az) / 90
        pos, negs = r * v["side"] + (1 - r) * v["back"], [v["side"], v["front"]]
        w = [-_f(1, 0.5, -0.606, r), -_f(1, 0.5, 0.967, r)]
    d_pos = e(pos) - e_u
    total = d_pos.clone()
    for wi, neg in zip(w, negs):
        d = e(neg) - e_u
        total += wi * (d - (d * d_pos).sum() / (d_pos * d_pos).sum() * d_pos)
    return e_u + scale * total


def test_perp_neg_matches_the_formula_in_one_batched_call():
    prior = LinearTextPrior()
    embeds = _embeds()
    elevation = [10.0, 10.0, 20.0, 0.0, 70.0]
    azimuth = [0.0, 30.0, 120.0, -150.0, 45.0]
    cams = Cameras.from_angles(elevation, azimuth, 2.0, 40.0)
    torch.manual_seed(1)
    x = torch.randn(5, 3, 4, 4)
    t = torch.full((5,), 10, dtype=torch.long)
    out = guided_noise(prior, x, t, embeds, cams, 7.5)
    assert prior.batches == [20]  # positive, uncond and two negatives per view, one call
    for i in range(5):
        expected = _expected(prior, x[i], embeds, elevation[i], azimuth[i], 7.5)
        torch.testing.assert_close(out.eps[i], expected, rtol=1e-5, atol=1e-5)


def test_at_full_front_the_front_negative_has_no_weight():
    # f_fs(1) = 4 exp(-0.5) - 2.426 = 0: a camera looking straight at the front removes nothing
    # along the front prompt, and the side negative keeps the weight -(4 - 2.426)
    assert abs(_f(4, 0.5, -2.426, 1.0)) < 1e-3
    from threedgen.guidance.classifier_free import perp_neg_conditions

    pn = perp_neg_conditions(_embeds(), Cameras.from_angles(0.0, 0.0, 2.0, 40.0))
    assert pn.weights[0, 0].abs() < 1e-3 and pn.weights[0, 1] == pytest.approx(-(4 - 2.426), abs=1e-5)


def test_plain_cfg_when_perp_neg_is_off():
    prior = LinearTextPrior()
    embeds = _embeds(perp_neg=False)
    cams = Cameras.from_angles([0.0, 0.0], [0.0, 180.0], 2.0, 40.0)
    x = torch.randn(2, 3, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    out = guided_noise(prior, x, t, embeds, cams, 5.0)
    assert prior.batches == [4]
    for i, view in enumerate(["front", "back"]):
        e_y = prior.predict_noise(x[i:i + 1], t[:1], [embeds.by_view[view]])[0]
        e_u = prior.predict_noise(x[i:i + 1], t[:1], [embeds.uncond])[0]
        torch.testing.assert_close(out.eps[i], e_u + 5.0 * (e_y - e_u))


def test_perp_neg_needs_view_embeddings():
    embeds = PromptEmbeds("p", "", "cond", "uncond", "empty", perp_neg=True)
    with pytest.raises(UserError, match="Perp-Neg needs view-dependent conditionings"):
        guided_noise(LinearTextPrior(), torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), embeds,
                     Cameras.from_angles(0.0, 0.0, 2.0, 40.0), 7.5)
