"""A prior with known, deterministic predictions, for checking guidance formulas."""

import torch

from threedgen.guidance.priors.base import Prior, PromptEmbeds, sd_alphas_cumprod
from threedgen.noise import NoiseSchedule


class MockPrior(Prior):
    """eps(x_t, t, cond) = k_cond * x_t + b_cond + t / 1000, with (k, b) per conditioning string."""

    COEFS = {"cond": (0.3, 0.1), "uncond": (-0.2, 0.05), "empty": (0.1, -0.3)}

    def __init__(self, resolution: int = 8):
        super().__init__()
        self.resolution = resolution
        self.noise = NoiseSchedule(sd_alphas_cumprod())
        self.calls = 0

    def encode_prompt(self, prompt, negative_prompt=""):
        return PromptEmbeds(prompt, negative_prompt, "cond", "uncond", "empty")

    def encode_images(self, rgb):
        return rgb * 2 - 1

    def predict_noise(self, x_t, t, cond, views=None):
        self.calls += 1
        k = torch.tensor([self.COEFS[c][0] for c in cond], dtype=x_t.dtype).view(-1, 1, 1, 1)
        b = torch.tensor([self.COEFS[c][1] for c in cond], dtype=x_t.dtype).view(-1, 1, 1, 1)
        return k * x_t + b + t.view(-1, 1, 1, 1).to(x_t.dtype) / 1000
