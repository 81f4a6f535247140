"""The learned shapes teacher as a prior (``--prior shapes-unet`` / ``shapes-unet-camera``).

It is a diffusers prior like DeepFloyd IF stage I (pixel space, no VAE), loaded through the same
code (``DiffusionPrior``: safetensors only, offline, the LoRA fake score on its UNet), with a CLIP
text encoder. ``encode_images`` resizes renders to the model's 32x32 (antialiased, as the exact
prior does). With ``prior.camera`` the UNet gets each render's camera-to-world matrix; otherwise an
all-zero camera ("none") and view-tagged prompts, the Stable Diffusion setting. ``threedgen eval``
scores its runs against the same truth as the exact prior's.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

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
        self.meta = read_meta(self.source.location)
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

    def camera_labels(self, n: int, views: Optional[Cameras] = None, camera: Optional[torch.Tensor] = None):
        """The UNet's camera input ``[n,16]`` (None for a UNet without one): the views' c2w when
        the prior is camera-conditioned, else zeros; ``camera`` (already flattened, zero rows
        "none") wins when given."""
        if not self.has_camera_input:
            return None
        if camera is not None:
            return camera.reshape(n, -1).to(self.device, torch.float32)
        c2w = views.c2w if (views is not None and self.use_camera) else None
        return arch.camera_labels(c2w, n, self.device)

    def unet_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor], unet=None,
                    views: Optional[Cameras] = None, camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.place()
        unet = self.unet if unet is None else unet
        context = torch.stack([c.to(self.device, self.dtype) for c in cond])
        labels = self.camera_labels(x_t.shape[0], views, camera)
        out = unet(x_t.to(self.dtype), t.to(self.device), encoder_hidden_states=context,
                   class_labels=None if labels is None else labels.to(self.dtype)).sample
        return out[:, :x_t.shape[1]].float()

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[Any],
                      views: Optional[Cameras] = None) -> torch.Tensor:
        return self.noise.to_eps(self.unet_output(x_t, t, cond, views=views), x_t, t)

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
            cond = [self.encode_prompt(p).cond_for(sub[i:i + 1])[0] for i, p in enumerate(prompts[lo:lo + batch])]
            empty = [self.encode_prompt(p).empty for p in prompts[lo:lo + batch]]
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
