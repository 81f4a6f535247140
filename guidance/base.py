"""The Guidance contract: turn a prior's predictions on renders into a gradient on the renders.

Conventions shared by every method:
- CFG (diffusers'): ``eps_cfg = eps_uncond + guidance_scale * (eps_cond - eps_uncond)``.
- Gradient injection: ``loss = 0.5 * sum((x - stopgrad(x - g))^2) / B``, so ``dloss/dx = g / B``
  for the prior-space input ``x`` of a batch of B views (threestudio's normalisation).
- Timesteps are drawn per view, ``t ~ U{min_step, max_step}`` with ``min_step_percent`` and
  ``max_step_percent`` schedules (``threedgen.schedule``) times ``num_train_timesteps``; ISM, TSM,
  BSD and CSM draw one t per batch (ISM/TSM/BSD shifted by ``steps_offset``).
- Perp-Neg's negative weights are scaled by the method's ``perp_neg_scale`` (``Guidance.__call__``
  sets it on the embeds).
- Noise algebra (``x_t``, ``abar_t``, DDIM steps) is the prior's schedule's, ``prior.noise``
  (``threedgen.noise``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.priors.base import Prior, PromptEmbeds
from threedgen.modules import hold
from threedgen.schedule import schedule_value


def sample_noise(x: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise, plus ``offset`` times a per-channel constant drawn once for the whole batch
    (LucidDreamer's offset noise: ``0.1 * randn(1, C, 1, 1)`` repeated over the views)."""
    eps = torch.randn_like(x)
    if offset:
        eps = eps + offset * torch.randn(1, x.shape[1], *([1] * (x.dim() - 2)), device=x.device, dtype=x.dtype)
    return eps


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; d loss / d x = g / B
    grad_norm: torch.Tensor  # ||g|| (mean over the batch), detached
    t: torch.Tensor  # [B] timesteps used
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific numbers to log


def inject_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to ``x [B,...]`` is ``grad / B``."""
    target = (x - grad).detach()
    return 0.5 * torch.nn.functional.mse_loss(x, target, reduction="sum") / x.shape[0]


class Guidance(torch.nn.Module):
    """Base class: holds the prior and the timestep schedule; subclasses implement ``forward``."""

    def __init__(self, cfg, prior: Prior):
        super().__init__()
        self.cfg = cfg  # checked once, with the whole run's config (threedgen.config.merge)
        # Not a submodule: the prior is frozen and shared, and its weights are never checkpointed.
        hold(self, "prior", prior)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Renders ``[B,H,W,3]`` in [0,1] -> the prior's input space (differentiable)."""
        return self.prior.encode_images(images.permute(0, 3, 1, 2))

    def step_range(self, step: int, max_steps: int) -> tuple[int, int]:
        T = self.prior.num_train_timesteps
        lo = min(int(T * schedule_value(self.cfg.min_step_percent, step, max_steps)), T - 1)
        hi = min(int(T * schedule_value(self.cfg.max_step_percent, step, max_steps)), T - 1)
        return lo, max(lo, hi)

    def sample_timesteps(self, batch: int, step: int, max_steps: int, device) -> torch.Tensor:
        lo, hi = self.step_range(step, max_steps)
        return torch.randint(lo, hi + 1, (batch,), device=device)

    def sample_shared_timestep(self, batch: int, step: int, max_steps: int, device, offset: int = 0) -> torch.Tensor:
        """One t for the whole batch (the inversion-based methods step all views together). With
        ``offset`` (diffusers' ``steps_offset``, as the official ISM/TSM/BSD code indexes its DDIM
        timesteps) t is an index in ``U{lo..hi-1}`` plus the offset: ``U{lo+offset..hi}``."""
        lo, hi = self.step_range(step, max_steps)
        T = self.prior.num_train_timesteps
        lo_t = min(lo + offset, T - 1)
        return torch.randint(lo_t, max(hi, lo_t) + 1, (1,), device=device).expand(batch).clone()

    def maybe_flip(self, images: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """LucidDreamer's augmentation: with probability ``cfg.flip_prob`` the whole batch of
        renders ``[B,H,W,3]`` is mirrored left-right (one coin per batch, as torchvision's
        ``RandomHorizontalFlip`` on a batch); autograd mirrors the gradient back. Never for a
        camera-conditioned prior: a mirrored render is not the view its camera describes."""
        p = float(getattr(self.cfg, "flip_prob", 0.0))
        if p <= 0 or self.prior.camera_conditioned or not bool(torch.rand(()) < p):
            return images, False
        return images.flip(2), True

    def __call__(self, images: torch.Tensor, embeds: PromptEmbeds, *args, **kwargs) -> GuidanceOutput:
        """``forward`` with this method's Perp-Neg negative scale (``cfg.perp_neg_scale``) on the embeds."""
        scale = getattr(self.cfg, "perp_neg_scale", None)
        if embeds.perp_neg and scale is not None and scale != embeds.perp_neg_scale:
            embeds = dataclasses.replace(embeds, perp_neg_scale=scale)
        return super().__call__(images, embeds, *args, **kwargs)

    def extra_parameters(self) -> list[dict]:
        """Parameter groups of trained networks (VSD's fake score); the system optimizes them."""
        return []

    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        raise NotImplementedError
