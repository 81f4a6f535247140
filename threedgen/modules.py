"""Helpers for torch modules."""

from __future__ import annotations

from typing import Any

import torch


def hold(owner: torch.nn.Module, name: str, value: Any) -> None:
    """Set ``owner.<name> = value`` without registering ``value`` as a submodule.

    For a module that ``owner`` uses but does not own (the frozen, shared prior; the UNet a LoRA
    adapts): its weights are then not saved or loaded with ``owner``'s state dict, not moved by
    ``owner.to(...)``, and not counted in ``owner.parameters()``. A plain assignment of a
    ``torch.nn.Module`` would register it.
    """
    object.__setattr__(owner, name, value)
