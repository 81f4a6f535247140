"""Entropic Score Distillation (Wang et al. 2024, "Taming Mode Collapse in Score Distillation for
Text-to-3D Generation", eq. 11; official: VITA-Group/3D-Mode-Collapse, which runs threestudio's VSD
with ``guidance_scale_lora = 1 - lambda``):

    e_est = (1 - lambda) e_fake(x_t, t, y, camera) + lambda e_fake(x_t, t, y, camera = 0)
    g = w(t) * (eps_cfg(x_t, t) - e_est)

The camera-free branch estimates the score of the marginal distribution of renders, whose
gradient is the entropy term that counters mode collapse (the Janus problem). It is only
meaningful when the fake score is trained with camera dropout, so ``camera_dropout`` must be > 0
(threestudio's unified guidance silently defaults it off); as there, it drops the camera of the
whole batch at once (``vsd.py``). ``entropy_weight`` 0 is VSD exactly;
the README's example is 0.5. Everything else is VSD (``vsd.py``).
"""

from __future__ import annotations

from threedgen.guidance.config import ESDConfig
from threedgen.guidance.vsd import VSD


class ESD(VSD):
    def __init__(self, cfg: ESDConfig, prior):
        super().__init__(cfg, prior)
        self.entropy_weight = cfg.entropy_weight
