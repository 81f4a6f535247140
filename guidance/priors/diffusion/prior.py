"""What Stable Diffusion and DeepFloyd IF share as priors: loading, text encoding (once per
prompt, cached in memory), view-dependent prompting, and one batched UNet call per guidance step
with the model's prediction converted to eps (``prior.noise.to_eps``).

Precision: fp16 weights on CUDA, fp32 on CPU (``prior.dtype``). The UNet's inputs are cast to the
weights' dtype and its outputs back to fp32, so guidance arithmetic is always fp32. Attention
uses PyTorch's scaled-dot-product kernels (diffusers' ``*2_0`` processors, its default on
torch 2), which pick flash / memory-efficient attention on CUDA.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch

from threedgen.cameras import Cameras
from threedgen.errors import RunFailed, UserError
from threedgen.guidance.priors.base import VIEW_TAGS, Prior, PromptEmbeds
from threedgen.guidance.priors.config import DiffusionPriorConfig
from threedgen.guidance.priors.diffusion.source import load_component
from threedgen.noise import PREDICTION_TYPES, NoiseSchedule

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}




@contextlib.contextmanager
def out_of_memory(model: str):
    """A CUDA out-of-memory error while placing weights becomes one line that says what to try."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise RunFailed(f"out of GPU memory loading {model!r}; free the GPU, use a smaller model "
                        "(e.g. --prior stable-diffusion), or a GPU with more memory") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError("prior.dtype=float16 needs a CUDA device; on CPU use float32 (the default) or bfloat16")
    return dtype


class DiffusionPrior(Prior):
    """Base of the diffusers priors. Subclasses load their image side (``_load_image_model``) and
    implement ``encode_images`` and ``_encode_texts``."""

    supports_lora = True

    @staticmethod
    def text_classes():
        """(tokenizer class, text encoder class) from transformers."""
        raise NotImplementedError

    def __init__(self, cfg: DiffusionPriorConfig, device: torch.device | str = "cpu"):
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DConditionModel  # heavy: only when the prior is built

        self.cfg = cfg  # checked once, with the whole run's config (threedgen.config.merge)
        device = torch.device(device)
        self.dtype = resolve_dtype(cfg.dtype, device)
        self.variant = "fp16" if self.dtype == torch.float16 else None  # half the download where it exists
        self.source = cfg.source()
        scheduler = load_component(self.source, DDPMScheduler, "scheduler")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"model {cfg.model!r}: unsupported prediction type {prediction_type!r}")
        self.noise = NoiseSchedule(scheduler.alphas_cumprod.float().clone().to(device), prediction_type)
        # Loaded in the run's dtype but kept on the CPU until the prompt is encoded: the text
        # encoder (T5-XXL for IF: 9.5 GB in fp16) then has the GPU to itself and is freed.
        self.unet = load_component(self.source, UNet2DConditionModel, "unet", self.variant, torch_dtype=self.dtype)
        self._load_image_model()
        self.tokenizer = load_component(self.source, self.text_classes()[0], "tokenizer")
        self.text_encoder = None
        self.text_encoder_loads = 0  # how often the text encoder was loaded (released after use)
        self.text_encoder_calls = 0  # how many batches it encoded
        self._prompt_cache: dict[tuple, PromptEmbeds] = {}
        self._placed = device.type == "cpu"
        self.requires_grad_(False).eval()

    def place(self) -> None:
        """Move the image-side weights (UNet, VAE) to the run's device, once."""
        if self._placed:
            return
        with out_of_memory(self.cfg.model):
            self.unet.to(self.device)
            if getattr(self, "vae", None) is not None:
                self.vae.to(self.device)
            if self.device.type == "cuda" and self.cfg.channels_last:
                self.unet.to(memory_format=torch.channels_last)
        self._placed = True

    # ---- model discovery ---------------------------------------------------------------------

    @classmethod
    def build(cls, cfg, device: torch.device) -> "DiffusionPrior":
        return cls(cfg, device)

    def _load_image_model(self) -> None:
        """Load what turns images into model space (the VAE for latent models)."""

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # ---- text --------------------------------------------------------------------------------

    def _text_encoder_module(self):
        if self.text_encoder is None:
            encoder = load_component(self.source, self.text_classes()[1], "text_encoder", self.variant, dtype=self.dtype)
            with out_of_memory(self.cfg.model):
                self.text_encoder = encoder.to(self.device).requires_grad_(False).eval()
            self.text_encoder_loads += 1
        return self.text_encoder

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), L, D]`` hidden states of the text encoder."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        """Encoded once per (prompt, negative prompt) and kept in memory; every view variant in
        the same text-encoder batch."""
        cfg = self.cfg
        key = (prompt, negative_prompt, cfg.view_dependent_prompting, cfg.perp_neg, cfg.front_threshold,
               cfg.back_threshold, cfg.overhead_threshold)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        texts = [prompt, negative_prompt, ""]
        if cfg.view_dependent_prompting:
            texts += [f"{prompt}, {tag} view" for tag in VIEW_TAGS]
        unique = list(dict.fromkeys(texts))
        hidden = self._encode_texts(unique)
        self.text_encoder_calls += 1
        if not cfg.keep_text_encoder:
            self.text_encoder = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        by_text = {text: hidden[i] for i, text in enumerate(unique)}
        embeds = PromptEmbeds(
            prompt, negative_prompt, cond=by_text[prompt], uncond=by_text[negative_prompt], empty=by_text[""],
            by_view={tag: by_text[f"{prompt}, {tag} view"] for tag in VIEW_TAGS} if cfg.view_dependent_prompting else {},
            view_thresholds=(cfg.front_threshold, cfg.back_threshold, cfg.overhead_threshold), perp_neg=cfg.perp_neg)
        self._prompt_cache[key] = embeds
        self.place()
        return embeds

    # ---- noise prediction --------------------------------------------------------------------

    def class_labels(self, n: int, views: Optional[Cameras] = None, camera: Optional[torch.Tensor] = None):
        """The UNet's ``class_labels`` for ``n`` items: None for text-only models (Stable Diffusion,
        IF); a camera-conditioned prior builds its camera input here from ``views`` or from an
        already flattened ``camera [n,16]`` (the LoRA fake score's)."""
        return None

    def unet_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[torch.Tensor], unet=None,
                    views: Optional[Cameras] = None, camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The UNet's raw prediction (the model's own parameterisation, learned-variance channels
        dropped), fp32, for one conditioning per item (and the camera, where the UNet takes one)."""
        self.place()
        unet = self.unet if unet is None else unet
        context = torch.stack([c.to(self.device, self.dtype) for c in cond])
        labels = self.class_labels(x_t.shape[0], views, camera)
        out = unet(x_t.to(self.dtype), t.to(self.device), encoder_hidden_states=context,
                   class_labels=None if labels is None else labels.to(self.dtype)).sample
        return out[:, :x_t.shape[1]].float()

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[Any],
                      views: Optional[Cameras] = None) -> torch.Tensor:
        """eps for ``x_t [N,C,h,w]`` at integer ``t [N]``; ``cond``: N text embeddings. Camera
        poses are used only by a UNet that takes a camera (``class_labels``); Stable Diffusion
        and IF are text-only."""
        return self.noise.to_eps(self.unet_output(x_t, t, cond, views=views), x_t, t)
