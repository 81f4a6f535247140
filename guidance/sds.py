"""Score Distillation Sampling (DreamFusion: Poole et al. 2022, "DreamFusion: Text-to-3D using 2D
Diffusion", eq. 3):

    t ~ U{min_step, max_step},  eps ~ N(0, I),  x_t = a_t x + s_t eps
    g = w(t) * (eps_cfg(x_t, t) - eps),   eps_cfg = eps_u + s * (eps_y - eps_u)

with ``w(t) = 1 - alphas_cumprod[t]`` ("sds"), 1 ("uniform") or ``sqrt(abar)(1-abar)``
("fantasia3d"). Cond and uncond are one batched prior call (``threedgen.guidance.classifier_free``;
Perp-Neg when the prior's prompt settings ask for it). Optional element-wise clipping of g
(threestudio's ``grad_clip``). Note the CFG convention: diffusers' (D); threestudio's SDS uses
``e_y + s(e_y - e_u)`` (T), so its scale 100 equals 101 here.
"""

from __future__ import annotations

import torch

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.base import Guidance, GuidanceOutput, inject_gradient
from threedgen.guidance.classifier_free import guided_noise
from threedgen.guidance.config import SDS_WEIGHTINGS as WEIGHTINGS
from threedgen.guidance.priors.base import PromptEmbeds
from threedgen.schedule import schedule_value


def sds_weight(weighting: str, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    if weighting == "sds":
        return 1 - alphas_cumprod_t
    if weighting == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    if weighting == "fantasia3d":
        return alphas_cumprod_t.sqrt() * (1 - alphas_cumprod_t)
    raise UserError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


class SDS(Guidance):
    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        """``images [B,H,W,3]`` in [0,1] -> loss whose gradient on the prior input is g / B."""
        prior, cfg = self.prior, self.cfg
        x = self.encode(images)
        b = x.shape[0]
        t = self.sample_timesteps(b, step, max_steps, x.device)
        with torch.no_grad():
            abar = prior.noise.alphas_at(t, x)
            eps = torch.randn_like(x)
            x_t = prior.noise.add_noise(x, t, eps)
            eps_cfg = guided_noise(prior, x_t, t, embeds, cameras, cfg.guidance_scale).eps
            grad = sds_weight(cfg.weighting, abar) * (eps_cfg - eps)
            clip = schedule_value(cfg.grad_clip, step, max_steps)
            if clip is not None:
                grad = grad.clamp(-clip, clip)
        return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t)
