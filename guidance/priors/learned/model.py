"""The learned shapes teacher's architecture: a small pixel-space diffusers pipeline.

- **Tokenizer**: a CLIP byte-level BPE tokenizer whose vocabulary is the shapes world's words (colours,
  shapes, synonyms, articles, view tags), each one token, built by ``tokenizers`` on the fly.
- **Text encoder**: a 2-layer ``CLIPTextModel`` (width 64), trained with the UNet.
- **UNet**: a ``UNet2DConditionModel`` on 32x32 RGB in [-1, 1] (three levels, 32/64/128 channels,
  cross-attention at 16x16 and 8x8), epsilon prediction. Camera input: ``class_embed_type=
  "projection"`` on the flattened camera-to-world matrix ``[N,16]`` (the convention of
  ``camera_embedding.camera_input``); an all-zero matrix means "no camera" (the text-only mode).
- **Scheduler**: ``DDPMScheduler`` with Stable Diffusion's scaled-linear betas, so its
  ``alphas_cumprod`` equals the exact prior's.

The folder's ``threedgen.json`` records the camera convention (``camera``), the training settings
and the SHA-256 of every weight file, which the prior checks before it loads anything.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from threedgen.guidance.priors.base import VIEW_TAGS
from threedgen.guidance.priors.shapes.vocab import COLOUR_SYNONYMS, COLOURS, FILLER, SHAPE_SYNONYMS, SHAPES

PIPELINE_CLASS = "ThreedgenShapesPipeline"  # model_index.json's _class_name for these folders
RESOLUTION = 32
MAX_TOKENS = 24
CAMERA = {"input": "c2w", "dim": 16, "none": "zeros"}  # what threedgen.json's "camera" says
WORLD_WORDS = tuple(dict.fromkeys(
    list(COLOURS) + list(COLOUR_SYNONYMS) + list(SHAPES) + list(SHAPE_SYNONYMS) + sorted(FILLER)
    + list(VIEW_TAGS) + ["view"]))


def clip_tokenizer(words: Sequence[str], max_length: int = 77):
    """A byte-level BPE CLIP tokenizer (``</w>`` end-of-word suffix) whose merges spell each of
    ``words`` left to right, with every byte and its end-of-word form in the vocabulary, so any
    text tokenizes. Built by rule, not trained: the same words always give the same tokenizer
    (the ``tokenizers`` BPE trainer breaks ties in hash order, which differs between runs)."""
    from tokenizers import pre_tokenizers  # heavy: only when a tokenizer is built
    from transformers import CLIPTokenizer  # heavy: only when a tokenizer is built

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            if (current, nxt) not in merges:
                merges.append((current, nxt))
            current += nxt
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_components(seed: int = 0):
    """(tokenizer, text encoder, UNet, scheduler) with fresh weights from ``seed``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel  # heavy: only when the model is built
    from transformers import CLIPTextConfig, CLIPTextModel  # heavy: only when the model is built

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORLD_WORDS, max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
        class_embed_type="projection", projection_class_embeddings_input_dim=CAMERA["dim"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, steps_offset=1, clip_sample=False, prediction_type="epsilon")
    return tokenizer, text_encoder, unet, scheduler


def unet_has_camera(unet) -> bool:
    return getattr(unet.config, "class_embed_type", None) == "projection"


def encode_texts(tokenizer, text_encoder, texts: Sequence[str]) -> torch.Tensor:
    """``[len(texts), MAX_TOKENS, width]`` last hidden states (lower-cased, as the prior does)."""
    tok = tokenizer([t.lower().strip() for t in texts], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    return text_encoder(tok.input_ids.to(device))[0]


def camera_labels(c2w: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    """The UNet's camera input ``[n,16]``: flattened c2w, or zeros for "no camera"."""
    if c2w is None:
        return torch.zeros(n, CAMERA["dim"], device=device)
    return c2w.reshape(c2w.shape[0], 16).float().to(device)
