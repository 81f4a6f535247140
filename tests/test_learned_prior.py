"""The learned shapes teacher: training (reproducible, resumable), the shipped weights (offline,
verified, through the diffusers prior code), its two modes, the LoRA fake score on its UNet, and the
one-line errors for damaged or inconsistent folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.guidance.priors import PRIORS, build_prior, resolve_prior
from threedgen.guidance.priors.learned.folder import SHIPPED, read_meta
from threedgen.guidance.priors.shapes.prior import ShapeTruth

CLI = [sys.executable, "-m", "threedgen"]


def _prior(name: str, **kw):
    return build_prior(PRIORS[name].config(**kw), torch.device("cpu"))


@pytest.fixture(scope="module")
def camera_prior():
    return _prior("shapes-unet-camera")


def test_shipped_weights_are_verified_and_small():
    meta = read_meta(SHIPPED)
    assert meta["camera"] == {"input": "c2w", "dim": 16, "none": "zeros"}
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 30 * 2 ** 20, size
    assert not list(SHIPPED.rglob("*.bin")) and not list(SHIPPED.rglob("*.pt"))  # safetensors only
    record = meta["training"]
    assert record["steps"] == record["config"]["steps"] and record["train_seconds"] > 0


def test_shipped_scheduler_is_the_exact_priors_schedule(camera_prior):
    from threedgen.guidance.priors.base import sd_alphas_cumprod

    torch.testing.assert_close(camera_prior.alphas_cumprod, sd_alphas_cumprod(), rtol=0, atol=1e-6)
    assert camera_prior.prediction_type == "epsilon" and camera_prior.resolution == 32


def test_shipped_folder_resolves_as_a_learned_teacher():
    choice = resolve_prior(str(SHIPPED), False)
    assert choice.name == "shapes-unet" and Path(choice.model) == SHIPPED


def _noised_truth(prompt: str, cams: Cameras, t: int, seed: int = 0):
    rgb, _ = ShapeTruth(*_parts(prompt)).render(cams, 32, 32, 2)
    x0 = rgb.permute(0, 3, 1, 2) * 2 - 1
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    return x0, eps


def _parts(prompt):
    from threedgen.guidance.priors.shapes.vocab import COLOURS, parse_prompt

    colour, shape = parse_prompt(prompt)
    return shape, colour, COLOURS[colour]


@pytest.mark.parametrize("name", ["shapes-unet-camera", "shapes-unet"])
def test_shipped_model_denoises_the_world(name, camera_prior):
    """The trained UNet predicts the noise of a noised truth render far better than chance (the
    zero prediction has MSE 1): a behavioural check of the shipped weights."""
    prior = camera_prior if name == "shapes-unet-camera" else _prior(name)
    cams = Cameras.from_angles([10.0, 30.0, 20.0], [30.0, 160.0, -100.0], 2.5, 40.0)
    embeds = prior.encode_prompt("a blue house")
    errors = []
    for t in (100, 400, 700):
        x0, eps = _noised_truth("a blue house", cams, t)
        tt = torch.full((3,), t)
        x_t = prior.noise.add_noise(x0, tt, eps)
        pred = prior.predict_noise(x_t, tt, embeds.cond_for(cams), cams)
        errors.append(float((pred - eps).pow(2).mean()))
    assert max(errors) < 0.5, errors


def test_camera_changes_the_prediction(camera_prior):
    """The camera is an input: front and back of the house give different predictions for the
    same noisy image; with the camera dropped (the text-only prior) the prediction does not use it."""
    front, back = (Cameras.from_angles([15.0], [az], 2.5, 40.0) for az in (0.0, 180.0))
    x0, eps = _noised_truth("a red house", front, 300)
    t = torch.tensor([300])
    x_t = camera_prior.noise.add_noise(x0, t, eps)
    cond = [camera_prior.encode_prompt("a red house").cond]
    e_front = camera_prior.predict_noise(x_t, t, cond, front)
    e_back = camera_prior.predict_noise(x_t, t, cond, back)
    assert float((e_front - e_back).abs().mean()) > 1e-3
    text_only = _prior("shapes-unet")
    assert camera_prior.camera_conditioned and not text_only.camera_conditioned  # no flip augmentation with a camera
    assert torch.equal(text_only.predict_noise(x_t, t, cond, front), text_only.predict_noise(x_t, t, cond, back))


def test_lora_fake_score_starts_at_the_camera_conditioned_teacher(camera_prior):
    """VSD's LoRA fake score on the learned UNet (the SD path): untrained, it predicts exactly what
    the camera-conditioned teacher does for the same camera."""
    from threedgen.guidance.camera_embedding import camera_input
    from threedgen.guidance.lora import LoRAFakeScore

    prior = _prior("shapes-unet-camera")
    cams = Cameras.from_angles([15.0, 40.0], [20.0, -120.0], 2.5, 40.0)
    x0, eps = _noised_truth("a green mug", cams, 500)
    t = torch.tensor([500, 500])
    x_t = prior.noise.add_noise(x0, t, eps)
    cond = [prior.encode_prompt("a green mug").cond] * 2
    teacher = prior.predict_noise(x_t, t, cond, cams)
    fake = LoRAFakeScore(prior, rank=2)
    with torch.no_grad():
        got = fake.predict_noise(x_t, t, cond, camera_input(cams.c2w))
    torch.testing.assert_close(got, teacher, atol=1e-5, rtol=1e-5)


def test_training_is_reproducible_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from threedgen.guidance.priors.learned.train import TrainConfig, train

    def cfg():
        return TrainConfig(steps=3, batch_size=4, views_per_shape=2, checkpoint_every=1, warmup=2)

    a = train(tmp_path / "a", cfg(), quiet=True)
    assert train(tmp_path / "b", cfg(), quiet=True, stop_after=2) is None  # interrupted after 2 steps
    assert json.loads((tmp_path / "b" / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 2
    b = train(tmp_path / "b", cfg(), resume=True, quiet=True)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    meta = read_meta(a)
    assert meta["training"]["steps"] == 3 and read_meta(b)["sha256"] == meta["sha256"]
    # the trained folder loads as a prior through --prior FOLDER
    assert resolve_prior(str(a), False).name == "shapes-unet"
    prior = _prior("shapes-unet-camera", model=str(a))
    assert prior.sample(["a red cube"], Cameras.from_angles([10.0], [0.0], 2.5, 40.0), steps=2).shape == (1, 3, 32, 32)


def test_train_prior_cli_errors(tmp_path):
    proc = subprocess.run(CLI + ["train-prior", "--out", str(tmp_path / "none"), "--resume"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no checkpoint.pt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "checkpoint.pt").write_bytes(b"")
    proc = subprocess.run(CLI + ["train-prior", "--out", str(tmp_path / "used")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def _copy_shipped(tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    return folder


def test_damaged_weights_are_a_one_line_error_and_no_run_folder(tmp_path):
    folder = _copy_shipped(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    out = tmp_path / "runs"
    proc = subprocess.run(CLI + ["run", "--prior", str(folder), "--prompt", "a red cube", "--steps", "2",
                                 "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert str(weights) in line and "damaged" in line and "threedgen train-prior" in line
    assert not out.exists() or not any(out.iterdir())
    weights.unlink()
    with pytest.raises(UserError, match="is missing"):
        read_meta(folder)


def test_camera_settings_must_match_the_unet(tmp_path):
    folder = _copy_shipped(tmp_path)
    meta_path = folder / "threedgen.json"
    meta = json.loads(meta_path.read_text())
    meta["camera"] = None
    meta_path.write_text(json.dumps(meta))
    proc = subprocess.run(CLI + ["run", "--prior", "shapes-unet-camera", f"prior.model={folder}", "--prompt",
                                 "a red cube", "--out", str(tmp_path / "runs")], capture_output=True, text=True)
    assert proc.returncode == 2 and "takes a camera input but threedgen.json has no camera settings" in proc.stderr
    # the reverse: camera settings, a UNet without a camera input
    meta["camera"] = {"input": "c2w", "dim": 16, "none": "zeros"}
    meta_path.write_text(json.dumps(meta))
    unet_cfg = folder / "unet" / "config.json"
    cfg = json.loads(unet_cfg.read_text())
    cfg["class_embed_type"] = None
    unet_cfg.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="has camera settings but its UNet takes no camera input"):
        read_meta(folder)


def test_prompt_outside_the_world_is_rejected():
    from threedgen.config import resolve_request

    with pytest.raises(UserError, match="outside the shapes prior's vocabulary"):
        resolve_request("sds", "nerf", "shapes-unet", {}, {"prompt": "a hamburger"})


def test_run_end_to_end_on_the_learned_teacher(tmp_path):
    """A short SDS run on the camera model writes a scored run folder (the quality itself is
    measured by benchmarks/guidance_matrix.py, not here)."""
    proc = subprocess.run(CLI + ["run", "--prior", "shapes-unet-camera", "--guidance", "sds", "--prompt",
                                 "a red cube", "--steps", "20", "--out", str(tmp_path), "--no-progress",
                                 "export.formats=[glb]", "export.video_frames=4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["mask_iou"] <= 1.0 and (run_dir / "mesh.glb").is_file()
