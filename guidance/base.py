"""The Guidance contract: turn a prior's predictions on renders into a gradient on the renders.

Conventions shared by every method:
- CFG (diffusers'): ``eps_cfg = eps_uncond + guidance_scale * (eps_cond - eps_uncond)``.
- Gradient injection: ``loss = 0.5 * sum((x - stopgrad(x - g))^2) / B``, so ``dloss/dx = g / B``
  for the prior-space input ``x`` of a batch of B views (threestudio's normalisation).
- Timesteps are drawn per view, ``t ~ U{min_step, max_step}`` with ``min_step_percent`` and
  ``max_step_percent`` schedules (``threedgen.schedule``) times ``num_train_timesteps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.priors.base import Prior, PromptEmbeds
from threedgen.schedule import schedule_value


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; d loss / d x = g / B
    grad_norm: torch.Tensor  # ||g|| (mean over the batch), detached
    t: torch.Tensor  # [B] timesteps used
    extras: dict[str, Any] = field(default_factory=dict)


def inject_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to ``x [B,...]`` is ``grad / B``."""
    target = (x - grad).detach()
    return 0.5 * torch.nn.functional.mse_loss(x, target, reduction="sum") / x.shape[0]


class Guidance(torch.nn.Module):
    """Base class: holds the prior and the timestep schedule; subclasses implement ``forward``."""

    name = "guidance"

    def __init__(self, cfg, prior: Prior):
        super().__init__()
        self.cfg = cfg
        # Not a submodule: the prior is frozen and shared, and its weights are never checkpointed.
        object.__setattr__(self, "prior", prior)

    def step_range(self, step: int, max_steps: int) -> tuple[int, int]:
        T = self.prior.num_train_timesteps
        lo = min(int(T * schedule_value(self.cfg.min_step_percent, step, max_steps)), T - 1)
        hi = min(int(T * schedule_value(self.cfg.max_step_percent, step, max_steps)), T - 1)
        return lo, max(lo, hi)

    def sample_timesteps(self, batch: int, step: int, max_steps: int, device) -> torch.Tensor:
        lo, hi = self.step_range(step, max_steps)
        return torch.randint(lo, hi + 1, (batch,), device=device)

    def extra_parameters(self) -> list[dict]:
        """Parameter groups of trained networks (VSD's fake score); the system optimizes them."""
        return []

    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        raise NotImplementedError
