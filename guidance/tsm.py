"""Trajectory Score Matching (Dreamer XL: Miao et al. 2024, "DreamerXL: Towards High-Resolution
Text-to-3D Generation via Trajectory Score Matching", eq. 12) and its special case Interval Score
Matching (LucidDreamer: Liang et al. 2024, "LucidDreamer: Towards High-Fidelity Text-to-3D
Generation via Interval Score Matching", eq. 17), as the official code computes them:

    renders mirrored left-right with probability flip_prob (0.5; one coin per batch)
    t ~ U{lo+o..hi} (one t per batch; o = steps_offset = 1),  s = max(t - dT, o)
    x~_0 = a_o x + s_o eps                          (eps with offset noise, one offset per batch)
    x~_s = DDIM-invert x~_0 from o to s with the empty prompt, strides of 200 (at most 5 steps)
    x~_t = one DDIM inversion step x~_s -> t using e_0(x~_s, s)
    mu   = round(s + sqrt(1 - gamma^2) (t - s));  x~_mu = one step x~_s -> mu
    g = sqrt((1 - abar_t) / abar_t) * (eps_cfg(x~_t, t) - e_0(x~_mu, mu)) * grad_scale

Both paths start from the same x~_s (TSM's "two paths"); ``gamma = 1`` gives ``mu = s`` and the
target ``e_0(x~_s, s)``: that is ISM, exactly (``--guidance ism``). The CFG's uncond is the
negative prompt, the inversion uses the empty prompt. The target ``e_0(x~_mu, mu)`` rides in the
CFG's batched call. CFG's positive (``view_interpolation``) is the front/side/back prompts
interpolated by azimuth as the official ``train.py`` does (``PromptEmbeds.interpolated_for``).

Matching the official indexing: it draws an index ``i ~ U{lo..hi-1}`` and uses the DDIM
scheduler's timestep ``i + 1`` (Stable Diffusion's ``steps_offset`` 1), so t lies in
``[lo + 1, hi]`` (21.. at the start), s in ``[1, ..]`` and x~_0 is noised at t = 1, not 0;
``steps_offset`` 0 gives the plain ``U{lo..hi}`` and ``x~_0`` at t = 0. The official flip
(torchvision's ``RandomHorizontalFlip`` on the batch) is ``flip_prob``; autograd mirrors the
gradient back to the render.

Deliberate differences: LucidDreamer and Dreamer XL multiply the gradient by 0.1 and do not
divide by the batch size; here the project's convention applies (``g / B``, see
``guidance/base.py``) and ``grad_scale`` defaults to 1 (learning rates are tuned to it). Optional
per-pixel clipping (Dreamer XL's ``train.py`` image hook): each rendered pixel's RGB gradient of
the whole loss is rescaled so its largest channel is at most ``pixel_grad_clip``; Dreamer XL's
0.05 was set for its own gradient scale (x0.1, no 1/B), so it does not carry over unchanged. The
inversion stride is ``max(inversion_stride, ceil((s - o) / inversion_max_steps))`` from t = o: at
the defaults (200, 5, T = 1000) that is LucidDreamer's schedule; the official code instead starts
at ``max(s - stride * steps, 0)``, which differs only for other settings. The flip is never
applied for a camera-conditioned prior (``Prior.camera_conditioned``: the shapes prior with
``camera_kappa > 0``, the learned prior with a camera): a mirrored render is not the view its
camera describes, and the official code only has text-only Stable Diffusion. Cameras tagged
overhead (elevation above the overhead threshold) take the overhead prompt; the official code has
no overhead prompt (its cameras stay below 45 degrees of elevation). Under Perp-Neg (off in the
official configs) the weights are threestudio's (``guidance/classifier_free.py``), not
LucidDreamer's ``negative_w`` scheme.
"""

from __future__ import annotations

import math

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.base import Guidance, GuidanceOutput, inject_gradient, sample_noise
from threedgen.guidance.classifier_free import RideAlong, guided_noise
from threedgen.guidance.inversion import ddim_invert
from threedgen.guidance.priors.base import PromptEmbeds
from threedgen.schedule import schedule_value


def clip_pixel_gradient(grad: torch.Tensor, limit: float) -> torch.Tensor:
    """Rescale each pixel's RGB gradient (last dim) so its largest |channel| is at most ``limit``."""
    peak = grad.abs().amax(dim=-1, keepdim=True)
    return grad * (limit / peak.clamp(min=1e-30)).clamp(max=1.0)


class TSM(Guidance):
    def timesteps(self, b: int, step: int, max_steps: int, device) -> tuple[torch.Tensor, int, int, int]:
        """(t for the batch, t, s, mu) as integers."""
        offset = self.cfg.steps_offset
        t = self.sample_shared_timestep(b, step, max_steps, device, offset)
        k_t = int(t[0])
        d = int(schedule_value(self.cfg.interval, step, max_steps))
        k_s = min(max(k_t - d, offset), k_t)
        k_mu = int(round(k_s + math.sqrt(1 - self.cfg.gamma ** 2) * (k_t - k_s)))
        return t, k_t, k_s, k_mu

    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        prior, cfg = self.prior, self.cfg
        if cfg.pixel_grad_clip is not None and images.requires_grad:
            images.register_hook(lambda g: clip_pixel_gradient(g, cfg.pixel_grad_clip))
        images, flipped = self.maybe_flip(images)
        x = self.encode(images)
        b = x.shape[0]
        t, k_t, k_s, k_mu = self.timesteps(b, step, max_steps, x.device)
        k_0 = min(cfg.steps_offset, k_s)
        empty = embeds.empty_for(cameras)
        with torch.no_grad():
            eps = sample_noise(x, cfg.noise_offset)
            x_0 = prior.noise.add_noise(x, torch.full_like(t, k_0), eps)
            stride = max(cfg.inversion_stride, math.ceil((k_s - k_0) / cfg.inversion_max_steps))
            x_s, calls = ddim_invert(prior, x_0, k_0, k_s, stride, empty, cameras)
            e_s = prior.predict_noise(x_s, torch.full_like(t, k_s), empty, cameras)
            x_t = prior.noise.ddim_step(x_s, e_s, k_s, k_t)
            mu_item = None
            if k_mu != k_s:
                x_mu = prior.noise.ddim_step(x_s, e_s, k_s, k_mu)
                mu_item = RideAlong(x_mu, torch.full_like(t, k_mu), empty, cameras)
            pred = guided_noise(prior, x_t, t, embeds, cameras, cfg.guidance_scale, ride_along=mu_item,
                                view_interpolation=cfg.view_interpolation)
            target = e_s if mu_item is None else pred.ride_along
            abar = prior.noise.alphas_at(t, x)
            grad = ((1 - abar) / abar).sqrt() * (pred.eps - target) * cfg.grad_scale
        return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t,
                              {"inversion_calls": float(calls + 1), "flipped": float(flipped)})
