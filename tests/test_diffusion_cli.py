"""`threedgen run --prior <diffusers model>`: a real run on tiny models, and every way a model can
be missing or wrong -> one line on stderr, exit code 2, no traceback, no hang."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from threedgen.cli import main


def _one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("threedgen: error: ")
    return err


def _cli(args, env_extra, cwd, timeout=120):
    env = {**os.environ, **env_extra}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "threedgen", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)
    return proc, time.time() - start


@pytest.mark.parametrize("folder_fixture, steps", [("tiny_sd_dir", "5"), ("tiny_if_dir", "3")])
def test_run_on_a_tiny_model_folder_writes_meshes(folder_fixture, steps, request, tmp_path, capsys, monkeypatch):
    import trimesh

    folder = request.getfixturevalue(folder_fixture)
    code = main(["run", "--prior", str(folder), "--guidance", "sds", "--steps", steps, "--prompt", "a hamburger",
                 "--out", str(tmp_path), "--no-progress", "export.resolution=48", "export.video_frames=2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    for name in ("mesh.glb", "mesh.obj", "mesh.ply"):
        mesh = trimesh.load(run_dir / name, force="mesh")
        assert len(mesh.faces) > 100
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "succeeded" and status["step"] == int(steps)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["prior"]["model"] == str(folder)
    assert cfg["prior"]["name"] == ("stable-diffusion" if folder_fixture == "tiny_sd_dir" else "deepfloyd-if")
    assert cfg["camera"]["distance_range"] == [1.5, 2.0]  # the prior's preset overlay applied
    # No truth to score against: metrics.json holds the prior's own Janus check alone.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "mask_iou" not in metrics and 0.0 <= metrics["janus_score_prior"] <= 1.0
    if folder_fixture == "tiny_sd_dir":
        from threedgen.guidance.priors.diffusion.stable_diffusion import StableDiffusionPrior

        def refuse(*args, **kwargs):
            raise AssertionError("export must not load the diffusion model")

        monkeypatch.setattr(StableDiffusionPrior, "__init__", refuse)
        (run_dir / "mesh.obj").unlink()
        assert main(["export", str(run_dir), "--format", "obj", "--resolution", "32"]) == 0
        assert (run_dir / "mesh.obj").is_file()
        monkeypatch.undo()
        capsys.readouterr()
        # eval: no truth, so the prior's own Janus check alone (it loads the model to judge the views)
        assert main(["eval", str(run_dir)]) == 0
        assert capsys.readouterr().out.startswith("janus_score_prior ")
        config = run_dir / "config.yaml"
        config.write_text(config.read_text().replace("janus:\n  enabled: true", "janus:\n  enabled: false"))
        err = _one_line_error(capsys, main(["eval", str(run_dir)]))
        assert "prior 'stable-diffusion' has no ground truth and janus.enabled is false" in err


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_sd_dir):
    """Folders that are wrong in each way a user's download can be."""
    from tiny_diffusers import build_tiny_sd

    root = tmp_path_factory.mktemp("broken")
    (root / "not-diffusers").mkdir()
    (root / "not-diffusers" / "README.md").write_text("hello")
    (root / "model.safetensors").write_bytes(b"\0" * 16)
    build_tiny_sd(root / "pickle-only", safe_serialization=False)
    shutil.copytree(tiny_sd_dir, root / "no-unet")
    shutil.rmtree(root / "no-unet" / "unet")
    shutil.copytree(tiny_sd_dir, root / "sdxl")
    index = json.loads((root / "sdxl" / "model_index.json").read_text())
    (root / "sdxl" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    return root


@pytest.mark.parametrize("model, extra, expected", [
    ("/no/such/model/folder", [], "no such folder"),
    ("not-diffusers", [], "is not a diffusers model (no model_index.json)"),
    ("model.safetensors", [], "is a file, not a diffusers model folder (a single-file checkpoint"),
    ("pickle-only", [], "(unet) has no safetensors weights (only diffusion_pytorch_model.bin); threedgen never"),
    ("no-unet", [], "has no unet/ component"),
    ("sdxl", [], "is Stable Diffusion XL, which threedgen does not support yet"),
    ("tiny-sd", ["prior.name=deepfloyd-if"], "is a StableDiffusionPipeline (stable-diffusion), not deepfloyd-if"),
    ("tiny-sd", ["prior.dtype=float16"], "prior.dtype=float16 needs a CUDA device"),
    ("tiny-sd", ["prior.perp_neg=true", "prior.view_dependent_prompting=false"], "prior.perp_neg needs"),
])
def test_bad_models_are_one_line_errors(model, extra, expected, broken_models, tiny_sd_dir, tmp_path, capsys):
    path = model if model.startswith("/") else str(tiny_sd_dir if model == "tiny-sd" else broken_models / model)
    out = tmp_path / "out"
    code = main(["run", "--prior", path, "--prompt", "a hamburger", "--steps", "2", "--out", str(out), "--no-progress",
                 *extra])
    err = _one_line_error(capsys, code)
    assert expected in err
    assert not out.exists() or not any(out.iterdir())  # no run folder was made


def test_model_given_twice_or_for_the_wrong_prior(tiny_sd_dir, tmp_path, capsys):
    err = _one_line_error(capsys, main(["run", "--prior", str(tiny_sd_dir), f"prior.model={tiny_sd_dir}",
                                        "--prompt", "a hamburger", "--out", str(tmp_path)]))
    assert "give the model once" in err
    err = _one_line_error(capsys, main(["run", "--prior", "deepfloyd-if", f"prior.model={tiny_sd_dir}",
                                        "--prompt", "a hamburger", "--out", str(tmp_path)]))
    assert "is a stable-diffusion model, not deepfloyd-if" in err


def test_relative_folder_and_model_override_are_stored_as_absolute_paths(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tiny_sd_dir.parent)
    runs = []
    for prior_args in (["--prior", tiny_sd_dir.name], ["--prior", "auto", f"prior.model=./{tiny_sd_dir.name}"]):
        code = main(["run", *prior_args, "--prompt", "a hamburger", "--steps", "1", "--out", str(tmp_path),
                     "--no-progress", "export.resolution=16", "export.video_frames=1", "export.formats=[ply]"])
        out, err = capsys.readouterr()
        assert code == 0, err
        runs.append(Path(out.strip().splitlines()[-1]))
    for run_dir in runs:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["prior"]["name"] == "stable-diffusion" and cfg["prior"]["model"] == str(tiny_sd_dir.resolve())


def test_unknown_prior_name_lists_the_choices(capsys):
    err = _one_line_error(capsys, main(["run", "--prior", "sd15", "--prompt", "a hamburger"]))
    assert "valid: " in err and "stable-diffusion" in err and "a Hugging Face model id" in err


def test_hub_offline_with_an_empty_cache(tmp_path):
    proc, seconds = _cli(["run", "--prior", "stabilityai/stable-diffusion-2-1-base", "--prompt", "a hamburger",
                          "--steps", "2", "--out", str(tmp_path / "out")],
                         {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "threedgen: error: model 'stabilityai/stable-diffusion-2-1-base' is not in the local Hugging Face cache and "
        "HF_HUB_OFFLINE is set; download it once with network, or pass a local diffusers folder"]
    assert not (tmp_path / "out").exists()


def test_no_network_with_an_empty_cache_fails_fast(tmp_path):
    # an endpoint that refuses connections stands in for a machine without network
    proc, seconds = _cli(["run", "--prior", "stabilityai/stable-diffusion-2-1-base", "--prompt", "a hamburger",
                          "--steps", "2", "--out", str(tmp_path / "out")],
                         {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"},
                         tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1 cannot be reached" in lines[0], proc.stderr
    assert seconds < 60


def test_behind_a_proxy_the_probe_defers_to_huggingface_hub(monkeypatch):
    from threedgen.guidance.priors.diffusion.source import hub_reachable

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub_reachable.__wrapped__() is True


def test_a_cached_hub_model_runs_offline(tiny_sd_dir, tmp_path):
    """The Hub-id path: a model in the Hugging Face cache layout loads with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hf" / "hub" / "models--tiny--sd"
    commit = "0" * 40
    shutil.copytree(tiny_sd_dir, cache / "snapshots" / commit)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    proc, _ = _cli(["run", "--prior", "tiny/sd", "--prompt", "a hamburger", "--steps", "2", "--out", str(tmp_path / "out"),
                    "--no-progress", "export.resolution=32", "export.video_frames=2"],
                   {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert (run_dir / "mesh.glb").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["prior"]["model"] == "tiny/sd"


def test_hub_errors_translate_to_one_line():
    from unittest.mock import MagicMock

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from threedgen.guidance.priors.diffusion.source import translate_error

    gated = translate_error(GatedRepoError("401 Client Error: gated", response=MagicMock(headers={})), "DeepFloyd/IF-I-XL-v1.0")
    assert "is gated: accept its licence on huggingface.co" in str(gated)
    missing = translate_error(RepositoryNotFoundError("404 Client Error", response=MagicMock(headers={})), "nobody/nothing")
    assert "is not on the Hugging Face Hub" in str(missing)
    other = translate_error(OSError("disk full\nmore detail"), "a/b", "vae")
    assert str(other) == "model 'a/b' (vae) cannot be loaded: disk full"
