"""Every bad input of the CLI: one line on stderr, exit code 2, nothing written."""


import pytest

from threedgen.cli import main

FAST = ["steps=2"]


def _files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("args,expected", [
    (["run", "--prompt", "a red cube", "--guidance", "sdss"], "unknown guidance 'sdss'; valid: sds"),
    (["run", "--prompt", ""], "prompt is empty"),
    (["run", "--prompt", "   \t "], "prompt is empty"),
    (["run", "--prompt", "x" * 10_000], "limit is 1000"),
    (["run", "--prompt", "a hamburger"], "outside the shapes prior's vocabulary"),
    (["run", "--prompt", "../../etc/passwd"], "outside the shapes prior's vocabulary"),
    (["run", "--prompt", "/abs/path"], "outside the shapes prior's vocabulary"),
    (["run", "--prompt", "${oc.env:HOME}"], "outside the shapes prior's vocabulary"),
    (["run", "--prompt", "a red cube", "--steps", "0"], "--steps must be an integer from 1 to 1000000; got 0"),
    (["run", "--prompt", "a red cube", "--steps", "-1"], "--steps must be an integer from 1 to 1000000"),
    (["run", "--prompt", "a red cube", "--steps", "1.5"], "got '1.5'"),
    (["run", "--prompt", "a red cube", "--steps", "NaN"], "got 'NaN'"),
    (["run", "--prompt", "a red cube", "--steps", "abc"], "got 'abc'"),
    (["run", "--prompt", "a red cube", "--steps", "1000000000000"], "from 1 to 1000000"),
    (["run", "--prompt", "a red cube", "--seed", "-3"], "--seed must be an integer"),
    (["run", "--prompt", "a red cube", "--representation", "voxels"], "unknown representation 'voxels'"),
    (["run", "--prompt", "a red cube", "--prior", "sd15"], "unknown prior 'sd15'; valid: "),
    (["run", "--prompt", "a red cube", "guidance.guidance_scal=3"], "nearest valid keys: guidance.guidance_scale"),
    (["run", "--prompt", "a red cube", "render.resolution=1"], "render.resolution must be an integer from 8"),
    (["run"], "--prompt is required"),
    (["run", "--prompt", "a red cube", "--bogus"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
    (["eval", "no/such/run"], "is not a threedgen run folder"),
    (["export", "no/such/run"], "is not a threedgen run folder"),
    (["run", "--resume", "no/such/run"], "is not a threedgen run folder"),
    (["run", "--resume", "x", "--seed", "3"], "drop --seed"),
    (["run", "--resume", "x", "--guidance", "sds2"], "drop --guidance"),
    (["run", "--prompt", "a red cube", "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = args + (["--out", str(out)] if args[0] == "run" and "--resume" not in args else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("threedgen: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert _files(tmp_path) in ([], ["out"]) and (not out.exists() or _files(out) == [])


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["run", "--prompt", "a red cube", "--out", str(blocker / "sub"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("threedgen: error: output folder") and str(blocker / "sub") in err and "\n" not in err


def test_help_everywhere(capsys):
    for argv in (["--help"], ["run", "--help"], ["export", "--help"], ["eval", "--help"], ["guidance", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--prompt" in capsys.readouterr().out


def test_guidance_list(capsys):
    assert main(["guidance", "list"]) == 0
    out = capsys.readouterr().out
    assert "sds" in out and "DreamFusion" in out


def test_export_and_eval_of_a_finished_run_exit_0_and_print_what_they_made(tmp_path, capsys):
    """``threedgen export`` lists the files it wrote (each exists); ``threedgen eval`` prints its
    table, or JSON with ``--json``; both exit 0."""
    import json
    from pathlib import Path

    from test_bad_inputs import tiny_run

    run_dir = tiny_run(tmp_path, steps=2)
    assert main(["export", str(run_dir), "--faces", "0"]) == 0
    files = [Path(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert files and all(f.is_file() and f.is_relative_to(run_dir) for f in files)
    assert {"mesh.glb", "mesh.obj", "mesh.ply"} <= {f.name for f in files}
    assert main(["eval", str(run_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["mask_iou"] <= 1 and metrics["psnr"] > 0
    assert main(["eval", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "mask_iou" in table and not table.lstrip().startswith("{")
