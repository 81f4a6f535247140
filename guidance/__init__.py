"""Guidance methods (one file each) and their registry: name -> (config dataclass, class)."""

from __future__ import annotations

from threedgen.guidance.sds import SDS, SDSConfig

GUIDANCE = {
    "sds": (SDSConfig, SDS),
}

# Paper and teacher passes per step, for `threedgen guidance list`.
GUIDANCE_INFO = {
    "sds": ("DreamFusion (Poole et al. 2022)", "2 (cond + uncond, one batched call)"),
}
