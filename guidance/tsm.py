"""Trajectory Score Matching (Dreamer XL: Miao et al. 2024, "DreamerXL: Towards High-Resolution
Text-to-3D Generation via Trajectory Score Matching", eq. 12) and its special case Interval Score
Matching (LucidDreamer: Liang et al. 2024, "LucidDreamer: Towards High-Fidelity Text-to-3D
Generation via Interval Score Matching", eq. 17), as the official code computes them:

    t ~ U{min_step, max_step} (one t per batch),  s = max(t - dT, 0)
    x~_0 = a_0 x + s_0 eps                          (eps with offset noise)
    x~_s = DDIM-invert x~_0 to s with the empty prompt, strides of 200 (at most 5 steps)
    x~_t = one DDIM inversion step x~_s -> t using e_0(x~_s, s)
    mu   = round(s + sqrt(1 - gamma^2) (t - s));  x~_mu = one step x~_s -> mu
    g = sqrt((1 - abar_t) / abar_t) * (eps_cfg(x~_t, t) - e_0(x~_mu, mu)) * grad_scale

Both paths start from the same x~_s (TSM's "two paths"); ``gamma = 1`` gives ``mu = s`` and the
target ``e_0(x~_s, s)``: that is ISM, exactly (``--guidance ism``). The CFG's uncond is the
negative prompt, the inversion uses the empty prompt. The target ``e_0(x~_mu, mu)`` rides in the
CFG's batched call.

Deliberate differences: LucidDreamer and Dreamer XL multiply the gradient by 0.1 and do not
divide by the batch size; here the project's convention applies (``g / B``, see
``guidance/base.py``) and ``grad_scale`` defaults to 1 (learning rates are tuned to it). Optional
per-pixel clipping (Dreamer XL's ``train.py`` image hook): each rendered pixel's RGB gradient of
the whole loss is rescaled so its largest channel is at most ``pixel_grad_clip``; Dreamer XL's
0.05 was set for its own gradient scale (x0.1, no 1/B), so it does not carry over unchanged. The
inversion stride is ``max(inversion_stride, ceil(s / inversion_max_steps))`` from t = 0: at the
defaults (200, 5, T = 1000) that is LucidDreamer's schedule; the official code instead starts at
``max(s - stride * steps, 0)``, which differs only for other settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from threedgen.cameras import Cameras
from threedgen.errors import check_range
from threedgen.guidance.base import (
    Guidance,
    GuidanceConfig,
    GuidanceOutput,
    add_noise,
    alphas_at,
    inject_gradient,
    sample_noise,
)
from threedgen.guidance.cfg import ExtraItems, guided_noise
from threedgen.guidance.inversion import ddim_invert, ddim_step
from threedgen.guidance.priors.base import PromptEmbeds
from threedgen.schedule import check_schedule, schedule_value


@dataclass
class TSMConfig(GuidanceConfig):
    name: str = "tsm"
    guidance_scale: float = 7.5
    min_step_percent: Any = 0.02
    # 0.98 -> 0.5 over the warm-up (LucidDreamer: 1,500 of 5,000 iterations)
    max_step_percent: Any = (0, 0.98, 0.5, 0.3)
    interval: Any = (0, 100, 80, 0.3)  # dT = t - s, annealed over the warm-up like the range
    gamma: float = 0.3  # 1 = ISM
    inversion_stride: int = 200
    inversion_max_steps: int = 5
    noise_offset: float = 0.1
    grad_scale: float = 1.0
    pixel_grad_clip: Optional[float] = None  # Dreamer XL: 0.05

    def check(self) -> None:
        super().check()
        check_range("guidance.gamma", self.gamma, 0, 1)
        check_schedule("guidance.interval", self.interval, 0, 1000)
        check_range("guidance.inversion_stride", self.inversion_stride, 1, 1000, integer=True)
        check_range("guidance.inversion_max_steps", self.inversion_max_steps, 1, 1000, integer=True)
        check_range("guidance.noise_offset", self.noise_offset, 0, 10)
        check_range("guidance.grad_scale", self.grad_scale, 0, 1e6)
        if self.pixel_grad_clip is not None:
            check_range("guidance.pixel_grad_clip", self.pixel_grad_clip, 1e-12, 1e6)


@dataclass
class ISMConfig(TSMConfig):
    name: str = "ism"
    gamma: float = 1.0


def clip_pixel_gradient(grad: torch.Tensor, limit: float) -> torch.Tensor:
    """Rescale each pixel's RGB gradient (last dim) so its largest |channel| is at most ``limit``."""
    peak = grad.abs().amax(dim=-1, keepdim=True)
    return grad * (limit / peak.clamp(min=1e-30)).clamp(max=1.0)


class TSM(Guidance):
    name = "tsm"


    def timesteps(self, b: int, step: int, max_steps: int, device) -> tuple[torch.Tensor, int, int, int]:
        """(t for the batch, t, s, mu) as integers."""
        t = self.sample_shared_timestep(b, step, max_steps, device)
        k_t = int(t[0])
        d = int(schedule_value(self.cfg.interval, step, max_steps))
        k_s = max(k_t - d, 0)
        k_mu = int(round(k_s + math.sqrt(1 - self.cfg.gamma ** 2) * (k_t - k_s)))
        return t, k_t, k_s, k_mu

    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        prior, cfg = self.prior, self.cfg
        if cfg.pixel_grad_clip is not None and images.requires_grad:
            images.register_hook(lambda g: clip_pixel_gradient(g, cfg.pixel_grad_clip))
        x = self.encode(images)
        b = x.shape[0]
        t, k_t, k_s, k_mu = self.timesteps(b, step, max_steps, x.device)
        empty = embeds.empty_for(cameras)
        with torch.no_grad():
            eps = sample_noise(x, cfg.noise_offset)
            x_0 = add_noise(prior, x, torch.zeros_like(t), eps)
            stride = max(cfg.inversion_stride, math.ceil(k_s / cfg.inversion_max_steps))
            x_s, calls = ddim_invert(prior, x_0, 0, k_s, stride, empty, cameras)
            e_s = prior.predict_noise(x_s, torch.full_like(t, k_s), empty, cameras)
            x_t = ddim_step(prior, x_s, e_s, k_s, k_t)
            extra = None
            if k_mu != k_s:
                x_mu = ddim_step(prior, x_s, e_s, k_s, k_mu)
                extra = ExtraItems(x_mu, torch.full_like(t, k_mu), empty, cameras)
            pred = guided_noise(prior, x_t, t, embeds, cameras, cfg.guidance_scale, extra=extra)
            target = e_s if extra is None else pred.extra
            abar = alphas_at(prior, t, x)
            grad = ((1 - abar) / abar).sqrt() * (pred.eps - target) * cfg.grad_scale
        return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t,
                              {"inversion_calls": float(calls + 1)})
