"""Deterministic DDIM steps in either direction, for the inversion-based methods (ISM/TSM, CSM).

    x0_hat = (x_k - s_k e) / a_k,     x_k' = a_k' x0_hat + s_k' e          (eta = 0)

with ``e`` the prior's eps at ``(x_k, k)`` (the step itself is ``prior.noise.ddim_step``). With
``k' > k`` this is DDIM *inversion* (LucidDreamer's ``ddim_step`` called with a negative delta).
All items of a batch share one timestep.
"""

from __future__ import annotations

import torch

from threedgen.cameras import Cameras


def ddim_invert(prior, x: torch.Tensor, k_from: int, k_to: int, stride: int, cond: list,
                views: Cameras) -> tuple[torch.Tensor, int]:
    """Invert ``x`` (at timestep ``k_from``) up to ``k_to`` in steps of at most ``stride``,
    using the prior's eps with ``cond`` (the empty prompt in ISM). Returns (x at k_to, prior calls)."""
    calls = 0
    cur = k_from
    while cur < k_to:
        nxt = min(cur + stride, k_to)
        t = torch.full((x.shape[0],), cur, dtype=torch.long, device=x.device)
        x = prior.noise.ddim_step(x, prior.predict_noise(x, t, cond, views), cur, nxt)
        calls += 1
        cur = nxt
    return x, calls
