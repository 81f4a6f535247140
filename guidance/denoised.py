"""Denoised targets (DreamGaussian's second stage, Tang et al. 2023, "DreamGaussian: Generative
Gaussian Splatting for Efficient 3D Content Creation", sec. 3.3): instead of a score, each render
gets a target image from the prior itself,

    x_t = a_t x + s_t eps,   t = strength * T,
    x_hat = DDIM(x_t -> 0) in ``steps`` steps under CFG at ``scale``,
    loss = 0.5 * ||x - stopgrad(x_hat)||^2 / B,

an img2img of the render through the prior's own scheduler. The target lies on the prior's image
manifold near the render, so colours move towards what the prior renders instead of SDS's
saturated mode-seeking direction. The MSE is taken in the prior's input space (pixels for the
shapes prior and IF, latents for Stable Diffusion: a latent MSE, where DreamGaussian decodes and
compares pixels).
"""

from __future__ import annotations

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.base import GuidanceOutput, inject_gradient
from threedgen.guidance.classifier_free import guided_noise
from threedgen.guidance.priors.base import PromptEmbeds


@torch.no_grad()
def denoise(prior, x: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, strength: float, steps: int,
            scale: float) -> tuple[torch.Tensor, int]:
    """The prior's denoise of ``x`` (its input space) from ``strength * T``: ``(x_hat, t)``. The
    last of the ``steps`` DDIM steps goes straight to the clean-image estimate."""
    T = prior.num_train_timesteps
    t0 = max(1, min(T - 1, int(round(strength * T))))
    ks = torch.linspace(t0, 0, steps + 1).round().long().tolist()
    x_t = prior.noise.add_noise(x, torch.full((x.shape[0],), t0, device=x.device, dtype=torch.long), torch.randn_like(x))
    for k_from, k_to in zip(ks[:-1], ks[1:]):
        t = torch.full((x.shape[0],), k_from, device=x.device, dtype=torch.long)
        eps = guided_noise(prior, x_t, t, embeds, cameras, scale).eps
        if k_to == 0:
            a = prior.noise.alphas_at(t, x_t)
            return (x_t - (1 - a).sqrt() * eps) / a.sqrt(), t0
        x_t = prior.noise.ddim_step(x_t, eps, k_from, k_to)
    return x_t, t0


def denoised_target_loss(prior, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, strength: float,
                         steps: int, scale: float) -> GuidanceOutput:
    """Renders ``[B,H,W,3]`` -> the MSE to their denoised targets (gradient ``(x - x_hat) / B`` on
    the prior's input ``x``)."""
    x = prior.encode_images(images.permute(0, 3, 1, 2))
    target, t0 = denoise(prior, x.detach(), embeds, cameras, strength, steps, scale)
    grad = (x - target).detach()
    t = torch.full((x.shape[0],), t0, device=x.device)
    return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t)
