import os

import pytest
import yaml

from threedgen.config import build_config, escape_interpolation, parse_overrides, to_yaml
from threedgen.errors import UserError
from threedgen.schedule import schedule_value


def test_presets_and_layers():
    cfg = build_config(flags={"prompt": "a red cube"})
    assert cfg.guidance.name == "sds" and cfg.representation.name == "nerf" and cfg.prior.name == "shapes"
    assert cfg.representation.bound == 0.75  # from configs/priors/shapes-world.yaml
    assert cfg.guidance.guidance_scale == 7.5
    cfg = build_config(overrides=parse_overrides(["guidance.guidance_scale=20", "camera.elevation_range=[0, 30]",
                                                  "representation.mesh_threshold=null"]),
                       flags={"prompt": "a red cube", "steps": 10})
    assert cfg.guidance.guidance_scale == 20.0 and tuple(cfg.camera.elevation_range) == (0.0, 30.0)
    assert cfg.steps == 10 and cfg.representation.mesh_threshold is None


@pytest.mark.parametrize("override,expected", [
    ("guidance.guidanse_scale=3", "nearest valid keys: guidance.guidance_scale"),
    ("stepz=3", "nearest valid keys: steps"),
    ("representation.num_sample=3", "representation.num_samples"),
    ("camera.elevation=3", "camera.elevation_range"),
])
def test_unknown_keys_name_the_nearest(override, expected):
    with pytest.raises(UserError, match=expected):
        build_config(overrides=parse_overrides([override]), flags={"prompt": "x"})


@pytest.mark.parametrize("override,expected", [
    ("steps=0", "steps must be an integer from 1 to 1000000; got 0"),
    ("steps=-1", "from 1 to 1000000"),
    ("steps=1.5", "from 1 to 1000000; got 1.5"),
    ("steps=abc", "from 1 to 1000000; got 'abc'"),
    ("steps=1e12", "from 1 to 1000000"),
    ("seed=-1", "seed must be an integer from 0 to 4294967295"),
    ("seed=4294967296", "seed must be an integer"),
    ("render.resolution=0", "render.resolution must be an integer from 8 to 1024"),
    ("render.resolution=100000", "render.resolution"),
    ("guidance.guidance_scale=.nan", "finite number"),
    ("guidance.guidance_scale=.inf", "finite number"),
    ("guidance.guidance_scale=-1", "finite number"),
    ("guidance.name=magic", "unknown guidance 'magic'; valid: "),
    ("representation.name=mesh", "unknown representation 'mesh'; valid: nerf"),
    ("prior.name=sd", "unknown prior 'sd'"),
    ("guidance=3", "section"),
    ("guidance.min_step_percent=abc", "a schedule is a number"),
    ("guidance.max_step_percent=[0.9]", "a schedule is a number"),
    ("guidance.weighting=log", "guidance.weighting must be one of sds, uniform, fantasia3d"),
    ("prior.azimuth_step=0", "prior.azimuth_step must be a number from 1 to 360"),
    ("prior.supersample=0", "prior.supersample must be an integer from 1 to 4"),
    ("prior.camera_kappa=.nan", "prior.camera_kappa"),
    ("prior.resolution=4096", "prior.resolution"),
    ("representation.density_blob_radius=0", "representation.density_blob_radius"),
    ("representation.field=3", "representation.field must be one of auto, grid, hash"),
    ("representation.num_samples=0", "representation.num_samples"),
    ("camera.elevation_range=[50,10]", "low <= high"),
    ("camera.fovy_range=[0,0]", "camera.fovy_range"),
    ("device=gpu", "device must be auto, cpu, cuda or cuda:N"),
    ("not a pair", "key=value"),
    ("../x=1", "dotted name"),
])
def test_bad_values_are_one_line_errors(override, expected):
    with pytest.raises(UserError) as err:
        build_config(overrides=parse_overrides([override]), flags={"prompt": "a red cube"})
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["${oc.env:HOME}", "a ${x} b", "\\${oc.env:HOME}", "\\\\${y}", "$", "${", "a\\b"])
def test_interpolations_are_never_resolved(text):
    # Text that is no shapes-prior prompt: the config layer alone (no prior's checks of the run).
    cfg = build_config(overrides=parse_overrides([f"negative_prompt={text}"]), flags={"prompt": f"p {text}"},
                       whole_run=False)
    assert cfg.prompt == f"p {text}" and cfg.negative_prompt == text
    dumped = to_yaml(cfg)
    assert os.environ.get("HOME", "/root") not in dumped.replace("/root/", "")  # no environment value leaks
    assert yaml.safe_load(dumped)["negative_prompt"] == text


def test_text_fields_keep_the_text_as_typed():
    cfg = build_config(overrides=parse_overrides(["negative_prompt=no", "device=cpu"]), flags={"prompt": "a red cube"},
                       whole_run=False)
    assert cfg.negative_prompt == "no" and cfg.device == "cpu"


def test_prior_names_never_pick_files():
    with pytest.raises(UserError, match="unknown prior"):
        build_config(prior="../sds-nerf", flags={"prompt": "a red cube"})


def test_snapshot_round_trip(tmp_path):
    cfg = build_config(flags={"prompt": "a ${oc.env:HOME} cube", "seed": 7}, whole_run=False)
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = build_config(base=yaml.safe_load(path.read_text()), whole_run=False)
    assert again == cfg


def test_prompt_cleaning():
    cfg = build_config(flags={"prompt": "  a\x00 red\u202e cube\t\n"})
    assert cfg.prompt == "a red cube"
    for bad in ["", "   ", "\x00\x01"]:
        with pytest.raises(UserError, match="prompt is empty"):
            build_config(flags={"prompt": bad})
    with pytest.raises(UserError, match="limit is 1000"):
        build_config(flags={"prompt": "a" * 10_000})


def test_escape_rule():
    assert escape_interpolation("${a}") == "\\${a}"
    assert escape_interpolation("\\${a}") == "\\\\\\${a}"


def test_schedule_values():
    assert schedule_value(0.5, 10, 100) == 0.5
    assert schedule_value([1.0, 0.0], 50, 100) == pytest.approx(0.5)
    assert schedule_value([10, 1.0, 0.0, 20], 5, 100) == 1.0
    # end <= 1: the steps are fractions of the run
    assert schedule_value([0, 0.98, 0.5, 0.3], 150, 1000) == pytest.approx(0.74)
    assert schedule_value([0, 0.98, 0.5, 0.3], 300, 1000) == pytest.approx(0.5)
    assert schedule_value([0, 0.98, 0.5, 0.3], 15, 100) == pytest.approx(0.74)
    from threedgen.schedule import check_schedule

    with pytest.raises(UserError, match="start <= end"):
        check_schedule("guidance.max_step_percent", [0.5, 0.98, 0.5, 0.3], 0, 1)
    assert schedule_value([10, 1.0, 0.0, 20], 15, 100) == pytest.approx(0.5)
    assert schedule_value([10, 1.0, 0.0, 20], 25, 100) == 0.0
    assert schedule_value(None, 0, 1) is None
