"""A Janus check that needs no ground truth: ask the prior which view each render of the result is.

On a real prompt nobody knows where the object's front belongs, but the prior that shaped it knows
what a front looks like. The result is rendered at ``janus.views`` azimuths (evenly spaced, the
first at the front, azimuth 0 of the training cameras, at ``janus.elevation``), and each render is
put to a diffusion-classifier test (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot
Classifier"): noised at the levels ``janus.noise_levels`` (fractions of the prior's timesteps) with
``janus.samples`` draws each, the *same* draws for every candidate, and denoised under the prompt's
three view-tag conditionings (``front``, ``side``, ``back``: the prompt embeddings' ``by_view``,
which is "..., front view" for Stable Diffusion and the tag-restricted teacher for the shapes
prior). The tag whose noise prediction errs least, summed over levels and draws, is the tag the
prior gives the render.

- ``janus_score_prior``: the share of back views (``|azimuth| >= threedgen.janus.BACK_AZIMUTH``, 120
  degrees) the prior calls a front: their front-tag error is more than ``janus.margin`` (a fraction)
  below both other tags' errors. 0 for an object whose back looks like a back; towards 1 for a
  two-faced one. An object that looks the same from everywhere (a sphere) scores 0: its tags tie,
  and a tie is not a front.
- ``janus_margin_prior``: the mean over the back views of ``(m - err_front) / (m + err_front)`` with
  ``m = min(err_side, err_back)``, a continuous version in [-1, 1] (positive: the back looks more
  like a front than like a back or a side).
- ``janus_views_prior``: per azimuth, the tag called and the three errors (relative to the least).
- ``janus_confusion_prior``: counts of (the view's own tag by azimuth, the tag called), front / side
  / back, with the tag thresholds of view-dependent prompting (45 degrees; back beyond 135).

The judge (``janus.judge``): ``unbiased`` (default) is the run's prior without its camera input,
view bias or Perp-Neg, with strict view tags (a camera-conditioned prior would be told the answer);
``run`` is the run's prior as configured, view tags on. A prior without view-tag conditionings (a
text-only model with ``view_dependent_prompting`` off that the judge cannot turn on) gives ``None``
with the reason in ``janus_prior_note``.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch

from threedgen.cameras import Cameras, view_tag
from threedgen.janus import BACK_AZIMUTH
from threedgen.views import render_views, representation_device

TAGS = ("front", "side", "back")
BACK_TAG_AZIMUTH = 135.0  # view-dependent prompting's back tag: beyond 180 - 45 degrees
MAX_RESOLUTION = 512
CHUNK = 36  # noised renders per prior call


def judge_prior_config(prior_cfg, judge: str = "unbiased"):
    """The prior section that judges the views: a copy of the run's, view tags on and, for the
    ``unbiased`` judge, no camera input, no view bias, strict tags and no Perp-Neg."""
    cfg = copy.deepcopy(prior_cfg)
    changes = {"view_dependent_prompting": True}
    if judge == "unbiased":
        changes.update(camera_kappa=0.0, front_bias=None, view_tag_strength=1.0, perp_neg=False, camera=False)
    for name, value in changes.items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    return cfg


def view_azimuths(n: int) -> list[float]:
    """``n`` azimuths evenly spaced from 0 (the front), wrapped into (-180, 180]."""
    out = []
    for k in range(n):
        a = (360.0 * k / n + 180.0) % 360.0 - 180.0
        out.append(180.0 if a == -180.0 else a)
    return out


@torch.no_grad()
def tag_errors(prior, embeds, rgb: torch.Tensor, cameras: Cameras, levels, samples: int, seed: int = 0) -> np.ndarray:
    """``err [N,3]``: per render and tag (``TAGS``), the mean squared error of the prior's noise
    prediction, summed over the noise levels and draws (the same draws for every tag). The renders
    are over white, from ``cameras``."""
    x0 = prior.encode_images(rgb)
    n = len(x0)
    T = int(prior.num_train_timesteps)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    conds = [embeds.by_view[tag] for tag in TAGS]
    errors = torch.zeros(n, len(TAGS), dtype=torch.float64)
    draws = []  # (t, eps [N,...]) per level and draw: the same for every tag
    for level in levels:
        t = min(T - 1, max(0, int(round(float(level) * (T - 1)))))
        for _ in range(samples):
            draws.append((t, torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)))
    items = [(i, t, eps[i]) for t, eps in draws for i in range(n)]
    for j, tag in enumerate(TAGS):  # one tag per batch: a prior may then read only that tag's teacher views
        for start in range(0, len(items), CHUNK):
            part = items[start:start + CHUNK]
            idx = torch.tensor([i for i, _, _ in part])
            t = torch.tensor([t for _, t, _ in part], device=x0.device)
            eps = torch.stack([e for _, _, e in part])
            x_t = prior.noise.add_noise(x0[idx.to(x0.device)], t, eps)
            views = Cameras.from_angles(cameras.elevation.cpu()[idx], cameras.azimuth.cpu()[idx],
                                        cameras.distance.cpu()[idx], cameras.fovy.cpu()[idx], (1.0, 1.0, 1.0))
            pred = prior.predict_noise(x_t, t, [conds[j]] * len(part), views.to(x0.device))
            mse = ((pred.float() - eps.float()) ** 2).flatten(1).mean(1).double().cpu()
            errors[:, j].index_add_(0, idx, mse)
    return errors.numpy()


def score_views(errors: np.ndarray, azimuths, margin: float) -> dict:
    """The check's numbers from the tag errors ``[N,3]`` of renders at ``azimuths`` (see the module
    docstring)."""
    az = np.abs(np.asarray(azimuths, dtype=np.float64))
    front, others = errors[:, 0], np.minimum(errors[:, 1], errors[:, 2])
    called_front = front < (1.0 - margin) * others
    best = errors.min(axis=1)
    own = [TAGS.index(view_tag(0.0, float(a), 45.0, 60.0, 180.0 - BACK_TAG_AZIMUTH)) for a in azimuths]
    called = []
    for i in range(len(errors)):
        if called_front[i]:
            called.append(0)
        elif errors[i, own[i]] <= best[i] / (1.0 - margin):  # within the margin of the least: a tie is no wrong call
            called.append(own[i])
        else:
            called.append(1 + int(np.argmin(errors[i, 1:])))
    back = az >= BACK_AZIMUTH
    confusion = np.zeros((3, 3), dtype=int)
    for o, c in zip(own, called):
        confusion[o, c] += 1
    safe = np.maximum(others, 1e-30)
    return {
        "janus_score_prior": float(called_front[back].mean()) if back.any() else None,
        "janus_margin_prior": float(((others[back] - front[back]) / (safe[back] + front[back])).mean())
        if back.any() else None,
        "janus_confusion_prior": {"tags": list(TAGS), "counts": confusion.tolist()},
        "janus_views_prior": [{"azimuth": float(a), "tag": TAGS[own[i]], "called": TAGS[called[i]],
                               "errors": [float(e / best[i]) if best[i] > 0 else 1.0 for e in errors[i]]}
                              for i, a in enumerate(azimuths)],
    }


def janus_prior_metrics(representation, cfg, prior=None, device=None) -> dict:
    """The check of ``representation`` (the run of config ``cfg``) under its judge (``cfg.janus``).
    ``prior``: the run's own prior, used when the judge's section equals the run's (a Stable
    Diffusion run is not loaded twice); otherwise the judge is built."""
    from threedgen.guidance.priors import build_prior  # a second prior: only where one is needed

    settings = cfg.janus
    judge_cfg = judge_prior_config(cfg.prior, settings.judge)
    device = device or representation_device(representation)
    judge = prior if prior is not None and judge_cfg == cfg.prior else build_prior(judge_cfg, device)
    embeds = judge.encode_prompt(cfg.prompt, cfg.negative_prompt)
    missing = [tag for tag in TAGS if tag not in embeds.by_view]
    header = {"janus_prior_settings": {"judge": settings.judge, "views": settings.views,
                                       "elevation": settings.elevation, "noise_levels": list(settings.noise_levels),
                                       "samples": settings.samples, "margin": settings.margin}}
    if missing:
        return {"janus_score_prior": None, "janus_prior_note": f"the judge prior {judge_cfg.name!r} has no view-tag "
                f"conditionings ({', '.join(missing)}); turn on prior.view_dependent_prompting", **header}
    azimuths = view_azimuths(settings.views)
    distance = float(np.mean(cfg.camera.distance_range))
    fovy = float(np.mean(cfg.camera.fovy_range))
    cameras = Cameras.from_angles([settings.elevation] * len(azimuths), azimuths, distance, fovy, (1.0, 1.0, 1.0))
    size = min(int(getattr(judge, "resolution", 64)), MAX_RESOLUTION)
    rgb, _ = render_views(representation, cameras, size, chunk=8, quantise=False)
    rgb = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().to(device)
    errors = tag_errors(judge, embeds, rgb, cameras.to(device), settings.noise_levels, settings.samples)
    return {**score_views(errors, azimuths, settings.margin), **header}


def gate_passes(score: Optional[float], threshold: float) -> bool:
    """The Janus gate: a run without a score (no judge) passes; else the score must be at most
    the threshold."""
    return score is None or score <= threshold


__all__ = ["janus_prior_metrics", "judge_prior_config", "score_views", "tag_errors", "view_azimuths", "gate_passes"]
