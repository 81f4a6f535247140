"""Guidance methods, one file each; their settings and registry are in ``config.py`` (torch-free,
so importing this package costs nothing until a method is built)."""

from __future__ import annotations

from threedgen.guidance.config import GUIDANCE

__all__ = ["GUIDANCE"]
