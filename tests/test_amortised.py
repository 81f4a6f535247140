"""Amortised text-to-3D: the prompt stream, the generator, train-amortised, generate, resume,
bad input, and DDP on two gloo processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from threedgen.amortised_system import PromptStream
from threedgen.cameras import CameraSampler
from threedgen.cli import main
from threedgen.schema import CameraSamplerConfig

# A small generator and short renders: every code path, seconds per run.
SMALL = ["representation.density_resolution=24", "representation.color_resolution=12", "amortised.latent=4",
         "amortised.hidden=32", "render.resolution=32", "render.coarse_resolution=0", "preview_every=2",
         "checkpoint_every=2", "representation.num_samples=16", "prior.shapes=[cube,torus]"]
PROMPTS = "a red cube\na blue torus\n\n# a comment\na blue cube\n"
ROOT = Path(__file__).resolve().parents[1]


def _cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _digests(err: str) -> dict[int, str]:
    return {int(rank): digest for rank, digest in
            re.findall(r"process (\d+) of \d+: generator weights ([0-9a-f]{16})", err)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained 6 steps on three prompts (two colours x two shapes, red torus held out)."""
    root = tmp_path_factory.mktemp("amortised")
    (root / "prompts.txt").write_text(PROMPTS)
    code = main(["train-amortised", str(root / "prompts.txt"), "--out", str(root / "model"), "--steps", "6",
                 "--no-progress", "amortised.prompts_per_step=2", *SMALL])
    assert code == 0
    return root / "model"


# ---- the prompt stream ----------------------------------------------------------------------

