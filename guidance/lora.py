"""A trainable fake score on a diffusers prior's UNet: a peft LoRA adapter plus an optional camera
embedding, for guidance methods that need one (VSD, ESD; ``fake_score.LoRAScore``).

- **Shared UNet.** The adapter sits on the prior's own UNet (one copy in memory, as threestudio's
  VSD does) and is *disabled* except inside ``predict_noise`` and ``model_output`` here, so the
  frozen teacher's predictions never change.
- **Camera conditioning.** A small MLP (``camera_embedding.CameraTimeEmbedding``) maps the
  flattened camera-to-world matrix ``[N,16]`` to the UNet's time-embedding width and is added to
  the time embedding (a forward hook on ``unet.time_embedding``, active only while the fake score
  runs). A zero matrix is the "no camera" input used for camera dropout and ESD's unconditional
  branch. Its last layer starts at zero and the LoRA's ``B`` matrices start at zero, so an
  untrained fake score predicts exactly what the prior does.
- **Precision.** LoRA and camera weights are fp32 even when the UNet is fp16.
- **Saving.** The LoRA and camera weights are registered as this module's parameters (the UNet
  is not), so a Lightning checkpoint of a module that owns this one includes them.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from threedgen.errors import UserError
from threedgen.guidance.camera_embedding import CameraTimeEmbedding
from threedgen.modules import hold

ADAPTER = "threedgen_fake_score"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class LoRAFakeScore(torch.nn.Module):
    def __init__(self, prior, rank: int = 4, alpha: Optional[float] = None, camera_embedding: bool = True):
        super().__init__()
        try:
            from peft import LoraConfig  # heavy: only when a LoRA fake score is built
        except ImportError:  # pragma: no cover - peft is a dependency
            raise UserError("LoRA needs the peft package: pip install peft") from None
        if not isinstance(rank, int) or not 1 <= rank <= 1024:
            raise UserError(f"LoRA rank must be an integer from 1 to 1024; got {rank!r}")
        hold(self, "prior", prior)
        prior.place()
        unet = prior.unet
        hold(self, "unet", unet)  # the frozen base is not this module's to save
        if ADAPTER in getattr(unet, "peft_config", {}):
            raise UserError("this UNet already carries a threedgen fake-score adapter")
        alpha = float(alpha if alpha is not None else rank)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                    target_modules=list(TARGET_MODULES)), adapter_name=ADAPTER)
        lora = {}
        for name, param in unet.named_parameters():
            if "lora_" in name and ADAPTER in name:
                param.data = param.data.float()
                param.requires_grad_(True)
                lora[name.replace(".", "__")] = param
        self.lora = torch.nn.ParameterDict(lora)
        self.camera_mlp = None
        if camera_embedding:
            self.camera_mlp = CameraTimeEmbedding(unet.time_embedding.linear_2.out_features).to(prior.device)
            self.camera_mlp.attach(unet)
        self._set_adapters(False)

    def _set_adapters(self, on: bool) -> None:
        (self.unet.enable_adapters if on else self.unet.disable_adapters)()
        for param in self.lora.values():  # peft turns requires_grad off with the adapter
            param.requires_grad_(True)

    @contextlib.contextmanager
    def active(self, camera: Optional[torch.Tensor]):
        """Adapter on and ``camera [N,16]`` added to the time embedding, for the duration."""
        self._set_adapters(True)
        try:
            with self.camera_mlp.use(camera) if self.camera_mlp is not None else contextlib.nullcontext():
                yield
        finally:
            self._set_adapters(False)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor],
                      camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fake score's eps (converted from the prior's parameterisation), fp32; with
        gradients to the LoRA and camera weights when grad is enabled."""
        return self.prior.noise.to_eps(self.model_output(x_t, t, cond, camera), x_t, t)

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor],
                     camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The raw prediction in the prior's parameterisation (what the LoRA loss compares)."""
        if camera is None and self.camera_mlp is not None:
            camera = torch.zeros(x_t.shape[0], 16, device=x_t.device)
        # A camera-conditioned prior's UNet (the learned shapes teacher's) gets the camera too, so
        # the untrained fake score starts at the camera-conditioned teacher; others ignore it.
        with self.active(camera):
            return self.prior.unet_output(x_t, t, cond, unet=self.unet, camera=camera)

