"""Rendering a representation for people: views as uint8 images (previews, turntables, the
eval's masks) and PNG files. Used by training callbacks, export and eval alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from threedgen.cameras import Cameras
from threedgen.rundir import atomic_path


def representation_device(representation) -> torch.device:
    """Where a representation's parameters live (the CPU for one without parameters)."""
    first = next(iter(representation.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def render_views(representation, cameras: Cameras, size: int, chunk: int = 4,
                 quantise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``rgb [N,H,W,3]`` uint8 (float in [0,1] when not ``quantise``) and ``alpha [N,H,W]`` float of
    the representation in eval mode."""
    was_training = representation.training
    representation.eval()
    cameras = cameras.to(representation_device(representation))
    rgbs, alphas = [], []
    try:
        for i in range(0, len(cameras), chunk):
            out = representation.render(cameras[i:i + chunk], size, size)
            rgbs.append(out.rgb.clamp(0, 1).cpu())
            alphas.append(out.alpha[..., 0].cpu())
    finally:
        representation.train(was_training)
    rgb = torch.cat(rgbs).numpy()
    return ((rgb * 255).round().astype(np.uint8) if quantise else rgb), torch.cat(alphas).numpy()


def write_image(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