def test_stream_sees_every_prompt_equally_and_splits_across_processes():
    sampler = CameraSampler(CameraSamplerConfig(), 0)
    one = PromptStream(5, 2, sampler, seed=3)
    seen = torch.cat([one.batch(s)[0] for s in range(10)])  # 20 slots = four passes over five prompts
    assert torch.bincount(seen, minlength=5).tolist() == [4] * 5
    ranks = [PromptStream(5, 1, sampler, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(6):
        idx, slots, cams = one.batch(step)
        split = [r.batch(step) for r in ranks]
        # Two processes of one prompt each draw exactly the slots, prompts and cameras of one process of two.
        assert torch.cat([s[1] for s in split]).tolist() == slots.tolist()
        assert torch.cat([s[0] for s in split]).tolist() == idx.tolist()
        assert torch.allclose(torch.cat([s[2].c2w for s in split]), cams.c2w)
    assert PromptStream(5, 2, sampler, seed=3, start=4).batch(4)[1].tolist() == one.batch(4)[1].tolist()


# ---- the generator --------------------------------------------------------------------------

def _generator(latent=3):
    from threedgen.representations.config import NeRFConfig, PromptGridsConfig
    from threedgen.representations.prompt_grids import PromptGrids

    nerf_cfg = NeRFConfig(density_resolution=12, color_resolution=6, num_samples=12, bound=0.75)
    return PromptGrids(nerf_cfg, PromptGridsConfig(latent=latent, hidden=16), embed_dim=5), nerf_cfg


def test_generator_renders_exactly_the_nerf_it_exports():
    from threedgen.cameras import orbit

    torch.manual_seed(0)
    gen, nerf_cfg = _generator()
    with torch.no_grad():
        for p in (gen.mean_density, gen.basis_density, gen.mean_color, gen.basis_color):
            p.normal_(0, 1)
    gen.eval()
    vectors = torch.eye(5)[:2]
    a, b = gen.codes(vectors)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2)) and torch.allclose(b.norm(dim=-1), torch.ones(2))
    density, color = gen.grids(vectors)
    assert density.shape == (2, 1, 12, 12, 12) and color.shape == (2, 3, 6, 6, 6)
    assert not torch.allclose(density[0], density[1])  # two prompts, two objects
    cams = orbit(2, 20.0, 2.5, 40.0)
    nerf = gen.nerf_for(vectors[1], nerf_cfg)
    # The same grids to rounding: one prompt alone goes through the mapping MLP as a batch of one,
    # and BLAS may sum a batch of one in another order than a batch of two (2e-7 of 5 seen here).
    assert torch.allclose(nerf.field.density, density[1], rtol=1e-6, atol=1e-6)
    assert torch.allclose(nerf.field.color, color[1], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        direct = gen.render_grids(density[1], color[1], cams, 16, 16)
        exported = nerf.render(cams, 16, 16)
    assert torch.allclose(direct.rgb, exported.rgb, atol=1e-6)
    assert torch.allclose(direct.alpha, exported.alpha, atol=1e-6)


def test_generator_gradients_reach_every_part():
    gen, _ = _generator()
    from threedgen.cameras import orbit

    density, color = gen.grids(torch.eye(5)[:2])
    out = gen.render_grids(density[0], color[0], orbit(1, 20.0, 2.5, 40.0), 8, 8)
    (out.rgb.sum() + gen.total_variation(density)).backward()
    # Zero grids at the start (every prompt is the per-prompt NeRF's initial blob), yet each part learns.
    for name in ("mean_density", "basis_density", "mean_color", "basis_color"):
        assert getattr(gen, name).grad.abs().sum() > 0, name
    assert sum(len(g["params"]) for g in gen.parameter_groups()) == len(list(gen.parameters()))


def test_prompt_vectors():
    from threedgen.guidance.priors.base import Prior, PromptEmbeds
    from threedgen.guidance.priors.shapes.prior import ShapesPrior

    prior = ShapesPrior()
    v = prior.prompt_vector(prior.encode_prompt("a crimson donut"))
    assert v.shape == (12 + 10,) and v.sum() == 2
    assert v[prior.colours.index("red")] == 1 and v[12 + prior.shapes.index("torus")] == 1
    hidden = torch.arange(12.0).view(1, 3, 4)  # a text encoder's [1, tokens, width]
    embeds = PromptEmbeds("x", "", hidden, hidden, hidden)
    assert Prior.prompt_vector(prior, embeds).tolist() == [4.0, 5.0, 6.0, 7.0]


def test_step_loss_weighs_the_grids_total_variation():
    from threedgen.amortised_folder import generator_settings
    from threedgen.amortised_system import AmortisedSystem
    from threedgen.config import build_config, parse_overrides
    from threedgen.guidance import priors
    from threedgen.guidance.config import GUIDANCE
    from threedgen.representations.prompt_grids import PromptGrids

    gen_cfg, overrides = generator_settings(parse_overrides(SMALL))
    cfg = build_config(overrides=overrides, flags={"prompt": "a red cube"})
    prior = priors.build_prior(cfg.prior, torch.device("cpu"))
    prompts = ["a red cube", "a blue torus"]
    embeds = [prior.encode_prompt(p) for p in prompts]
    vectors = torch.stack([prior.prompt_vector(e) for e in embeds])
    torch.manual_seed(0)
    generator = PromptGrids(cfg.representation, gen_cfg, vectors.shape[1])
    with torch.no_grad():  # rough grids, so that both total variations are far from 0
        for p in (generator.basis_density, generator.basis_color):
            p.normal_(0, 1)
    system = AmortisedSystem(cfg, prior, generator, GUIDANCE["sds"].cls(cfg.guidance, prior), prompts, vectors, embeds)
    batch = PromptStream(2, 2, CameraSampler(cfg.camera, 0), seed=0).batch(0)
    density, color = generator.grids(vectors[batch[0]])
    losses = {}
    for lambda_smooth, color_smooth in ((0.0, 0.0), (2.0, 0.0), (0.0, 3.0)):
        cfg.loss.lambda_smooth, gen_cfg.color_smooth = lambda_smooth, color_smooth
        losses[lambda_smooth, color_smooth] = float(system.step_loss(batch, 0, 10)[0])
    base = losses[0.0, 0.0]  # each slot's draws are seeded by the slot: the same guidance loss each time
    assert losses[2.0, 0.0] - base == pytest.approx(2.0 * float(generator.total_variation(density)), rel=1e-4)
    assert losses[0.0, 3.0] - base == pytest.approx(3.0 * float(generator.total_variation(color)), rel=1e-4)


# ---- train-amortised and generate -----------------------------------------------------------

def test_trained_model_folder(trained):
    meta = json.loads((trained / "amortised.json").read_text())
    assert meta["prompts"] == ["a red cube", "a blue torus", "a blue cube"]
    assert meta["word_groups"] == [{"kind": "colours", "words": ["red", "blue"]},
                                   {"kind": "shapes", "words": ["cube", "torus"]}]
    assert meta["embed_dim"] == 12 + 2 and meta["generator"]["latent"] == 4  # colours + the world's two shapes
    status = json.loads((trained / "status.json").read_text())
    assert status["status"] == "succeeded" and status["step"] == 6 and status["prompts"] == 3
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    for name in ("step-000002.png", "step-000006.png", "final.png"):
        from PIL import Image

        assert Image.open(trained / "previews" / name).size == (3 * 96, 96)  # one 96-px tile per prompt


def test_generate_writes_a_run_folder_that_eval_reads(trained, tmp_path, capsys):
    # red torus: both words known, the pair never trained (the held-out case)
    code, out, err = _cli(["generate", trained, "--prompt", "a red donut", "--out", tmp_path], capsys)
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    for name in ("config.yaml", "mesh.glb", "mesh.obj", "mesh.ply", "previews/final.png", "metrics.json",
                 "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("turntable.*"))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "succeeded" and status["generate_seconds"] < 1.0
    assert status["amortised_model"] == str(trained)
    assert re.search(r"generated in \d+ ms", err)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["prompt"] == "a red donut" and 0 <= metrics["mask_iou"] <= 1
    code, out, err = _cli(["eval", run_dir, "--json"], capsys)
    assert code == 0 and json.loads(out)["mask_iou"] == pytest.approx(metrics["mask_iou"], abs=1e-6)
    code, out, err = _cli(["run", "--resume", run_dir], capsys)
    assert code == 2 and "was generated by an amortised model" in err and len(err.strip().splitlines()) == 1
    code, out, err = _cli(["export", run_dir, "--format", "ply"], capsys)
    assert code == 0 and out.splitlines()[0].endswith("mesh.ply")


@pytest.mark.parametrize("guidance", ["asd", "vsd"])
def test_other_guidance_methods_train_the_generator(guidance, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPTS)
    code, out, err = _cli(["train-amortised", tmp_path / "p.txt", "--out", tmp_path / "m", "--steps", "3",
                           "--guidance", guidance, "--no-progress", "amortised.prompts_per_step=2", *SMALL], capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "m" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3 and state["threedgen"]["skipped_steps"] == 0
    moved = state["state_dict"]["representation.basis_density"].abs().sum()
    assert torch.isfinite(moved) and moved > 0  # the guidance's gradients reached the generator
    if guidance == "vsd":  # the fake score trains beside the generator, with its own optimizer
        assert state["threedgen"]["optimizers"] == ["guidance", "representation.prompt_grids"]
        assert any(k.startswith("guidance.") for k in state["state_dict"])
    code, out, err = _cli(["generate", tmp_path / "m", "--prompt", "a red torus", "--out", tmp_path, "--no-eval"],
                          capsys)
    assert code == 0 and (Path(out.strip().splitlines()[-1]) / "mesh.glb").is_file()


def test_resume_continues_exactly(trained, tmp_path, capsys):
    import shutil

    # Train 4 steps, then 2 more by resuming: the same weights as the 6 straight steps.
    (tmp_path / "p.txt").write_text(PROMPTS)
    code, _, _ = _cli(["train-amortised", tmp_path / "p.txt", "--out", tmp_path / "m", "--steps", "4",
                       "--no-progress", "amortised.prompts_per_step=2", *SMALL], capsys)
    assert code == 0
    code, out, err = _cli(["train-amortised", "--resume", tmp_path / "m", "--steps", "6", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "status.json").read_text())["step"] == 6
    straight = tmp_path / "straight"
    shutil.copytree(trained, straight)
    from threedgen.amortised import AmortisedModel, weights_digest

    assert _digests(err)[0] == weights_digest(AmortisedModel(straight).generator)


@pytest.mark.parametrize("args,expected", [
    (["generate", "{model}", "--prompt", "a green cube"], "uses 'green', which this model never saw in training; "
                                                          "it knows colours: red, blue; shapes: cube, torus"),
    (["generate", "{model}", "--prompt", "a red mug"], "uses 'mug'"),
    (["generate", "{model}", "--prompt", "a hamburger"], "outside the shapes prior's vocabulary"),
    (["generate", "{model}", "--prompt", ""], "prompt is empty"),
    (["generate", "{tmp}", "--prompt", "a red cube"], "is not an amortised model folder"),
    (["train-amortised", "{tmp}/missing.txt"], "cannot read the prompt file"),
    (["train-amortised", "{tmp}/empty.txt"], "holds no prompt"),
    (["train-amortised", "{tmp}/bad.txt"], "bad.txt, prompt 2: prompt 'a red hamburger' is outside"),
    (["train-amortised", "{tmp}/good.txt", "amortised.latnt=3"], "unknown key amortised.latnt; valid: amortised.latent"),
    (["train-amortised", "{tmp}/good.txt", "amortised.latent=0"], "amortised.latent must be an integer from 1"),
    (["train-amortised", "{tmp}/good.txt", "amortised.latent=abc"], "amortised.latent must be an integer"),
    (["train-amortised", "{tmp}/good.txt", "--out", "{model}"], "already holds a model; continue it with --resume"),
    (["train-amortised", "--resume", "{model}", "--prior", "shapes-unet"], "drop --prior"),
    (["train-amortised", "--resume", "{tmp}"], "is not an amortised model folder"),
    (["train-amortised"], "give the prompt file"),
])
def test_bad_input(trained, tmp_path, capsys, args, expected):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "bad.txt").write_text("a red cube\na red hamburger\n")
    (tmp_path / "good.txt").write_text("a red cube\n")
    before = sorted(p.name for p in trained.rglob("*"))
    code, out, err = _cli([a.format(model=trained, tmp=tmp_path) for a in args], capsys)
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in trained.rglob("*")) == before  # nothing written


def test_model_from_another_version_or_prior(trained, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained, other)
    meta = json.loads((other / "amortised.json").read_text())
    (other / "amortised.json").write_text(json.dumps({**meta, "threedgen": "0.0.1"}))
    code, _, err = _cli(["generate", other, "--prompt", "a red cube"], capsys)
    assert code == 2 and "was written by threedgen 0.0.1" in err and "train it again" in err
    (other / "amortised.json").write_text(json.dumps({**meta, "embed_dim": 7}))
    code, _, err = _cli(["generate", other, "--prompt", "a red cube", "--out", tmp_path], capsys)
    assert code == 2 and "does not fit this threedgen's generator" in err, err
    (other / "amortised.json").write_text(json.dumps({**meta, "prior": "shapes-unet"}))
    code, _, err = _cli(["generate", other, "--prompt", "a red cube", "--out", tmp_path], capsys)
    assert code == 2 and "name different priors" in err, err


# ---- DDP: two processes, gloo ----------------------------------------------------------------

def _torchrun(tmp_path, out, nproc, per_step):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "threedgen", "train-amortised", str(tmp_path / "p.txt"), "--out", str(out), "--steps", "3",
           "--devices", str(nproc), "--no-progress", f"amortised.prompts_per_step={per_step}", *SMALL]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_two_processes_match_one(tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS)
    two = _torchrun(tmp_path, tmp_path / "two", nproc=2, per_step=1)
    digests = _digests(two.stderr)
    assert sorted(digests) == [0, 1] and digests[0] == digests[1]  # identical weights on both ranks
    assert json.loads((tmp_path / "two" / "status.json").read_text())["processes"] == 2
    _torchrun(tmp_path, tmp_path / "one", nproc=1, per_step=2)
    from threedgen.amortised import AmortisedModel

    # The same total batch (two prompts a step): the same slots, cameras and draws, so the same model,
    # up to the order of the gradient sums (averaged across processes instead of within one).
    a, b = AmortisedModel(tmp_path / "one").generator, AmortisedModel(tmp_path / "two").generator
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        diff = (sa[key] - sb[key]).abs()
        if key.endswith(("density", "color")):
            # A voxel whose gradient is rounding noise (~1e-9, summed in another order) moves by
            # Adam's full step either way; measured: 0.06% of the density voxels and 1.2% of the
            # colour voxels (the colour total variation's nearly flat regions); the MLP equal to 1e-7.
            assert (diff > 1e-4).float().mean() < (0.005 if key.endswith("density") else 0.03), key
        else:
            assert diff.max() < 1e-4, key
    from threedgen.cameras import orbit

    vectors = torch.eye(14)[[0, 0]] + torch.eye(14)[[12, 13]]  # red cube, red torus (held out)
    with torch.no_grad():
        for gen in (a, b):
            gen.eval()
        renders = [[g.render_grids(d, c, orbit(4, 20.0, 2.5, 40.0), 32, 32).rgb for d, c in zip(*g.grids(vectors))]
                   for g in (a, b)]
    for ra, rb in zip(*renders):
        assert (ra - rb).abs().mean() < 2e-3
