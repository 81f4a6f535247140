"""The embedded ``shapes`` prior: an exact diffusion model of coloured primitive shapes."""
