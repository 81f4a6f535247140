"""The LoRA fake score on a diffusers prior's UNet: exact at start, trainable, the teacher
untouched."""

import pytest
import torch
from tiny_diffusers import load_prior

from threedgen.errors import UserError
from threedgen.guidance.camera_embedding import camera_input
from threedgen.guidance.lora import LoRAFakeScore


@pytest.fixture
def prior(tiny_sd_dir):
    return load_prior(tiny_sd_dir)


def _inputs(prior):
    embeds = prior.encode_prompt("a red cube")
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([30, 600])
    c2w = torch.eye(4).expand(2, 4, 4).clone()
    c2w[:, :3, 3] = torch.tensor([[0.0, 0.5, 2.0], [1.5, 0.5, -1.0]])
    return x, t, [embeds.cond, embeds.cond], c2w


def _train(lora, x, t, cond, camera, steps=3):
    opt = torch.optim.Adam(lora.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (lora.model_output(x, t, cond, camera) - 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_untrained_fake_score_equals_the_prior_and_training_moves_only_it(prior):
    x, t, cond, c2w = _inputs(prior)
    teacher = prior.predict_noise(x, t, cond)
    lora = LoRAFakeScore(prior, rank=4)
    cam = camera_input(c2w)
    assert cam.shape == (2, 16)
    torch.testing.assert_close(lora.predict_noise(x, t, cond, cam), teacher, rtol=0, atol=0)
    names = [n for n, _ in lora.named_parameters()]
    assert any("lora_A" in n for n in names) and any("camera_mlp" in n for n in names)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora.parameters())
    _train(lora, x, t, cond, cam)
    fake = lora.predict_noise(x, t, cond, cam)
    assert (fake - teacher).abs().max() > 1e-3
    # the shared UNet still predicts the frozen teacher outside the fake score
    torch.testing.assert_close(prior.predict_noise(x, t, cond), teacher, rtol=0, atol=0)
    # the camera matters once trained: dropping it (zero input) changes the prediction
    dropped = lora.predict_noise(x, t, cond, camera_input(c2w, keep=torch.tensor([False, False])))
    assert (dropped - fake).abs().max() > 1e-6


def test_bad_rank_and_a_second_adapter_are_user_errors(prior):
    with pytest.raises(UserError, match="rank"):
        LoRAFakeScore(prior, rank=0)
    LoRAFakeScore(prior, rank=4)
    with pytest.raises(UserError, match="already carries"):
        LoRAFakeScore(prior, rank=4)


def test_fp32_lora_on_a_half_precision_unet(tiny_sd_dir):
    """Base weights in bfloat16 (CPU stand-in for CUDA fp16), LoRA and camera weights in fp32."""
    prior = load_prior(tiny_sd_dir, dtype="bfloat16")
    x, t, cond, c2w = _inputs(prior)
    teacher = prior.predict_noise(x, t, cond)
    lora = LoRAFakeScore(prior, rank=4)
    assert all(p.dtype == torch.float32 for p in lora.parameters())
    cam = camera_input(c2w)
    torch.testing.assert_close(lora.predict_noise(x, t, cond, cam), teacher, rtol=0, atol=0)
    _train(lora, x, t, cond, cam)
    assert all(torch.isfinite(p).all() for p in lora.parameters())
    fake = lora.predict_noise(x, t, cond, cam)
    assert fake.dtype == torch.float32 and (fake - teacher).abs().max() > 1e-3
    torch.testing.assert_close(prior.predict_noise(x, t, cond), teacher, rtol=0, atol=0)
