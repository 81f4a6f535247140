"""Every documented limit, at its edges: the smallest and largest allowed values are accepted
(``threedgen config show`` prints them back, exit 0), one step beyond is refused in one line that
names the limits (exit 2), and a boolean is never taken for a number."""

from __future__ import annotations

import json

import pytest

from threedgen.cli import main
from threedgen.errors import UserError
from threedgen.schema import MAX_PROMPT_CHARS, MAX_STEPS, clean_prompt

# key, lowest allowed, highest allowed, just below, just above (None: no value below or above)
INTEGER_LIMITS = [
    ("steps", 1, MAX_STEPS, 0, MAX_STEPS + 1),
    ("seed", 0, 2 ** 32 - 1, -1, 2 ** 32),
    ("checkpoint_every", 1, MAX_STEPS, 0, MAX_STEPS + 1),
    ("preview_every", 1, MAX_STEPS, 0, MAX_STEPS + 1),
    ("verify_steps", 0, 1000, -1, 1001),
    ("render.resolution", 8, 1024, 7, 1025),
    ("camera.batch_size", 1, 64, 0, 65),
    ("optimizer.rollback_after", 1, 100_000, 0, 100_001),
    ("optimizer.max_rollbacks", 0, 100, -1, 101),
    ("export.resolution", 8, 1024, 7, 1025),
    ("export.texture_size", 64, 8192, 63, 8193),
    ("export.video_frames", 1, 1000, 0, 1001),
    ("export.video_resolution", 16, 2048, 15, 2049),
]
NUMBER_LIMITS = [
    ("loss.lambda_sparsity", 0, 1e6, -0.001, 1.001e6),
    ("loss.lambda_opaque", 0, 1e6, -0.001, 1.001e6),
    ("loss.lambda_smooth", 0, 1e6, -0.001, 1.001e6),
    ("optimizer.rollback_lr_factor", 1e-6, 1, 0.0, 1.001),
    ("export.scale", 1e-6, 1e6, 0.0, 1.001e6),
    ("export.video_elevation", -90, 90, -90.5, 90.5),
    ("camera.random_background_prob", 0, 1, -0.01, 1.01),
]


def _show(capsys, *args) -> tuple[int, dict, str]:
    code = main(["config", "show", *map(str, args)])
    captured = capsys.readouterr()
    values = {}
    for line in captured.out.splitlines():
        if " = " in line and not line.startswith("#"):
            key, _, rest = line.partition(" = ")
            values[key.strip()] = json.loads(rest.split("  # ")[0])
    return code, values, captured.err


