"""The camera input of the fake scores (``fake_score.py``, ``lora.py``): the flattened
camera-to-world matrix ``[N,16]`` (zero: "no camera", for camera dropout and ESD's camera-free
branch), mapped by a small MLP to an offset on a UNet's time embedding. The MLP's last layer starts
at zero, so an untrained embedding leaves the UNet's prediction unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


class CameraTimeEmbedding(torch.nn.Module):
    """Flattened camera-to-world matrix ``[N,16]`` -> an offset added to a UNet's time embedding
    (a forward hook on ``unet.time_embedding``, active only inside ``use``). Last layer at zero."""

    def __init__(self, width: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding  # heavy: only when a fake score is built

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
