"""Stable Diffusion 1.x/2.x as a prior: latent space through the VAE.

``encode_images`` resizes the render to the model's resolution (64 -> 512 for SD 2.1-base, as
threestudio and stable-dreamfusion do), maps it to [-1, 1] and encodes it with the VAE, keeping
the graph so the guidance gradient reaches the render; the latent is a posterior sample scaled by
the VAE's ``scaling_factor``. eps- and v-prediction models both work (``prediction_type`` comes
from the model's scheduler config).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from threedgen.guidance.priors.diffusion.prior import DiffusionPrior
from threedgen.guidance.priors.diffusion.source import load_component


class StableDiffusionPrior(DiffusionPrior):
    @staticmethod
    def text_classes():
        from transformers import CLIPTextModel, CLIPTokenizer  # heavy: only when the prior is built

        return CLIPTokenizer, CLIPTextModel

    def _load_image_model(self) -> None:
        from diffusers import AutoencoderKL  # heavy: only when the prior is built

        self.vae = load_component(self.source, AutoencoderKL, "vae", self.variant, torch_dtype=self.dtype)
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.resolution = int(self.unet.config.sample_size) * self.latent_scale

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self._text_encoder_module()(tok.input_ids.to(self.device))[0]

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """rgb ``[B,3,H,W]`` in [0,1] -> latents ``[B,4,R/f,R/f]`` (fp32), differentiable."""
        self.place()
        size = self.resolution
        if rgb.shape[-2:] != (size, size):
            rgb = F.interpolate(rgb, (size, size), mode="bilinear", align_corners=False)
        posterior = self.vae.encode((rgb * 2 - 1).to(self.dtype)).latent_dist
        return (posterior.sample() * self.scaling_factor).float()