def _refused(capsys, *args) -> str:
    code, values, err = _show(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("threedgen: error: "), err
    return lines[0]


@pytest.mark.parametrize("key,low,high,below,above", INTEGER_LIMITS, ids=[row[0] for row in INTEGER_LIMITS])
def test_integer_limits_are_inclusive(capsys, key, low, high, below, above):
    for value in (low, high):
        code, values, err = _show(capsys, f"{key}={value}")
        assert code == 0 and values[key] == value, err
    for value in (below, above):
        line = _refused(capsys, f"{key}={value}")
        assert f"{key} must be an integer from {low} to {high}; got {value}" in line
    assert f"{key} must be an integer" in _refused(capsys, f"{key}=true")  # a boolean is not a number
    assert f"{key} must be an integer" in _refused(capsys, f"{key}={low}.5")


@pytest.mark.parametrize("key,low,high,below,above", NUMBER_LIMITS, ids=[row[0] for row in NUMBER_LIMITS])
def test_number_limits_are_inclusive(capsys, key, low, high, below, above):
    for value in (low, high):
        code, values, err = _show(capsys, f"{key}={value}")
        assert code == 0 and values[key] == pytest.approx(value), err
    for value in (below, above, "nan", "inf"):
        line = _refused(capsys, f"{key}={value}")
        assert f"{key} must be a number from {low:g} to {high:g}" in line
    assert f"{key} must be a number" in _refused(capsys, f"{key}=false")


def test_the_flags_take_their_largest_values(capsys):
    code, values, err = _show(capsys, "--steps", MAX_STEPS, "--seed", 2 ** 32 - 1)
    assert code == 0 and values["steps"] == MAX_STEPS and values["seed"] == 2 ** 32 - 1, err
    assert "--seed must be an integer from 0 to 4294967295; got 4294967296" in _refused(capsys, "--seed", 2 ** 32)


def test_coarse_resolution_is_off_or_from_8(capsys):
    for value in (0, 8, 1024):
        code, values, err = _show(capsys, f"render.coarse_resolution={value}")
        assert code == 0 and values["render.coarse_resolution"] == value, err
    for value in (1, 7):
        assert "must be 0 (off) or from 8 to 1024; got " + str(value) in _refused(
            capsys, f"render.coarse_resolution={value}")
    for value in (0, 1, 0.25):
        code, values, err = _show(capsys, f"render.coarse_until={value}")
        assert code == 0 and values["render.coarse_until"] == value, err
    for value in (-0.1, 1.1, "true"):
        assert "render.coarse_until must be a fraction of the run from 0 to 1" in _refused(
            capsys, f"render.coarse_until={value}")


def test_faces_are_off_or_at_least_100(capsys):
    for value in (0, 100, 10_000_000):
        code, values, err = _show(capsys, f"export.faces={value}")
        assert code == 0 and values["export.faces"] == value, err
    for value in (1, 99):
        assert f"export.faces must be 0 (no decimation) or at least 100; got {value}" in _refused(
            capsys, f"export.faces={value}")
    assert "export.faces must be an integer from 0 to 10000000" in _refused(capsys, "export.faces=10000001")


@pytest.mark.parametrize("key,low,high", [("camera.elevation_range", -90, 90), ("camera.azimuth_range", -360, 360),
                                          ("camera.distance_range", 0.1, 100), ("camera.fovy_range", 1, 170)])
def test_camera_ranges_take_their_edges(capsys, key, low, high):
    code, values, err = _show(capsys, f"{key}=[{low},{high}]")
    assert code == 0 and values[key] == [pytest.approx(low), pytest.approx(high)], err
    code, values, err = _show(capsys, f"{key}=[{high},{high}]")
    assert code == 0, err  # low == high: one value
    assert f"{key} must be a number from {low:g} to {high:g}" in _refused(capsys, f"{key}=[{low},{high * 1.5}]")
    assert f"{key} must be [low, high] with low <= high" in _refused(capsys, f"{key}=[{high},{low}]")
    assert f"{key} must be [low, high] with low <= high; got [{low}, {low}, {low}]" in _refused(
        capsys, f"{key}=[{low},{low},{low}]")


def test_a_prompt_of_exactly_the_limit_is_kept_whole():
    assert clean_prompt("x" * MAX_PROMPT_CHARS) == "x" * MAX_PROMPT_CHARS
    with pytest.raises(UserError, match=f"prompt is {MAX_PROMPT_CHARS + 1} characters; the limit is 1000"):
        clean_prompt("x" * (MAX_PROMPT_CHARS + 1))
    # controls are stripped before the count; runs of spaces in a prompt count as one
    assert clean_prompt("\x00" * 5 + "x" * MAX_PROMPT_CHARS) == "x" * MAX_PROMPT_CHARS
    assert clean_prompt("a  red\tcube ") == "a red cube"


def test_a_negative_prompt_has_the_same_limit(capsys):
    code, values, err = _show(capsys, "--negative-prompt", "y" * MAX_PROMPT_CHARS)
    assert code == 0 and values["negative_prompt"] == "y" * MAX_PROMPT_CHARS, err
    assert "negative prompt is 1001 characters; the limit is 1000" in _refused(
        capsys, "--negative-prompt", "y" * (MAX_PROMPT_CHARS + 1))
    code, values, err = _show(capsys, "--negative-prompt", "  blurry,\n low quality  ")
    assert code == 0 and values["negative_prompt"] == "blurry,  low quality", err  # a line break is a space


def test_device_names(capsys):
    for device in ("auto", "cpu"):
        code, values, err = _show(capsys, "--device", device)
        assert code == 0 and values["device"] == device, err
    for device in ("cuda", "cuda:0", "cuda:12"):  # well formed; whether the GPU exists is checked next
        code, values, err = _show(capsys, "--device", device)
        assert code == 0 or "CUDA is not available" in err, err
    for device in ("gpu", "cuda:", "cuda:x", "cuda:0 ", "CPU"):
        assert "device must be auto, cpu, cuda or cuda:N" in _refused(capsys, "--device", device)


def test_an_unknown_name_lists_the_three_nearest_first_then_the_rest_in_order():
    from threedgen.errors import unknown_name

    valid = ["zzzz", "abcx", "abxx", "axxx", "abcd"]
    assert str(unknown_name("guidance", "abcd", valid)) == (
        "unknown guidance 'abcd'; valid: abcd, abcx, abxx, zzzz, axxx")
    assert str(unknown_name("prior", "qq", [])) == "unknown prior 'qq'; valid: "
