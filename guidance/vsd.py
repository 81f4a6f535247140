"""Variational Score Distillation (ProlificDreamer: Wang et al. 2023, "ProlificDreamer:
High-Fidelity and Diverse Text-to-3D Generation with Variational Score Distillation", eq. 9 and
Algorithm 1), as the official code and threestudio compute it:

    t ~ U{min_step, max_step},  eps,  x_t = a_t x + s_t eps
    g = w(t) * (eps_cfg(x_t, t) - e_fake(x_t, t, y, camera)),   w = 1 - abar_t, CFG 7.5

and, on the same step, one update of the fake score on the detached render:

    t' ~ U{0..T-1}, eps', camera := 0 for the whole batch with probability 0.1
    L_fake = || f(a_t' x + s_t' eps', t', y, camera) - target ||^2   (target: eps', or v for v-models)

The fake score (``guidance/fake_score.py``) is a LoRA on the prior's UNet for diffusers priors and
a small residual UNet for pixel-space priors; it takes the view-independent prompt. Its loss is
added to the returned loss (times ``lambda_fake``), so one backward and the system's one
optimizer step train both; its weights are in the system's checkpoints, so ``--resume`` resumes
them. The timestep range drops to 0.5 after ``t_switch`` of the run (official: 5,000 of 25,000
iterations, i.e. 0.2). The camera dropout is one draw per batch (all views keep their cameras or
none do), as the official code's and threestudio's ``random.random() < 0.1``.

Deliberate differences: the official code's fake score is a separate SD 2.1 (768, v-prediction)
UNet; here the LoRA sits on the teacher's own UNet (threestudio's choice, one UNet in memory).
The official code evaluates the fake score camera-conditioned only (no CFG on it): so does VSD
here; ESD (``esd.py``) adds the camera-free branch. A residual fake score's teacher term follows
the fake score's conditioning: camera-conditioned rows use the camera, camera-free rows (dropout,
ESD) the prior's view-marginal prediction.
"""

from __future__ import annotations

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.base import Guidance, GuidanceOutput, inject_gradient
from threedgen.guidance.camera_embedding import camera_input
from threedgen.guidance.classifier_free import RideAlong, guided_noise
from threedgen.guidance.config import VSDConfig
from threedgen.guidance.fake_score import build_fake_score
from threedgen.guidance.priors.base import PromptEmbeds


class VSD(Guidance):
    entropy_weight = 0.0  # ESD's lambda; 0 is VSD

    def __init__(self, cfg: VSDConfig, prior):
        super().__init__(cfg, prior)
        self.fake_score = build_fake_score(prior, cfg.lora_rank, cfg.fake_score_channels)

    def extra_parameters(self) -> list[dict]:
        lr = self.cfg.fake_score_lr if self.fake_score.uses_teacher else self.cfg.lora_lr
        return [{"params": [p for p in self.fake_score.parameters() if p.requires_grad], "lr": lr}]

    def fake_eps(self, x_t, t, cond, camera, teacher, teacher_free=None) -> torch.Tensor:
        """The fake score's eps; ESD mixes in the camera-free branch (whose teacher term, for a
        residual fake score, is the camera-free teacher ``teacher_free``)."""
        e_cam = self.fake_score.predict(x_t, t, cond, camera, teacher)
        lam = self.entropy_weight
        if not lam:
            return e_cam
        e_free = self.fake_score.predict(x_t, t, cond, torch.zeros_like(camera), teacher_free)
        return (1 - lam) * e_cam + lam * e_free

    def forward(self, images: torch.Tensor, embeds: PromptEmbeds, cameras: Cameras, step: int,
                max_steps: int) -> GuidanceOutput:
        prior, cfg = self.prior, self.cfg
        x = self.encode(images)
        b = x.shape[0]
        t = self.sample_timesteps(b, step, max_steps, x.device)
        cond = [embeds.cond] * b  # the fake score takes the view-independent prompt
        camera = camera_input(cameras.c2w.to(x.device))
        # the fake score's training sample: a fresh t', noise and camera dropout
        x_d = x.detach()
        t_fake = torch.randint(0, prior.num_train_timesteps, (b,), device=x.device)
        eps_fake = torch.randn_like(x_d)
        keep = (torch.rand((), device=x.device) >= cfg.camera_dropout).repeat(b)  # one draw per batch
        with torch.no_grad():
            eps = torch.randn_like(x)
            x_t = prior.noise.add_noise(x, t, eps)
            x_fake = prior.noise.add_noise(x_d, t_fake, eps_fake)
            if not self.fake_score.uses_teacher:
                pred = guided_noise(prior, x_t, t, embeds, cameras, cfg.guidance_scale)
                teacher = teacher_free = teacher_fake = None
            else:
                pred, teacher_free, teacher_fake = self._teacher_terms(x_t, t, x_fake, t_fake, keep, embeds, cameras)
                teacher = pred.cond
            e_fake = self.fake_eps(x_t, t, cond, camera, teacher, teacher_free)
            grad = (1 - prior.noise.alphas_at(t, x)) * (pred.eps - e_fake)
        fake_loss = self.fake_score.training_loss(x_d, t_fake, eps_fake, cond, camera_input(cameras.c2w.to(x.device), keep),
                                                  teacher_fake)
        loss = inject_gradient(x, grad) + cfg.lambda_fake * fake_loss
        return GuidanceOutput(loss, grad.flatten(1).norm(dim=1).mean(), t, {"fake_score_loss": fake_loss.detach()})

    def _teacher_terms(self, x_t, t, x_fake, t_fake, keep, embeds, cameras):
        """For a residual fake score: the teacher under the fake score's own conditioning. Camera
        rows use the view-dependent prompt and the camera (they ride in the batched CFG call);
        camera-free rows (dropped training rows, ESD's free branch) use the view-independent
        prompt and no camera, i.e. the prior's view-marginal prediction, in one more call."""
        prior = self.prior
        kept = keep.nonzero().flatten().tolist()
        dropped = (~keep).nonzero().flatten().tolist()
        kept_rows = None
        if kept:
            sub = cameras.take(kept)
            kept_rows = RideAlong(x_fake[kept], t_fake[kept], embeds.cond_for(sub), sub)
        pred = guided_noise(prior, x_t, t, embeds, cameras, self.cfg.guidance_scale, ride_along=kept_rows)
        free_x, free_t = [x_fake[dropped]], [t_fake[dropped]]
        if self.entropy_weight:
            free_x.append(x_t)
            free_t.append(t)
        free_x, free_t = torch.cat(free_x), torch.cat(free_t)
        free = prior.predict_noise(free_x, free_t, [embeds.cond] * len(free_x), None) if len(free_x) else free_x
        teacher_fake = torch.empty_like(x_fake)
        if kept:
            teacher_fake[kept] = pred.ride_along
        if dropped:
            teacher_fake[dropped] = free[:len(dropped)]
        teacher_free = free[len(dropped):] if self.entropy_weight else None
        return pred, teacher_free, teacher_fake
