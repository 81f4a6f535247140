"""The benchmark scripts that need hardware this machine lacks still run here: the GPU throughput
script on the tiny random pipeline on the CPU (its numbers mean nothing; the check is that the
code path a GPU session runs has no error and reports every column)."""

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_throughput_script_runs_on_cpu_with_the_tiny_pipeline(tmp_path):
    gpu = _load("gpu_throughput")
    out = tmp_path / "bench.md"
    text = gpu.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--repeats", "1",
                     "--write", str(out)])
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| nerf") or line.startswith("| gaussians")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        it_s, step_ms, floor_ms, ratio = float(cells[3]), float(cells[4]), float(cells[5]), float(cells[6].rstrip("x"))
        assert it_s > 0 and step_ms > 0 and floor_ms > 0
        assert ratio == pytest.approx(step_ms / floor_ms, rel=0.02)
        assert cells[2] == "float32"  # fp16 only on CUDA
    assert "grid / dense" in rows[0] and "pytorch" in rows[1]


def test_gpu_throughput_builds_the_full_size_sd21_architecture():
    gpu = _load("gpu_throughput")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import torch

    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = UNet2DConditionModel(**gpu.SD21_UNET)
        vae = AutoencoderKL(**gpu.SD21_VAE)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    # SD 2.1 base: 865.9 M UNet parameters, 83.7 M VAE parameters.
    assert n_unet == pytest.approx(865.9e6, rel=0.002)
    assert n_vae == pytest.approx(83.65e6, rel=0.002)
    assert re.search(r"2\.1", gpu.__doc__)


def test_soak_samples_rss_over_the_real_training_loop():
    soak = _load("soak")
    from threedgen.config import parse_overrides

    items = ["prior.shapes=[cube]", "render.resolution=16", "render.coarse_resolution=0", "checkpoint_every=20"]
    row = soak.soak("nerf", 40, 10, parse_overrides(items))
    assert row["steps"] == 40 and [s for s, _ in row["trace"]][:2] == [10, 20]
    assert 50 < row["rss_start"] < 20000 and row["rss_max"] >= row["rss_end"] > 50
    assert row["first_fifth"] > 50 and row["last_fifth"] > 50 and row["from_step"] == 10
    assert [s for s, _ in row["samples"]] == [10, 20, 30, 40] and row["max_second_half"] > 50
