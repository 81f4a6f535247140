"""The trainable fake score of VSD and ESD: a network that learns the score of the *current*
renders (the distribution the 3D representation produces), camera-conditioned.

- On a diffusers prior: a LoRA adapter on the prior's UNet (``LoRAFakeScore`` in ``lora.py``), as
  ProlificDreamer and threestudio do. It predicts in the prior's parameterisation (eps or v) and
  is trained on it.
- On a pixel-space prior without a UNet to adapt (the shapes prior): a small UNet trained from
  scratch, used as a *residual* on the frozen teacher, ``e_fake = e_y(x_t) + r(x_t, t, camera)``,
  with ``r``'s last layer at zero. Like a fresh LoRA it starts as the teacher, so VSD starts from
  a sane gradient instead of a random network's output; its teacher term comes from the batched
  CFG call at no extra cost.

Both are trained each step with the denoising loss on the detached render, a fresh t' ~ U{0..T-1}
and camera dropout (the camera replaced by zeros with probability ``camera_dropout``), which is
what makes the camera-free branch that ESD needs meaningful. Both take the camera through
``camera_embedding.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from threedgen.guidance.camera_embedding import CameraTimeEmbedding
from threedgen.guidance.lora import LoRAFakeScore
from threedgen.modules import hold


class PixelFakeScore(torch.nn.Module):
    """A small UNet residual on a pixel-space prior (see the module docstring)."""

    uses_teacher = True

    def __init__(self, prior, channels: Sequence[int] = (16, 32, 32)):
        super().__init__()
        from diffusers import UNet2DModel  # heavy: only when a fake score is built

        hold(self, "prior", prior)
        c = 3
        self.unet = UNet2DModel(sample_size=prior.resolution, in_channels=c, out_channels=c,
                                block_out_channels=tuple(channels), layers_per_block=1,
                                down_block_types=("DownBlock2D",) * len(channels),
                                up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=8)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)
        self.camera = CameraTimeEmbedding(self.unet.time_embedding.linear_2.out_features)
        self.camera.attach(self.unet)
        self.to(prior.noise.alphas_cumprod.device)

    def residual(self, x_t: torch.Tensor, t: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        with self.camera.use(camera):
            return self.unet(x_t, t).sample

    def predict(self, x_t, t, cond, camera, teacher: torch.Tensor) -> torch.Tensor:
        return teacher + self.residual(x_t, t, camera)

    def training_loss(self, x, t, eps, cond, camera, teacher: torch.Tensor) -> torch.Tensor:
        x_t = self.prior.noise.add_noise(x, t, eps)
        return torch.nn.functional.mse_loss(teacher + self.residual(x_t, t, camera), eps)


class LoRAScore(torch.nn.Module):
    """The LoRA fake score on a diffusers prior, trained in the prior's own parameterisation."""

    uses_teacher = False

    def __init__(self, prior, rank: int = 4):
        super().__init__()
        hold(self, "prior", prior)
        self.lora = LoRAFakeScore(prior, rank=rank, camera_embedding=True)

    def predict(self, x_t, t, cond, camera, teacher=None) -> torch.Tensor:
        return self.lora.predict_noise(x_t, t, cond, camera)

    def training_loss(self, x, t, eps, cond, camera, teacher=None) -> torch.Tensor:
        noise = self.prior.noise
        x_t = noise.add_noise(x, t, eps)
        target = noise.target(x, eps, t)
        return torch.nn.functional.mse_loss(self.lora.model_output(x_t, t, cond, camera), target)


def build_fake_score(prior, rank: int, channels: Sequence[int]) -> torch.nn.Module:
    if prior.supports_lora:
        return LoRAScore(prior, rank)
    return PixelFakeScore(prior, channels)
