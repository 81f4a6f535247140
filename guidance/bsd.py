"""Balanced Score Distillation (PlacidDreamer: Huang et al. 2024, "PlacidDreamer: Advancing
Harmony in Text-to-3D Generation", sec. 3.3; official ``train_step_BSD``):

    renders mirrored left-right with probability flip_prob (0.5; one coin per batch)
    t ~ U{lo+o..hi} (one t per batch, o = steps_offset = 1, ISM's schedule, no inversion)
    x_t = a_t x + s_t eps                        (eps with offset noise, one offset per batch)
    c = ratio * (e_y - e_u)          the classifier direction
    d = e_u                          the smoothing direction (the code has no "- eps")
    al = clip(<d - c, d> / ||d - c||^2, 0, 1)   per sample: the min-norm point of {c, d} (MGDA)
    g = sqrt(abar_t) * (al c + (1 - al) d) * grad_scale

As in the official code: t is the DDIM scheduler's timestep of an index ``U{lo..hi-1}``
(``steps_offset`` 1: t in ``[lo + 1, hi]``); the renders are flipped as LucidDreamer's
augmentation (``flip_prob``; autograd mirrors the gradient back); ``e_y``'s prompt interpolates
the view prompts by azimuth (``view_interpolation``, ``PromptEmbeds.interpolated_for``).

Deliberate differences: the official code hard-codes ``ratio = 15`` (its README's ``--lambda_``
default of 18 is ignored); here ``guidance_scale`` is that ratio, default 15. Its gradient is
also multiplied by 0.1 and not divided by the batch; here the project convention (``g / B``)
applies with ``grad_scale`` 1. PlacidDreamer's teacher is SD plus an offline per-prompt
DreamBooth LoRA and a Zero123 initialisation; none of that is part of the guidance and none is
used here. The ``auto_BSD`` variant is not implemented. The smoothing direction uses the negative
prompt; ``configs/priors/text-to-image-bsd.yaml`` (Stable Diffusion, IF) sets PlacidDreamer's
("unrealistic, blurry, low quality."). PlacidDreamer interpolates towards a "left side" or "right side" prompt by the
azimuth's sign; here both sides use the one "side" prompt (as LucidDreamer does). The flip is never
applied for a camera-conditioned prior (a mirrored render is not its camera's view; see
``tsm.py``).
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
        images, flipped = self.maybe_flip(images)
        x = self.encode(images)
        t = self.sample_shared_timestep(x.shape[0], step, max_steps, x.device, cfg.steps_offset)
        with torch.no_grad():
            x_t = prior.noise.add_noise(x, t, sample_noise(x, cfg.noise_offset))
            pred = guided_noise(prior, x_t, t, embeds, cameras, 1.0, view_interpolation=cfg.view_interpolation)
            c = cfg.guidance_scale * (pred.eps - pred.uncond)  # e_y - e_u (with Perp-Neg: its guided direction)
            d = pred.uncond
            al = min_norm_weight(c, d)
            grad = prior.noise.alphas_at(t, x).sqrt() * (al * c + (1 - al) * d) * cfg.grad_scale
        return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t,
                              {"balance": al.mean(), "flipped": float(flipped)})
