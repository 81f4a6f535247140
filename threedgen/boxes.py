"""Integer points of axis-aligned boxes, box by box and in chunks that fit in memory.

Generic geometry shared by the splat rasteriser (pixels under each Gaussian), the Gaussians' mesh
grids (voxels near each Gaussian) and texture baking (texels under each triangle).
"""

from __future__ import annotations

import torch


def chunk_ranges(count: torch.Tensor, max_items: int):
    """Consecutive ranges ``(start, end)`` of boxes whose ``count`` sum to at most ``max_items``
    (a single larger box gets a range of its own), so ``box_points`` fits in memory per range."""
    start, total = 0, 0
    for i, c in enumerate(count.tolist()):
        if total and total + c > max_items:
            yield start, i
            start, total = i, 0
        total += c
    if start < len(count):
        yield start, len(count)


def box_points(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every integer point of the boxes ``lo[m] <= p <= hi[m]`` (``[M,D]``, inclusive; empty where
    ``hi < lo``): ``(owner [P], points [P,D])``, box by box, the last axis fastest."""
    size = (hi - lo + 1).clamp_min(0)
    count = size.prod(-1)
    total = int(count.sum())
    owner = torch.repeat_interleave(torch.arange(len(count), device=lo.device), count, output_size=total)
    local = torch.arange(total, device=lo.device) - (torch.cumsum(count, 0) - count).index_select(0, owner)
    coords = []
    size_t, lo_t = size.T.contiguous(), lo.T.contiguous()  # per-axis rows: 1-D gathers (index_select)
    for axis in reversed(range(lo.shape[1])):
        n = size_t[axis].index_select(0, owner)
        coords.append(lo_t[axis].index_select(0, owner) + local % n)
        local = torch.div(local, n, rounding_mode="floor")
    return owner, torch.stack(coords[::-1], -1)
