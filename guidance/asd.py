"""Asynchronous Score Distillation (ScaleDreamer: Ma et al. 2024, "ScaleDreamer: Scalable
Text-to-3D Synthesis with Asynchronous Score Distillation", eq. 9; official code
``stable_diffusion_asd_guidance.py``):

    t ~ U{min_step, max_step},  eps shared,  x_t = a_t x + s_t eps
    dt = floor(u * min(r (t - min_step), T - 1 - t)),  u ~ U(0, 1),  r = plus_ratio (0.1)
    t2 = clamp(t + dt, 1, T - 1),  x_t2 = a_t2 x + s_t2 eps
    g = w(t) * (eps_cfg(x_t, t) - e_y(x_t2, t2)),   w = 1 - abar_t

VSD with the fake score replaced by the frozen teacher, text-conditioned and without CFG, at a
later timestep. Cond, uncond and the shifted cond are one batched prior call (3B items; Perp-Neg
adds its negatives). Defaults from the official single-prompt config: CFG 7.5, min% 0.5 -> 0.02
and max% 0.98 -> 0.5 linearly over the run. ``dt`` is relative to the current (annealed)
min_step and ``w`` is taken at t, as the official code does. ``e_y`` at t2 uses CFG's positive
prompt: the view tag's, or under Perp-Neg the azimuth-interpolated one (the official
``get_eps`` reuses ``text_embeddings_vd``). Perp-Neg's negative weights are scaled by
``perp_neg_scale``, -0.5 as the official SD config's ``guidance_perp_neg`` (threestudio's -1 is the
other methods' default).
"""

from __future__ import annotations

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.base import Guidance, GuidanceOutput, inject_gradient
from threedgen.guidance.classifier_free import RideAlong, guided_noise
from threedgen.guidance.priors.base import PromptEmbeds


class ASD(Guidance):
    def shifted_timesteps(self, t: torch.Tensor, min_step: int) -> torch.Tensor:
        T = self.prior.num_train_timesteps
        span = torch.minimum(self.cfg.plus_ratio * (t - min_step).float(), (T - 1 - t).float())
        u = torch.rand(t.shape, device=t.device) if self.cfg.plus_random else torch.ones(t.shape, device=t.device)
        return (t + (u * span).floor().long()).clamp(1, T - 1)

    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        prior, cfg = self.prior, self.cfg
        x = self.encode(images)
        b = x.shape[0]
        t = self.sample_timesteps(b, step, max_steps, x.device)
        with torch.no_grad():
            eps = torch.randn_like(x)
            t2 = self.shifted_timesteps(t, self.step_range(step, max_steps)[0])
            x_t, x_t2 = prior.noise.add_noise(x, t, eps), prior.noise.add_noise(x, t2, eps)
            # e_y at t + dt takes CFG's positive: under Perp-Neg the interpolated view prompt
            positive = embeds.interpolated_for(cameras) if embeds.perp_neg else embeds.cond_for(cameras)
            pred = guided_noise(prior, x_t, t, embeds, cameras, cfg.guidance_scale,
                                ride_along=RideAlong(x_t2, t2, positive, cameras))
            grad = (1 - prior.noise.alphas_at(t, x)) * (pred.eps - pred.ride_along)
        return GuidanceOutput(inject_gradient(x, grad), grad.flatten(1).norm(dim=1).mean(), t, {"t2": t2.float().mean()})
