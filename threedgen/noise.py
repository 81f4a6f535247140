"""A diffusion model's noise schedule and the algebra every guidance method shares.

Notation (DDPM/DDIM, as in diffusers' ``DDIMScheduler``): ``abar_t = alphas_cumprod[t]``,
``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``.

    x_t = a_t x + s_t eps                                    (add_noise, the forward process)
    v   = a_t eps - s_t x                                    (the v-prediction target)
    eps = a_t v + s_t x_t      from a v prediction           (to_eps)
    eps = (x_t - a_t x0) / s_t from an x0 ("sample") prediction
    x_k' = a_k' x0_hat + s_k' e,  x0_hat = (x_k - s_k e) / a_k   (ddim_step, eta = 0)

A model predicts in one of three parameterisations (``prediction_type``): ``epsilon``,
``v_prediction`` or ``sample`` (x0). Guidance arithmetic is always in eps: a prior converts its
model's output with ``to_eps``, and a network trained in the model's own parameterisation (the
LoRA fake score) is trained against ``target``.

A torch module only so that ``alphas_cumprod`` (a non-persistent buffer: never in a state dict)
follows its owner's ``.to(device)``.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule(torch.nn.Module):
    """``alphas_cumprod [T]`` and the parameterisation of a model trained on it."""

    alphas_cumprod: torch.Tensor

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def alphas_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` for integer ``t [B]``, shaped to broadcast against ``like [B,...]`` and on its device."""
        return self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_t = a_t x + s_t eps``."""
        abar = self.alphas_at(t, x)
        return abar.sqrt() * x + (1 - abar).sqrt() * eps

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps = (x_t - a_t x0) / s_t``, in ``x_t``'s dtype."""
        abar = self.alphas_at(t, x_t).to(x_t.dtype)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's prediction at ``(x_t, t)`` as eps, in ``model_output``'s dtype."""
        if self.prediction_type == "epsilon":
            return model_output
        x_t = x_t.to(model_output.dtype)
        if self.prediction_type == "sample":
            return self.eps_from_x0(model_output, x_t, t)
        abar = self.alphas_at(t, x_t)
        return abar.sqrt() * model_output + (1 - abar).sqrt() * x_t

    def target(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a model of this parameterisation should predict for ``x_t = add_noise(x, t, eps)``:
        eps, ``v = a_t eps - s_t x``, or x."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x
        abar = self.alphas_at(t, x)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, k_from: int, k_to: int) -> torch.Tensor:
        """One deterministic DDIM step (eta = 0) of a whole batch from timestep ``k_from`` to
        ``k_to``, with ``eps`` the prediction at ``(x, k_from)``; ``k_to > k_from`` inverts."""
        abar = self.alphas_cumprod.to(x.device)
        a_from, a_to = abar[k_from], abar[k_to]
        x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
