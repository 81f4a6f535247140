"""The learned shapes teacher as a prior (``--prior shapes-unet`` / ``shapes-unet-camera``).

It is a diffusers prior like DeepFloyd IF stage I (pixel space, no VAE), loaded through the same
code (``DiffusionPrior``: safetensors only, offline, the LoRA fake score on its UNet), with a CLIP
text encoder. ``encode_images`` resizes renders to the model's 32x32 (antialiased, as the exact
prior does). With ``prior.camera`` the UNet gets each render's camera-to-world matrix; otherwise an
all-zero camera ("none") and view-tagged prompts, the Stable Diffusion setting. ``threedgen eval``
scores its runs against the same truth as the exact prior's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from threedgen.cameras import Cameras
from threedgen.guidance.priors.diffusion.prior import DiffusionPrior
from threedgen.guidance.priors.learned import model as arch
from threedgen.guidance.priors.learned.folder import read_meta
from threedgen.guidance.priors.shapes.prior import ShapesPrior


class ShapesUNetPrior(DiffusionPrior):
    @staticmethod
    def text_classes():
        from transformers import CLIPTextModel, CLIPTokenizer  # heavy: only when the prior is built

        return CLIPTokenizer, CLIPTextModel

    def _load_image_model(self) -> None:
        read_meta(self.source.location)  # the weights' hashes and camera settings, checked (cached)
        self.resolution = int(self.unet.config.sample_size)
        self.has_camera_input = arch.unet_has_camera(self.unet)
        self.use_camera = bool(self.cfg.camera) and self.has_camera_input

    @property
    def camera_conditioned(self) -> bool:
        return self.use_camera

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return arch.encode_texts(self.tokenizer, self._text_encoder_module(), texts)

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        size = self.resolution
        if rgb.shape[-2:] != (size, size):
            rgb = F.interpolate(rgb, (size, size), mode="bilinear", align_corners=False, antialias=True)
        return rgb.float() * 2 - 1

    def class_labels(self, n: int, views: Optional[Cameras] = None, camera: Optional[torch.Tensor] = None):
        """The UNet's camera input ``[n,16]`` (None for a UNet without one): zeros ("no camera")
        unless the prior is camera-conditioned; then ``camera`` (already flattened, as the LoRA
        fake score passes it) or else the views' c2w."""
        if not self.has_camera_input:
            return None
        if self.use_camera and camera is not None:
            return camera.reshape(n, -1).to(self.device, torch.float32)
        return arch.camera_labels(views.c2w if (views is not None and self.use_camera) else None, n, self.device)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], views: Cameras, guidance_scale: float = 3.0, steps: int = 50,
               seed: int = 0, batch: int = 64) -> torch.Tensor:
        """DDIM (eta 0, ``steps`` steps) samples ``[N,3,R,R]`` in [0,1], one per (prompt, view):
        classifier-free guidance over the text, the empty prompt as the unconditional branch (the
        camera, when the prior uses it, stays in both branches, as MVDream's). Text-only, each
        view's tag picks the view-tagged prompt."""
        from diffusers import DDIMScheduler  # heavy: only when sampling

        scheduler = DDIMScheduler.from_pretrained(self.source.location, subfolder="scheduler")
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        out = []
        for lo in range(0, len(prompts), batch):
            sub = views[lo:lo + batch]
            embeds = [self.encode_prompt(p) for p in prompts[lo:lo + batch]]
            cond = [e.cond_for(sub[i:i + 1])[0] for i, e in enumerate(embeds)]
            empty = [e.empty for e in embeds]
            x = torch.randn(len(cond), 3, self.resolution, self.resolution, generator=g).to(self.device)
            both = sub.cat(sub)
            for t in scheduler.timesteps:
                tt = torch.full((2 * len(cond),), int(t), device=self.device)
                e_c, e_u = self.predict_noise(torch.cat([x, x]), tt, cond + empty, both).chunk(2)
                x = scheduler.step(e_u + guidance_scale * (e_c - e_u), t, x).prev_sample
            out.append(((x + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    @classmethod
    def truth(cls, prompt: str):
        return ShapesPrior.truth(prompt)
