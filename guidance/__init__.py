"""Guidance methods (one file each) and their registry: name -> (config dataclass, class)."""

from __future__ import annotations

from threedgen.guidance.asd import ASD, ASDConfig
from threedgen.guidance.bsd import BSD, BSDConfig
from threedgen.guidance.csm import CSM, CSMConfig
from threedgen.guidance.esd import ESD, ESDConfig
from threedgen.guidance.sds import SDS, SDSConfig
from threedgen.guidance.tsm import TSM, ISMConfig, TSMConfig
from threedgen.guidance.vsd import VSD, VSDConfig

GUIDANCE = {
    "sds": (SDSConfig, SDS),
    "vsd": (VSDConfig, VSD),
    "esd": (ESDConfig, ESD),
    "asd": (ASDConfig, ASD),
    "tsm": (TSMConfig, TSM),
    "ism": (ISMConfig, TSM),
    "bsd": (BSDConfig, BSD),
    "csm": (CSMConfig, CSM),
}

# Paper and teacher passes per step (per view), for `threedgen guidance list`.
GUIDANCE_INFO = {
    "sds": ("DreamFusion (Poole et al. 2022)", "2: cond + uncond in one call (4 with Perp-Neg)"),
    "vsd": ("ProlificDreamer (Wang et al. 2023)", "2 + fake score: 1 fwd and 1 fwd/bwd (LoRA); pixel priors +1 teacher"),
    "esd": ("Taming Mode Collapse (Wang et al. 2024)", "as VSD + 1 fake-score fwd (camera-free branch)"),
    "asd": ("ScaleDreamer (Ma et al. 2024)", "3: cond, uncond, cond at t+dt in one call"),
    "tsm": ("Dreamer XL (Miao et al. 2024)", "ceil(s/200) inversion + 1 + 3 (target at mu with CFG)"),
    "ism": ("LucidDreamer (Liang et al. 2024)", "ceil(s/200) inversion + 1 + 2"),
    "bsd": ("PlacidDreamer (Huang et al. 2024)", "2: cond + uncond in one call"),
    "csm": ("TV-3DG (2024), after CSD (Yu et al. 2024)", "ceil(t/200) inversion + 2"),
}
