"""Two renders of one scene by two rasterisers: close enough? The gate of the CUDA rasteriser tests
and of benchmarks/gpu_check.sh's image-error step (benchmarks/gpu_image_error.py).

gsplat is compiled with ``-use_fast_math``: a Gaussian whose alpha sits within ~1e-5 of the 1/255
cut, or a pixel whose transmittance sits at the 1e-4 stop, is kept by one side and dropped by the
other, and shifts that pixel by up to a few 1e-3. So the gate bounds the mean difference and the
share of values over a tolerance, not the single largest difference (which it reports)."""

from __future__ import annotations

import torch

# The image-error step's gate: mean |diff| under MEAN_ATOL, and at most MAX_OUTLIER_SHARE of the
# values (colour and alpha) more than ATOL apart.
ATOL, MEAN_ATOL, MAX_OUTLIER_SHARE = 1e-3, 1e-5, 5e-4


def agreement(mine: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL, mean_atol: float = MEAN_ATOL,
              max_outlier_share: float = MAX_OUTLIER_SHARE) -> dict:
    """How closely two renders agree: ``max_abs``, ``mean_abs``, ``outliers`` (values more than
    ``atol`` apart), ``values`` and ``ok`` (mean under ``mean_atol`` and at most
    ``max_outlier_share`` of the values outliers). Non-finite values count as outliers."""
    diff = (mine.detach().double() - theirs.detach().double()).abs().flatten().cpu()
    diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
    finite = diff[torch.isfinite(diff)]
    outliers = int((diff > atol).sum())
    mean_abs = float(finite.mean()) if finite.numel() else float("inf")
    values = int(diff.numel())
    ok = values > 0 and finite.numel() == values and mean_abs < mean_atol and outliers <= max_outlier_share * values
    return {"max_abs": float(diff.max()) if values else 0.0, "mean_abs": mean_abs, "outliers": outliers,
            "values": values, "atol": atol, "mean_atol": mean_atol, "max_outlier_share": max_outlier_share,
            "ok": bool(ok)}
