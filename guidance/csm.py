"""Classifier Score Matching (TV-3DG: "TV-3DG: Mastering Text-to-3D Customized Generation with
Visual Prompt", arXiv 2410.21299, sec. 3.2), after Classifier Score Distillation (Yu et al. 2024):
the classifier term of SDS alone, on a deterministically noised render.

    t ~ U{min_step, max_step} (one t per batch)
    x~_t = DDIM-invert x (no noise) from 0 to t with the empty prompt, strides of 200
    g = w(t) * s * (e_y(x~_t, t) - e_u(x~_t, t)),     w = 1 - abar_t ("sds") or 1 ("uniform")
    optionally g <- g / ||g||  (CSD's grad_normalize, over the whole batch)

TV-3DG publishes no code. The deterministic noising is inferred from its abstract ("a
deterministic noise addition process") and its credit to LucidDreamer: ISM's DDIM inversion, here
starting from the clean render. Deliberate difference: ``e_u`` is the negative prompt when one is
set, else the empty prompt (docs/guidance.md section 8 writes CSD's ``e_y - e_0``; with a negative prompt this
is ``e_y - e_neg``, CSD's annealed end point). Removing SDS's ``e_u - eps`` term also removes its
noise: on a pixel-space prior the gradient is a deterministic function of the render and t (on
Stable Diffusion the VAE's posterior sample still adds some).
"""

from __future__ import annotations

import math

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.base import Guidance, GuidanceOutput, inject_gradient
from threedgen.guidance.classifier_free import guided_noise
from threedgen.guidance.inversion import ddim_invert
from threedgen.guidance.priors.base import PromptEmbeds


class CSM(Guidance):
    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        prior, cfg = self.prior, self.cfg
        x = self.encode(images)
        t = self.sample_shared_timestep(x.shape[0], step, max_steps, x.device)
        k_t = int(t[0])
        with torch.no_grad():
            stride = max(cfg.inversion_stride, math.ceil(k_t / cfg.inversion_max_steps))
            x_t, calls = ddim_invert(prior, x, 0, k_t, stride, embeds.empty_for(cameras), cameras)
            pred = guided_noise(prior, x_t, t, embeds, cameras, 1.0)
            abar = prior.noise.alphas_at(t, x)
            w = 1 - abar if cfg.weighting == "sds" else torch.ones_like(abar)
            grad = w * cfg.guidance_scale * (pred.eps - pred.uncond)  # e_y - e_u (Perp-Neg: its direction)
            if cfg.normalize:
                grad = grad / grad.norm().clamp(min=1e-12)
        return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t,
                              {"inversion_calls": float(calls)})
