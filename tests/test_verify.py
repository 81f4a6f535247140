"""The reproducibility manifest and `threedgen verify`: a run records what produced it and how its
first steps went; a replay on the same machine is bit-exact; a changed saved state or config.yaml
diverges at the right step and says why; a manifest of another version, or none, is refused in
one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_bad_inputs import tiny_run

import threedgen
from threedgen.cli import main
from threedgen.errors import UserError
from threedgen.fingerprints import FINGERPRINTS_NAME, state_digest, state_path
from threedgen.manifest import MANIFEST_NAME, build_manifest, manifest_short_hash, prior_record
from threedgen.verify import PARAM_ATOL, compare, verify_run

STEPS, VERIFY_STEPS = 6, 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs"), steps=STEPS, extra=[f"verify_steps={VERIFY_STEPS}"])


@pytest.fixture
def copy(run_dir, tmp_path):
    """A copy of the module's run folder, to change without spoiling it for the other tests."""
    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def verify_cli(capsys, *argv) -> tuple[int, str]:
    """``threedgen verify ...`` through the CLI: exit code and stdout."""
    code = main(["verify", *map(str, argv)])
    return code, capsys.readouterr().out


def canonical_sha256(values: dict) -> str:
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_a_run_writes_its_manifest(run_dir):
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert manifest["format"] == 1 and manifest["threedgen"]["version"] == threedgen.__version__
    assert manifest["config"] == config and manifest["config_sha256"] == canonical_sha256(config)
    assert manifest_short_hash(manifest) == manifest["config_sha256"][:12]
    assert manifest["seed"] == config["seed"] == 0
    rng = manifest["rng"]
    assert rng["python_random"] == rng["numpy"] == rng["torch_cpu"] == 0 and rng["torch_cuda"] is None
    assert rng["dataloader_workers"] is True and rng["pl_global_seed"] == "0"
    libraries = manifest["libraries"]
    assert libraries["torch"] == torch.__version__
    assert {"diffusers", "gsplat", "nerfacc", "pytorch_lightning", "numpy", "python"} <= set(libraries)
    assert manifest["device"]["type"] == "cpu" and manifest["device"]["name"]
    settings = manifest["determinism"]
    assert settings["torch_threads"] == torch.get_num_threads()
    assert settings["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert {"cudnn_deterministic", "cudnn_benchmark", "cublas_workspace_config"} <= set(settings)
    prior = manifest["prior"]
    assert prior["name"] == prior["family"] == "shapes" and len(prior["cache_key"]) == 64
    assert manifest["verify"]["steps"] == VERIFY_STEPS


def test_the_first_steps_are_fingerprinted(run_dir):
    prints = json.loads((run_dir / FINGERPRINTS_NAME).read_text())
    assert [r["step"] for r in prints["records"]] == list(range(1, VERIFY_STEPS + 1))
    assert len({r["digest"] for r in prints["records"]}) == VERIFY_STEPS  # every step changed the parameters
    assert all(isinstance(r["loss"], float) and r["norm"] > 0 for r in prints["records"])
    saved = torch.load(run_dir / prints["state"], weights_only=True)
    assert run_dir / prints["state"] == state_path(run_dir, VERIFY_STEPS)
    assert saved["step"] == VERIFY_STEPS and state_digest(saved["state_dict"]) == prints["records"][-1]["digest"]
    assert any(k.startswith("representation.") for k in saved["state_dict"])


def test_the_config_hash_names_the_recipe(run_dir):
    """Same config, same hash (whatever the folder); another seed, another hash. The recipe is the
    config as the run resolved and recorded it in config.yaml: ``representation.sampler: auto``
    is recorded as the sampler it chose (``dense`` on a CPU), so the unresolved config differs
    there and only there."""
    from test_bad_inputs import tiny_cfg

    from threedgen.config import load_run_config, to_yaml

    recorded = load_run_config(run_dir / "config.yaml")
    same = build_manifest(recorded, run_dir.parent / "elsewhere", "cpu")
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    assert same["config_sha256"] == manifest["config_sha256"]
    cfg = tiny_cfg(steps=STEPS, extra=[f"verify_steps={VERIFY_STEPS}"])
    fresh = build_manifest(cfg, run_dir, "cpu")
    assert fresh["config"]["representation"]["sampler"] == "auto" and same["config"]["representation"]["sampler"] == "dense"
    cfg.representation.sampler = "dense"
    assert to_yaml(cfg) == to_yaml(recorded)
    assert build_manifest(cfg, run_dir, "cpu")["config_sha256"] == manifest["config_sha256"]
    cfg.seed = 1
    assert build_manifest(cfg, run_dir, "cpu")["config_sha256"] != same["config_sha256"]


def test_a_replay_on_the_same_machine_is_bit_exact(run_dir, capsys):
    code, out = verify_cli(capsys, run_dir)
    assert code == 0 and out.startswith(f"bit-exact: {VERIFY_STEPS} step(s) replayed on cpu"), out
    assert out.count("\n") == 1
    code, out = verify_cli(capsys, run_dir, "--steps", 2, "--json")
    report = json.loads(out)
    assert code == 0 and report["status"] == "bit-exact" and report["steps"] == 2
    assert report["max_param_diff"] == 0.0 and report["step"] is None


def test_a_changed_saved_state_diverges_at_its_step(copy, capsys):
    path = state_path(copy, VERIFY_STEPS)
    saved = torch.load(path, weights_only=True)
    key = next(k for k, v in saved["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    saved["state_dict"][key].view(-1)[7] += 0.5
    torch.save(saved, path)
    code, out = verify_cli(capsys, copy, "--json")
    report = json.loads(out)
    assert code == 1 and report["status"] == "diverged" and report["step"] == VERIFY_STEPS
    assert report["first_difference"] is None  # the replay itself matches every recorded digest
    assert report["max_param_diff"] == pytest.approx(0.5, rel=1e-3)
    assert "verify-step-000004.pt does not match the run's fingerprint of step 4" in report["causes"][0]
    assert report["text"].startswith("diverged at step 4: the parameters differ from the saved step-4 state")


def test_a_changed_learning_rate_diverges_at_step_1_naming_it(copy, capsys):
    config = yaml.safe_load((copy / "config.yaml").read_text())
    lr = config["representation"]["lr_color"]
    config["representation"]["lr_color"] = lr / 4
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    code, out = verify_cli(capsys, copy)
    assert code == 1 and out.startswith("diverged at step 1: the parameters differ"), out
    assert f"config.yaml no longer matches the manifest's config: representation.lr_color {lr} -> {lr / 4}" in out
    assert out.count("\n") == 1


def test_a_change_outside_training_stays_bit_exact_and_is_named(copy):
    config = yaml.safe_load((copy / "config.yaml").read_text())
    faces = config["export"]["faces"]
    config["export"]["faces"] = faces + 1000
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    report = verify_run(copy, steps=1)
    assert report["status"] == "bit-exact"
    assert report["causes"] == [f"config.yaml no longer matches the manifest's config: export.faces {faces} -> "
                                f"{faces + 1000}"]


@pytest.mark.parametrize("field,value,said", [("version", "0.0.1", "written by threedgen 0.0.1"),
                                               ("format", 99, "(manifest format 99)")])
def test_a_manifest_of_another_version_is_refused_in_one_line(copy, field, value, said):
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    if field == "version":
        manifest["threedgen"]["version"] = value
    else:
        manifest["format"] = value
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UserError) as info:
        verify_run(copy)
    message = str(info.value)
    assert said in message and f"this is threedgen {threedgen.__version__}" in message and "\n" not in message


def test_the_cli_refuses_another_version_s_manifest_with_exit_2(copy, capsys):
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["threedgen"]["version"] = "0.0.1"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("threedgen: error: ") and "written by threedgen 0.0.1" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_folder_without_a_manifest_is_refused(copy, tmp_path):
    (copy / MANIFEST_NAME).unlink()
    with pytest.raises(UserError, match=r"has no manifest\.json") as info:
        verify_run(copy)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="is not a folder"):
        verify_run(tmp_path / "no-such-run")


def test_more_steps_than_fingerprinted_are_refused(run_dir):
    with pytest.raises(UserError, match=r"--steps 5: the run fingerprinted 4 step\(s\); give 1 to 4"):
        verify_run(run_dir, steps=VERIFY_STEPS + 1)


def test_a_resumed_run_keeps_its_manifest_and_fingerprints(copy):
    from threedgen.runner import run

    before = {name: (copy / name).read_bytes() for name in (MANIFEST_NAME, FINGERPRINTS_NAME)}
    run(resume=copy, steps=STEPS + 2, progress_bar=False)
    assert json.loads((copy / "status.json").read_text())["step"] == STEPS + 2
    assert {name: (copy / name).read_bytes() for name in before} == before


# ---- the verdict, on made-up records -----------------------------------------------------------

def _records(digests, losses, norms):
    return [{"step": i + 1, "digest": d, "loss": loss, "norm": n}
            for i, (d, loss, n) in enumerate(zip(digests, losses, norms))]


def _verdict(tmp_path, run_dir, replayed, replay_state):
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    prints = json.loads((run_dir / FINGERPRINTS_NAME).read_text())
    here = {**manifest, "determinism": {**manifest["determinism"], "torch_threads": 64}}
    return compare(run_dir, manifest, prints, VERIFY_STEPS, replayed, replay_state, here, [])


def test_rounding_differences_are_within_tolerance(run_dir, tmp_path):
    prints = json.loads((run_dir / FINGERPRINTS_NAME).read_text())["records"]
    saved = torch.load(state_path(run_dir, VERIFY_STEPS), weights_only=True)["state_dict"]
    nudged = {k: v + PARAM_ATOL / 10 if v.is_floating_point() else v for k, v in saved.items()}
    replayed = _records(["x"] * VERIFY_STEPS, [r["loss"] * (1 + 1e-7) for r in prints],
                        [r["norm"] * (1 + 1e-7) for r in prints])
    report = _verdict(tmp_path, run_dir, replayed, nudged)
    assert report["status"] == "within tolerance" and report["step"] == 1
    assert report["max_param_diff"] == pytest.approx(PARAM_ATOL / 10, rel=0.05)  # float32 rounding
    assert report["causes"][0].startswith("different determinism settings: torch_threads")
    # A loss that differs beyond tolerance at step 3 is where it diverged.
    replayed[2]["loss"] = prints[2]["loss"] * 1.01
    report = _verdict(tmp_path, run_dir, replayed, nudged)
    assert report["status"] == "diverged" and report["step"] == 3 and "the loss differs" in report["text"]


def test_the_prior_weights_are_hashed(tmp_path):
    from threedgen.guidance.priors.config import ShapesUNetPriorConfig

    cfg = ShapesUNetPriorConfig()
    record = prior_record(cfg)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert record["family"] == "diffusers" and record["location"] == str(Path(cfg.model).resolve())
    assert record["files"][weights] == hashlib.sha256((Path(cfg.model) / weights).read_bytes()).hexdigest()
    assert prior_record(cfg)["sha256"] == record["sha256"]  # the second time from the hash cache
    hub = prior_record(ShapesUNetPriorConfig(model="nobody/not-a-cached-model"))
    assert hub["hub_id"] == "nobody/not-a-cached-model" and hub["snapshot"] is None and hub["files"] == {}
