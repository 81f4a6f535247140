"""The trainable fake score of VSD and ESD: a network that learns the score of the *current*
renders (the distribution the 3D representation produces), camera-conditioned.

- On a diffusers prior: a LoRA adapter on the prior's UNet (``LoRAFakeScore``), as ProlificDreamer
  and threestudio do. It predicts in the prior's parameterisation (eps or v) and is trained on it.
- On a pixel-space prior without a UNet to adapt (the shapes prior): a small UNet trained from
  scratch, used as a *residual* on the frozen teacher, ``e_fake = e_y(x_t) + r(x_t, t, camera)``,
  with ``r``'s last layer at zero. Like a fresh LoRA it starts as the teacher, so VSD starts from
  a sane gradient instead of a random network's output; its teacher term comes from the batched
  CFG call at no extra cost.

Both are trained each step with the denoising loss on the detached render, a fresh t' ~ U{0..T-1}
and camera dropout (the camera replaced by zeros with probability ``camera_dropout``), which is
what makes the camera-free branch that ESD needs meaningful.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from threedgen.guidance.base import add_noise, alphas_at


class CameraTimeEmbedding(torch.nn.Module):
    """Flattened camera-to-world matrix ``[N,16]`` -> an offset added to a UNet's time embedding
    (a forward hook on ``unet.time_embedding``, active only inside ``use``). Last layer at zero."""

    def __init__(self, width: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        self.mlp = TimestepEmbedding(16, width)
        torch.nn.init.zeros_(self.mlp.linear_2.weight)
        torch.nn.init.zeros_(self.mlp.linear_2.bias)
        self._camera: Optional[torch.Tensor] = None

    def attach(self, unet) -> torch.utils.hooks.RemovableHandle:
        return unet.time_embedding.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self._camera is None:
            return output
        return output + self.mlp(self._camera.to(output.device, torch.float32)).to(output.dtype)

    @contextlib.contextmanager
    def use(self, camera: Optional[torch.Tensor]):
        self._camera = camera
        try:
            yield
        finally:
            self._camera = None


def camera_input(c2w: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flattened c2w ``[N,16]``; rows where ``keep`` is False are zero (the "no camera" input)."""
    cam = c2w.reshape(c2w.shape[0], 16).float()
    return cam if keep is None else cam * keep.view(-1, 1).to(cam)


class PixelFakeScore(torch.nn.Module):
    """A small UNet residual on a pixel-space prior (see the module docstring)."""

    uses_teacher = True

    def __init__(self, prior, channels: Sequence[int] = (16, 32, 32)):
        super().__init__()
        from diffusers import UNet2DModel

        object.__setattr__(self, "prior", prior)
        c = 3
        self.unet = UNet2DModel(sample_size=prior.resolution, in_channels=c, out_channels=c,
                                block_out_channels=tuple(channels), layers_per_block=1,
                                down_block_types=("DownBlock2D",) * len(channels),
                                up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=8)
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)
        self.camera = CameraTimeEmbedding(self.unet.time_embedding.linear_2.out_features)
        self._hook = self.camera.attach(self.unet)
        self.to(prior.alphas_cumprod.device)

    def residual(self, x_t: torch.Tensor, t: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        with self.camera.use(camera):
            return self.unet(x_t, t).sample

    def predict(self, x_t, t, cond, camera, teacher: torch.Tensor) -> torch.Tensor:
        return teacher + self.residual(x_t, t, camera)

    def training_loss(self, x, t, eps, cond, camera, teacher: torch.Tensor) -> torch.Tensor:
        x_t = add_noise(self.prior, x, t, eps)
        return torch.nn.functional.mse_loss(teacher + self.residual(x_t, t, camera), eps)


class LoRAScore(torch.nn.Module):
    """The LoRA fake score on a diffusers prior, trained in the prior's own parameterisation."""

    uses_teacher = False

    def __init__(self, prior, rank: int = 4):
        super().__init__()
        from threedgen.guidance.priors.diffusion.lora import LoRAFakeScore

        object.__setattr__(self, "prior", prior)
        self.lora = LoRAFakeScore(prior, rank=rank, camera_embedding=True)

    def predict(self, x_t, t, cond, camera, teacher=None) -> torch.Tensor:
        return self.lora.predict_noise(x_t, t, cond, camera)

    def training_loss(self, x, t, eps, cond, camera, teacher=None) -> torch.Tensor:
        prior = self.prior
        x_t = add_noise(prior, x, t, eps)
        abar = alphas_at(prior, t, x)
        if prior.prediction_type == "v_prediction":
            target = abar.sqrt() * eps - (1 - abar).sqrt() * x
        elif prior.prediction_type == "sample":
            target = x
        else:
            target = eps
        return torch.nn.functional.mse_loss(self.lora.model_output(x_t, t, cond, camera), target)


def build_fake_score(prior, rank: int, channels: Sequence[int]) -> torch.nn.Module:
    from threedgen.guidance.priors.diffusion.prior import DiffusionPrior

    if isinstance(prior, DiffusionPrior):
        return LoRAScore(prior, rank)
    return PixelFakeScore(prior, channels)
