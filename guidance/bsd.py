"""Balanced Score Distillation (PlacidDreamer: Huang et al. 2024, "PlacidDreamer: Advancing
Harmony in Text-to-3D Generation", sec. 3.3; official ``train_step_BSD``):

    t ~ U{min_step, max_step} (one t per batch, ISM's schedule, no inversion), x_t = a_t x + s_t eps
    c = ratio * (e_y - e_u)          the classifier direction
    d = e_u                          the smoothing direction (the code has no "- eps")
    al = clip(<d - c, d> / ||d - c||^2, 0, 1)   per sample: the min-norm point of {c, d} (MGDA)
    g = sqrt(abar_t) * (al c + (1 - al) d) * grad_scale

Deliberate differences: the official code hard-codes ``ratio = 15`` (its README's ``--lambda_``
default of 18 is ignored); here ``guidance_scale`` is that ratio, default 15. Its gradient is
also multiplied by 0.1 and not divided by the batch; here the project convention (``g / B``)
applies with ``grad_scale`` 1. PlacidDreamer's teacher is SD plus an offline per-prompt
DreamBooth LoRA and a Zero123 initialisation; none of that is part of the guidance and none is
used here. The ``auto_BSD`` variant is not implemented. The smoothing direction uses the negative
prompt; ``configs/priors/stable-diffusion-bsd.yaml`` sets PlacidDreamer's ("unrealistic, blurry,
low quality.").
"""

from __future__ import annotations

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.base import Guidance, GuidanceOutput, inject_gradient, sample_noise
from threedgen.guidance.classifier_free import guided_noise
from threedgen.guidance.priors.base import PromptEmbeds


def min_norm_weight(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per sample, the ``al`` in [0, 1] minimising ``||al c + (1 - al) d||`` (two-task MGDA)."""
    diff = (d - c).flatten(1)
    al = (diff * d.flatten(1)).sum(1) / (diff * diff).sum(1).clamp(min=1e-12)
    return al.clamp(0, 1).view(-1, *([1] * (c.dim() - 1)))


class BSD(Guidance):
    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        prior, cfg = self.prior, self.cfg
        x = self.encode(images)
        t = self.sample_shared_timestep(x.shape[0], step, max_steps, x.device)
        with torch.no_grad():
            x_t = prior.noise.add_noise(x, t, sample_noise(x, cfg.noise_offset))
            pred = guided_noise(prior, x_t, t, embeds, cameras, 1.0)
            c = cfg.guidance_scale * (pred.eps - pred.uncond)  # e_y - e_u (with Perp-Neg: its guided direction)
            d = pred.uncond
            al = min_norm_weight(c, d)
            grad = prior.noise.alphas_at(t, x).sqrt() * (al * c + (1 - al) * d) * cfg.grad_scale
        return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t,
                              {"balance": al.mean()})
