"""Classifier-free guidance in one convention for every method, with Perp-Neg as an option.

Plain CFG (diffusers' convention, one batched prior call of 2B items):

    eps = e_u + s * (e_y - e_u)

Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm", eq. 8; the
view-interpolation scheme of threestudio's prompt processor): for a camera at azimuth ``az`` the
positive conditioning interpolates the view prompts (front<->side for |az| < 90, side<->back
beyond), two other view prompts act as negatives, and only their components perpendicular to
the positive direction are removed:

    d_pos = e_pos - e_u
    eps   = e_u + s * (d_pos + sum_i w_i * perp(e_neg_i - e_u, d_pos))
    perp(a, b) = a - (<a, b> / max(<b, b>, 1e-6)) * b          (per sample)

with weights ``w_i = k * (a * exp(-b * r) + c)`` of the interpolation ratio ``r`` (the constants
below) and ``k = guidance.perp_neg_scale`` (threestudio: -1, the default; ScaleDreamer's SD
config: -0.5, ASD's default). Overhead views use the overhead prompt and no negatives. One
batched call of 4B items. Plain CFG's positive is the view tag's prompt, or with
``view_interpolation`` (ISM/TSM, BSD) the same interpolated prompt as Perp-Neg's.

Scale convention: threestudio's SDS without Perp-Neg writes ``e_y + s (e_y - e_u)`` (its scale s
is s + 1 here), but its Perp-Neg branch already writes ``e_u + s (...)``: under Perp-Neg the
scales are the same number in both projects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.priors.base import PromptEmbeds, azimuth_mix, can_mix, mix  # noqa: F401 (mix: re-exported)

# a * exp(-b * r) + c, named by the views they weigh (f_fs(1) = 0: no front negative at full front).
PERP_NEG_FS = (4.0, 0.5, -2.426)
PERP_NEG_SF = (4.0, 0.5, -2.426)
PERP_NEG_SB = (1.0, 0.5, -0.606)
PERP_NEG_FSB = (1.0, 0.5, 0.967)


def _decay(params: tuple[float, float, float], r: float) -> float:
    a, b, c = params
    return a * math.exp(-b * r) + c


@dataclass
class PerpNegConditions:
    positive: list  # one conditioning per camera
    negatives: list  # two per camera, camera-major: [cam0 neg0, cam0 neg1, cam1 neg0, ...]
    weights: torch.Tensor  # [B, 2]


def perp_neg_conditions(embeds: PromptEmbeds, cameras: Cameras) -> PerpNegConditions:
    """Interpolated positive, two negatives and their weights for each camera."""
    views = embeds.by_view
    missing = [v for v in ("front", "side", "back", "overhead") if v not in views]
    if missing or not can_mix(embeds.cond):
        raise UserError("Perp-Neg needs view-dependent conditionings (a diffusers prior, or the shapes prior in "
                        "text-only mode, with view_dependent_prompting on)")
    front, side = views["front"], views["side"]
    scale = embeds.perp_neg_scale
    positive, negatives, weights = embeds.interpolated_for(cameras), [], []
    for tag, az in zip(embeds.tags_for(cameras), cameras.azimuth.tolist()):
        first, _, r = azimuth_mix(az)
        if tag == "overhead":
            negatives += [embeds.uncond, embeds.uncond]
            weights.append((0.0, 0.0))
        elif first == "front":  # r = 1 at full front, 0 at full side
            negatives += [front, side]
            weights.append((scale * _decay(PERP_NEG_FS, r), scale * _decay(PERP_NEG_SF, 1 - r)))
        else:  # r = 1 at full side, 0 at full back
            negatives += [side, front]
            weights.append((scale * _decay(PERP_NEG_SB, r), scale * _decay(PERP_NEG_FSB, r)))
    return PerpNegConditions(positive, negatives, torch.tensor(weights, dtype=torch.float32))


def perpendicular_component(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The part of ``a`` perpendicular to ``b``, per sample (``[B,...]``)."""
    dims = tuple(range(1, a.dim()))
    coef = (a * b).sum(dims, keepdim=True) / (b * b).sum(dims, keepdim=True).clamp(min=1e-6)
    return a - coef * b


@dataclass
class GuidedNoise:
    eps: torch.Tensor  # the guided prediction
    cond: torch.Tensor  # e_y (e_pos under Perp-Neg)
    uncond: torch.Tensor  # e_u
    ride_along: Optional[torch.Tensor] = None  # predictions for the RideAlong items, in their order


@dataclass
class RideAlong:
    """More prior evaluations to ride in the same batched call (e.g. ASD's e_y at t + dt)."""

    x_t: torch.Tensor
    t: torch.Tensor
    cond: list
    views: Cameras


def guided_noise(prior, x_t: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras,
                 scale: float, ride_along: Optional[RideAlong] = None,
                 view_interpolation: bool = False) -> GuidedNoise:
    """CFG (or Perp-Neg when ``embeds.perp_neg``) for a batch, in one batched prior call, plus
    the ``ride_along`` items in the same call. ``view_interpolation``: plain CFG's positive is the
    azimuth-interpolated view prompt (``PromptEmbeds.interpolated_for``; Perp-Neg's always is)."""
    b = x_t.shape[0]
    if not embeds.perp_neg:
        xs, ts = [x_t, x_t], [t, t]
        positive = embeds.interpolated_for(cameras) if view_interpolation else embeds.cond_for(cameras)
        conds = positive + embeds.uncond_for(cameras)
        views = cameras.cat(cameras)
    else:
        pn = perp_neg_conditions(embeds, cameras)
        neg_index = torch.arange(b, device=x_t.device).repeat_interleave(2)
        xs, ts = [x_t, x_t, x_t[neg_index]], [t, t, t[neg_index]]
        conds = pn.positive + embeds.uncond_for(cameras) + pn.negatives
        views = cameras.cat(cameras).cat(cameras.repeat_interleave(2))
    n_main = sum(x.shape[0] for x in xs)
    if ride_along is not None:
        xs, ts = xs + [ride_along.x_t], ts + [ride_along.t]
        conds, views = conds + list(ride_along.cond), views.cat(ride_along.views)
    pred = prior.predict_noise(torch.cat(xs), torch.cat(ts), conds, views)
    rest = pred[n_main:] if ride_along is not None else None
    pred = pred[:n_main]
    if not embeds.perp_neg:
        e_y, e_u = pred.chunk(2)
        return GuidedNoise(e_u + scale * (e_y - e_u), e_y, e_u, rest)
    e_pos, e_u, e_neg = pred[:b], pred[b:2 * b], pred[2 * b:].view(b, 2, *pred.shape[1:])
    d_pos = e_pos - e_u
    w = pn.weights.to(pred)
    shape = (b,) + (1,) * (pred.dim() - 1)
    accum = sum(w[:, i].view(shape) * perpendicular_component(e_neg[:, i] - e_u, d_pos) for i in range(2))
    return GuidedNoise(e_u + scale * (d_pos + accum), e_pos, e_u, rest)
