"""The benchmark scripts that need hardware this machine lacks still run here: the GPU throughput
script on the tiny random pipeline on the CPU (its numbers mean nothing; the check is that the
code path a GPU session runs has no error and reports every column)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
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


def test_gpu_throughput_writes_json_rows_and_reuses_a_saved_model(tmp_path):
    import json

    gpu = _load("gpu_throughput")
    model = tmp_path / "model"
    assert gpu.main(["--tiny", "--save-model", str(model)]) == str(model)
    assert (model / "model_index.json").is_file()
    rows_file = tmp_path / "rows.json"
    gpu.main(["--model", str(model), "--device", "cpu", "--representations", "gaussians", "--steps", "2",
              "--warmup", "1", "--repeats", "1", "--json", str(rows_file)])
    data = json.loads(rows_file.read_text())
    assert data["model"] == str(model) and data["device"] == "cpu"
    (row,) = data["rows"]
    assert row["representation"] == "gaussians" and row["it_s"] > 0 and row["floor_ms"] > 0
    assert row["peak_gib"] is None  # NaN on a CPU -> null
    assert row["ratio"] == pytest.approx(row["step_ms"] / row["floor_ms"])


def test_gpu_throughput_times_a_nerf_after_the_occupancy_grid_warmup_and_deep_merges_overrides(
        tiny_sd_dir, monkeypatch):
    """nerfacc's estimator refreshes every cell for its first 256 steps: the timed window starts
    after them. ``prior.x=...`` keeps the rest of ``prior`` (the model folder, offline loading)."""
    import nerfacc
    import torch

    import threedgen.runner as runner
    from threedgen.config import parse_overrides

    gpu = _load("gpu_throughput")
    seen = {}
    real_build = runner.build_components

    def build(cfg, device):
        seen["prior"] = cfg.prior
        system = real_build(cfg, device)
        # the CUDA sampler's estimator, built on the CPU: only its warm-up length is read here
        system.representation.estimator = nerfacc.OccGridEstimator(roi_aabb=[-1, -1, -1, 1, 1, 1], resolution=8)
        return system

    warmups = []

    def timed(fn, steps, warmup, device):
        warmups.append(warmup)
        return 0.01

    monkeypatch.setattr(runner, "build_components", build)
    monkeypatch.setattr(gpu, "timed_steps", timed)
    row = gpu.measure(str(tiny_sd_dir), "nerf", torch.device("cpu"), 5, 3,
                      parse_overrides(["prior.keep_text_encoder=true", "render.resolution=16"]))
    assert warmups == [256, 3]  # the steps after the grid's warm-up; the teacher-only floor as asked
    assert row["warmup"] == 256 and row["steps"] == 5
    assert seen["prior"].model == str(tiny_sd_dir) and seen["prior"].local_files_only is True
    assert seen["prior"].keep_text_encoder is True
    assert gpu.deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 5}}) == {"a": {"b": 1, "c": 5}, "d": 3}


def test_gpu_throughput_builds_the_full_size_sd21_architecture():
    gpu = _load("gpu_throughput")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

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


def test_janus_benchmark_interval_table_and_a_tiny_cell(tmp_path, monkeypatch):
    janus = _load("janus")
    # Wilson 95 % intervals (z = 1.96), checked against statsmodels' proportion_confint(method="wilson").
    assert janus.wilson(3, 8) == pytest.approx((0.1368, 0.6943), abs=1e-4)
    assert janus.wilson(0, 8) == pytest.approx((0.0, 0.3244), abs=1e-4)
    assert janus.wilson(8, 8) == pytest.approx((0.6756, 1.0), abs=1e-4)
    assert janus.prior_args("control", 0.95, 0.5) == []
    assert janus.prior_args("sds-unbiased", 0.95, 0.5) == ["prior.camera_kappa=0"]
    assert "prior.front_bias=0.95" in janus.prior_args("vsd", 0.95, 0.5)
    rows = [{"cell": "sds", "object": "house", "janus": j, "janus_view_rate": r, "view_mi": 0.5, "view_mi_truth": 0.9,
             "back_front_psnr_gap": -1.0, "mask_iou": 0.9, "wall": 40.0, "front_marker_voxels": parts,
             "front_marker_voxels_truth": [300]} for j, r, parts in ((True, 0.5, [240, 90]), (False, 0.0, [60]))]
    line = janus.table(rows, ["sds"], ["house"]).splitlines()[2]
    # Janus by the metric in 1 of 2 runs, and its second part (90 voxels) is over a quarter of the
    # truth's 300: a second front; the largest parts are 0.8 and 0.2 of the truth's.
    assert line == "| sds | house | 2 | 1 | 0.50 [0.09, 0.91] | 1 | 0.50 | 0.25 | 0.50 (0.90) | -1.00 | 0.900 | 40 |"
    # One real run through the CLI, in a world of one shape, and its table row.
    out = tmp_path / "bench"
    monkeypatch.setattr("sys.argv", ["janus.py", "--cells", "sds", "--seeds", "1", "--steps", "3", "--jobs", "1",
                                     "--out", str(out), "--", "prior.shapes=[house]", "render.resolution=16",
                                     "render.coarse_resolution=0", "representation.num_samples=16"])
    janus.main()
    (result,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert result["cell"] == "sds" and result["object"] == "house" and isinstance(result["front_markers"], int)
    assert 0.0 <= result["janus_view_rate"] <= 1.0 and 0.0 <= result["view_mi"] <= 1.0
    # --rescore evaluates the recorded run again (same run, same numbers) and keeps one line per run.
    monkeypatch.setattr("sys.argv", ["janus.py", "--cells", "sds", "--seeds", "1", "--steps", "3", "--jobs", "1",
                                     "--out", str(out), "--rescore"])
    janus.main()
    (again,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert again["run_dir"] == result["run_dir"] and again["front_markers"] == result["front_markers"]
    assert again["view_mi"] == pytest.approx(result["view_mi"]) and "janus_yaw_degrees" in again
    # The prior's own check on the recorded run (benchmarks/janus_prior_check.py), and its AUC.
    check = _load("janus_prior_check")
    assert check.auc([0.9, 0.1, 0.5, 0.5], [True, False, True, False]) == pytest.approx(3.5 / 4)  # a tie counts half
    assert check.auc([0.3], [True]) is None
    monkeypatch.setattr("sys.argv", ["janus_prior_check.py", "--out", str(out), "--judges", "unbiased"])
    check.main()
    (scored,) = [json.loads(line) for line in (out / "prior_check.jsonl").read_text().splitlines()]
    assert scored["run_dir"] == result["run_dir"] and 0.0 <= scored["janus_score_prior"] <= 1.0


def test_prior_fidelity_scores_samples_against_the_truth(tmp_path, monkeypatch):
    fid = _load("prior_fidelity")
    assert [fid.sector(a) for a in (0, 44, 46, 134, 136, 180, -100)] == ["front", "front", "side", "side", "back",
                                                                        "back", "side"]
    img = torch.ones(3, 8, 8)
    img[:, 2:6, 2:6] = torch.tensor([0.2, 0.3, 0.9])[:, None, None]  # a blue square on white
    mask, bg = fid.sample_mask(img)
    assert mask.sum() == 16 and torch.allclose(bg, torch.ones(3))
    assert fid.iou(mask, mask) == 1.0 and fid.iou(mask, torch.zeros_like(mask)) == 0.0
    # a few DDIM steps of the shipped model on one object, both modes, and the tables
    out = tmp_path / "fid.json"
    monkeypatch.setattr("sys.argv", ["prior_fidelity.py", "--shapes", "house", "--colours", "red", "--steps", "2",
                                     "--json", str(out), "--no-rms"])
    fid.main()
    data = json.loads(out.read_text())
    camera, tags = data["summaries"]
    assert camera["n"] == tags["n"] == 8 and 0.0 <= camera["mean_iou"] <= 1.0
    assert 0.0 <= tags["sector_accuracy"] <= 1.0 and 0.0 <= camera["sector_accuracy"] <= 1.0
    assert all("best_azimuth" in r for r in data["rows"]["tags"])


def test_the_mutation_campaign_s_list_names_code_and_tests_that_exist():
    """``benchmarks/mutation.py`` takes every module, function and test file from its one list
    (``TARGETS``): after code moves, this fails until the list follows it, so the campaign reruns
    unchanged. Each scoped name is a function or class of its module; each test file exists."""
    mutation = _load("mutation")
    root = BENCHMARKS.parent
    assert len({t.name for t in mutation.TARGETS}) == len(mutation.TARGETS)
    for target in mutation.TARGETS:
        source = (root / target.module).read_text()
        names = {name for name, _, _ in mutation._definitions(source)}
        assert target.scope == ("*",) or set(target.scope) <= names, (target.name, set(target.scope) - names)
        for test in target.tests:
            path = root / test.split("::")[0]
            assert path.is_file(), (target.name, test)
            if "::" in test:
                func = test.split("::")[1].split("[")[0]
                assert re.search(rf"^def {re.escape(func)}\(", path.read_text(), re.M), (target.name, test)
        assert 0 < target.sample <= 1
    for eq in mutation.EQUIVALENT:  # each equivalent mutant names a line that is still there
        assert eq.line in {line.strip() for line in (root / eq.module).read_text().splitlines()}, eq
        assert eq.operator in mutation.OPERATORS and eq.reason
    # the scope rule: a mutant belongs to the innermost definition around its line
    target = mutation.Target("t", "m.py", ("Outer.inner",), ())
    definitions = mutation._definitions("class Outer:\n    def inner(self):\n        return 1\n    def other(self):\n"
                                        "        return 2\n")
    assert [mutation.in_scope(target, definitions, line) for line in (1, 2, 3, 4, 5)] == [False, True, True, False,
                                                                                          False]
