"""Representations, one file each; their settings and registry are in ``config.py`` (torch-free)."""

from __future__ import annotations

from threedgen.representations.config import REPRESENTATIONS

__all__ = ["REPRESENTATIONS"]
