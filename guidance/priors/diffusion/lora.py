"""A trainable fake score on a diffusers prior's UNet: a peft LoRA adapter plus an optional camera
embedding, for guidance methods that need one (VSD, ESD).

- **Shared or copied UNet.** By default the adapter sits on the prior's own UNet (one copy in
  memory, as threestudio's VSD does) and is *disabled* except inside ``predict_noise`` here, so
  the frozen teacher's predictions never change. ``share_unet=False`` deep-copies the UNet first.
- **Camera conditioning.** A small MLP (diffusers' ``TimestepEmbedding``) maps the flattened
  camera-to-world matrix ``[N,16]`` to the UNet's time-embedding width and is added to the time
  embedding (a forward hook on ``unet.time_embedding``, active only while the fake score runs).
  A zero matrix is the "no camera" input used for camera dropout and ESD's unconditional branch.
  Its last layer starts at zero and the LoRA's ``B`` matrices start at zero, so an untrained fake
  score predicts exactly what the prior does.
- **Precision.** LoRA and camera weights are fp32 even when the UNet is fp16.
- **Saving.** ``save``/``load`` write and read one safetensors file (LoRA and camera weights, with
  the rank in its metadata). The weights are also registered as this module's parameters, so a
  Lightning checkpoint of a module that owns this one includes them.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Optional, Sequence

import torch

from threedgen.errors import UserError

ADAPTER = "threedgen_fake_score"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
FORMAT = "threedgen-lora-v2"  # v2: camera weights under camera_mlp.mlp.*


class LoRAFakeScore(torch.nn.Module):
    def __init__(self, prior, rank: int = 4, alpha: Optional[float] = None, camera_embedding: bool = True,
                 share_unet: bool = True):
        super().__init__()
        try:
            from peft import LoraConfig
        except ImportError:  # pragma: no cover - peft is a dependency
            raise UserError("LoRA needs the peft package: pip install peft") from None
        from threedgen.guidance.fake_score import CameraTimeEmbedding

        if not isinstance(rank, int) or not 1 <= rank <= 1024:
            raise UserError(f"LoRA rank must be an integer from 1 to 1024; got {rank!r}")
        object.__setattr__(self, "prior", prior)
        prior.place()
        unet = prior.unet if share_unet else copy.deepcopy(prior.unet)
        object.__setattr__(self, "unet", unet)  # the frozen base is not this module's to save
        self.rank, self.alpha, self.shared = rank, float(alpha if alpha is not None else rank), share_unet
        if ADAPTER in getattr(unet, "peft_config", {}):
            raise UserError("this UNet already carries a threedgen fake-score adapter")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=self.alpha, init_lora_weights=True,
                                    target_modules=list(TARGET_MODULES)), adapter_name=ADAPTER)
        lora = {}
        for name, param in unet.named_parameters():
            if "lora_" in name and ADAPTER in name:
                param.data = param.data.float()
                param.requires_grad_(True)
                lora[name.replace(".", "__")] = param
        self.lora = torch.nn.ParameterDict(lora)
        self.camera_mlp = None
        self._hook = None
        if camera_embedding:
            self.camera_mlp = CameraTimeEmbedding(unet.time_embedding.linear_2.out_features).to(prior.device)
            self._hook = self.camera_mlp.attach(unet)
        self._enabled = False
        self._set_adapters(False)

    # ---- switching ---------------------------------------------------------------------------

    def _set_adapters(self, on: bool) -> None:
        (self.unet.enable_adapters if on else self.unet.disable_adapters)()
        for param in self.lora.values():  # peft turns requires_grad off with the adapter
            param.requires_grad_(True)

    def enable(self) -> None:
        """Leave the adapter on (the shared UNet then predicts the fake score, not the prior)."""
        self._enabled = True
        self._set_adapters(True)

    def disable(self) -> None:
        self._enabled = False
        self._set_adapters(False)

    @contextlib.contextmanager
    def active(self, camera: Optional[torch.Tensor]):
        """Adapter on and ``camera [N,16]`` added to the time embedding, for the duration."""
        was = self._enabled
        self._set_adapters(True)
        try:
            with self.camera_mlp.use(camera) if self.camera_mlp is not None else contextlib.nullcontext():
                yield
        finally:
            self._set_adapters(was)

    # ---- prediction --------------------------------------------------------------------------

    @staticmethod
    def camera_input(c2w: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Flattened camera-to-world matrices ``[N,16]``; rows where ``keep`` is False are zero
        (the "no camera" input)."""
        from threedgen.guidance.fake_score import camera_input

        return camera_input(c2w, keep)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor],
                      camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fake score's eps (converted from the prior's parameterisation), fp32; with
        gradients to the LoRA and camera weights when grad is enabled."""
        if camera is None and self.camera_mlp is not None:
            camera = torch.zeros(x_t.shape[0], 16, device=x_t.device)
        with self.active(camera):
            out = self.prior.unet_output(x_t, t, cond, unet=self.unet)
        return self.prior.to_eps(out, x_t, t)

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor],
                     camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The raw prediction in the prior's parameterisation (what the LoRA loss compares)."""
        if camera is None and self.camera_mlp is not None:
            camera = torch.zeros(x_t.shape[0], 16, device=x_t.device)
        with self.active(camera):
            return self.prior.unet_output(x_t, t, cond, unet=self.unet)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.parameters())

    # ---- saving ------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FORMAT, "rank": str(self.rank), "alpha": str(self.alpha),
                "camera_embedding": str(self.camera_mlp is not None)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.lora_state_dict(), str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as exc:
            raise UserError(f"LoRA file {str(path)!r} cannot be read ({type(exc).__name__})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"LoRA file {str(path)!r} was not written by threedgen (format {meta.get('format')!r})")
        mine = {"rank": str(self.rank), "alpha": str(self.alpha), "camera_embedding": str(self.camera_mlp is not None)}
        theirs = {k: meta.get(k) for k in mine}
        if theirs != mine:
            raise UserError(f"LoRA file {str(path)!r} has {', '.join(f'{k} {v}' for k, v in theirs.items())}; "
                            f"this fake score has {', '.join(f'{k} {v}' for k, v in mine.items())}")
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"LoRA file {str(path)!r} does not match this UNet "
                            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")

    def remove(self) -> None:
        """Take the adapter and the camera hook off the UNet (the prior is then as loaded)."""
        if self._hook is not None:
            self._hook.remove()
        self.unet.delete_adapters(ADAPTER)
