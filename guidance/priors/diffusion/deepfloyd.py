"""DeepFloyd IF stage I as a prior: pixel space at 64x64, a T5 text encoder.

``encode_images`` resizes the render to the model's resolution and maps it to [-1, 1]; there is
no VAE. The UNet predicts eps and a learned variance (6 channels); the variance is dropped.
Prompts are lower-cased and stripped (IF's own caption cleaning needs extra packages and only
normalises punctuation and URLs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from threedgen.guidance.priors.diffusion.prior import DiffusionPrior


class DeepFloydPrior(DiffusionPrior):
    max_text_tokens = 77  # as IF's pipeline

    @staticmethod
    def text_classes():
        from transformers import T5EncoderModel, T5Tokenizer  # heavy: only when the prior is built

        return T5Tokenizer, T5EncoderModel

    def _load_image_model(self) -> None:
        self.resolution = int(self.unet.config.sample_size)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer([t.lower().strip() for t in texts], padding="max_length", max_length=self.max_text_tokens,
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        encoder = self._text_encoder_module()
        return encoder(tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))[0]

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """rgb ``[B,3,H,W]`` in [0,1] -> pixels in [-1, 1] at the model's resolution (fp32)."""
        self.place()
        size = self.resolution
        if rgb.shape[-2:] != (size, size):
            rgb = F.interpolate(rgb, (size, size), mode="bilinear", align_corners=False)
        return rgb.float() * 2 - 1
