"""Tiny diffusers pipelines built from configs with random weights, saved in the layout users
download (``model_index.json`` + one folder per component, safetensors), so that tests load them
through the same ``from_pretrained`` code path as a real Stable Diffusion or DeepFloyd IF model.

Nothing here touches the network: the tokenizers are built on the fly.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

WORDS = ("a hamburger red blue green cube torus sphere front side back overhead view photo of "
         "the dog cat chair blurry low quality").split()


def clip_tokenizer(max_length: int = 77):
    """A byte-level BPE CLIP tokenizer trained on a few words (``</w>`` end-of-word suffix)."""
    from threedgen.guidance.priors.learned.model import clip_tokenizer as build

    return build(WORDS, max_length=max_length)


def t5_tokenizer(max_length: int = 77):
    """A unigram T5 tokenizer over single characters and a few words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",.!?'-"]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_lowercase]
    pieces += [("\u2581", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _scheduler_kwargs(prediction_type: str) -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                steps_offset=1, clip_sample=False, prediction_type=prediction_type)


def build_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0,
                  sample_size: int = 32, safe_serialization: bool = True, variant: str | None = None) -> Path:
    """A Stable-Diffusion-layout pipeline: VAE with downsampling factor 2, so the model resolution
    is ``2 * sample_size`` (64 by default)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=2 * sample_size)
    scheduler = DDPMScheduler(**_scheduler_kwargs(prediction_type))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
    return folder


def build_tiny_if(folder: str | Path, seed: int = 0) -> Path:
    """A DeepFloyd-IF-stage-I-layout pipeline: pixel space 32x32, T5 encoder, learned variance
    (6 output channels), cosine schedule."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37,
                                           num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        act_fn="gelu", class_embed_type=None)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                              prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95,
                              sample_max_value=1.5, clip_sample=True, clip_sample_range=1.0)
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def load_prior(folder, **overrides):
    """A diffusers prior loaded the way the CLI loads it: --prior FOLDER -> resolve -> build, on the CPU."""
    from threedgen.guidance.priors import PRIORS, build_prior, resolve_prior

    choice = resolve_prior(str(folder), False)
    cfg = PRIORS[choice.name].config(model=choice.model, **overrides)
    return build_prior(cfg, torch.device("cpu"))
