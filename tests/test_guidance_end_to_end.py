"""Every guidance method runs a few real steps end to end, on the shapes prior and on a tiny
Stable Diffusion; VSD's fake score is checkpointed and resumed with the run."""

import json

import pytest
import torch

from threedgen.config import build_config, parse_overrides
from threedgen.guidance import GUIDANCE
from threedgen.runner import load_trained, run

FAST = ["export.resolution=24", "export.video_frames=1", "export.video_resolution=16", "export.formats=[ply]",
        "export.evaluate=false", "checkpoint_every=2", "preview_every=100"]
SHAPES = ["prior.shapes=[cube,torus]", "prior.resolution=32", "render.resolution=32"]
METHODS = sorted(set(GUIDANCE) - {"sds"})


def _run(method, prior, extra, tmp_path, steps=3, model=None, representation="nerf"):
    flags = {"prompt": "a red cube", "steps": steps}
    if model is not None:
        flags["prior"] = {"model": str(model)}
    cfg = build_config(method, representation, prior, parse_overrides(FAST + extra), flags)
    run_dir = run(cfg, out=tmp_path, progress_bar=False)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "succeeded" and status["step"] == steps, status
    assert status["skipped_steps"] == 0
    assert (run_dir / "mesh.ply").is_file()
    return run_dir


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_shapes_prior(method, tmp_path):
    _run(method, "shapes", SHAPES, tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_a_tiny_stable_diffusion(method, tiny_sd_dir, tmp_path):
    _run(method, "stable-diffusion", ["render.resolution=32"], tmp_path, model=tiny_sd_dir)


@pytest.mark.parametrize("method", sorted(GUIDANCE))
def test_every_method_runs_on_gaussians(method, tmp_path):
    run_dir = _run(method, "shapes", SHAPES + ["representation.num_points=300"], tmp_path, representation="gaussians")
    assert (run_dir / "splats.ply").is_file()


# The surface representations (SDF NeRF, 2D surfels) with every method; the surfels' export fuses a
# few small views.
SURFACES = {"nerf-sdf": [], "surfels": ["representation.num_points=300", "representation.mesh_view_size=32",
                                        "representation.mesh_views_per_ring=4", "representation.regularize_from=0"]}


@pytest.mark.parametrize("representation", sorted(SURFACES))
@pytest.mark.parametrize("method", sorted(GUIDANCE))
def test_every_method_runs_on_the_surface_representations(method, representation, tmp_path):
    run_dir = _run(method, "shapes", SHAPES + SURFACES[representation], tmp_path, representation=representation)
    if representation == "surfels":
        assert (run_dir / "splats.ply").is_file()


def test_gaussians_run_on_a_tiny_stable_diffusion(tiny_sd_dir, tmp_path):
    _run("sds", "stable-diffusion", ["render.resolution=32", "representation.num_points=300"], tmp_path,
         model=tiny_sd_dir, representation="gaussians")


@pytest.mark.parametrize("prior", ["shapes", "stable-diffusion"])
def test_vsd_fake_score_is_checkpointed_and_resumed(prior, tiny_sd_dir, tmp_path):
    extra = SHAPES if prior == "shapes" else ["render.resolution=32"]
    run_dir = _run("vsd", prior, extra, tmp_path, steps=4, model=tiny_sd_dir if prior != "shapes" else None)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    fake_keys = [k for k in state["state_dict"] if k.startswith("guidance.fake_score.")]
    assert fake_keys, "the fake score's weights must be in the checkpoint"
    groups = state["optimizer_states"][0]["param_groups"]  # the system's one optimizer holds the fake score too
    assert groups[-1]["lr"] == (1e-3 if prior == "shapes" else 1e-4)
    from threedgen.runner import build_components

    fresh = dict(build_components(load_trained(run_dir)[0], torch.device("cpu")).named_parameters())
    _, system, _ = load_trained(run_dir)
    loaded = dict(system.named_parameters())
    trained = [k for k in fake_keys if k in loaded]
    assert trained and all(torch.equal(loaded[k], state["state_dict"][k]) for k in trained)
    assert any(not torch.equal(fresh[k], state["state_dict"][k]) for k in trained)  # loading restored them
    # the fake score moved away from its initialisation (zero output layer / zero LoRA B)
    assert any(state["state_dict"][k].abs().sum() > 0 for k in fake_keys if "conv_out" in k or "lora_B" in k)
    resumed = run(resume=run_dir, steps=6, progress_bar=False)
    status = json.loads((resumed / "status.json").read_text())
    assert status["status"] == "succeeded" and status["step"] == 6
    # the fake score's optimizer state continued: Adam has taken 6 steps on its parameters, not 2
    after = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    opt = after["optimizer_states"][0]
    fake_ids = opt["param_groups"][-1]["params"]
    assert {int(opt["state"][i]["step"]) for i in fake_ids if i in opt["state"]} == {6}


def test_lora_fake_score_trains_on_the_priors_own_parameterisation(tiny_sd_v_dir):
    """On a v-prediction model the fake score's target is v = a eps - s x; converted back to eps
    by the prior it is the noise that was added."""
    from tiny_diffusers import load_prior

    from threedgen.guidance.fake_score import LoRAScore

    prior = load_prior(tiny_sd_v_dir)
    score = LoRAScore(prior, rank=2)
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    t = torch.tensor([100, 800])
    cond = [prior.encode_prompt("a red cube").cond] * 2
    captured = {}
    original = torch.nn.functional.mse_loss

    def spy(out, target):
        captured["target"] = target
        return original(out, target)

    torch.nn.functional.mse_loss = spy
    try:
        score.training_loss(x, t, eps, cond, torch.zeros(2, 16))
    finally:
        torch.nn.functional.mse_loss = original
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * eps
    torch.testing.assert_close(prior.noise.to_eps(captured["target"], x_t, t), eps, rtol=1e-4, atol=1e-4)
