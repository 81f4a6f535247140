"""Priors built on diffusers models: Stable Diffusion 1.x/2.x and DeepFloyd IF stage I."""
