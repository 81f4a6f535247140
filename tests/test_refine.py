"""Stage 2: the exported mesh refined under the run's prior (`--refine`, `threedgen refine`).

Runs here are short and small (a two-shape world, 32-px renders, a 48^3 export of ~2,000 faces,
a 256-px texture), so every assertion is about behaviour: which files, which status, which
errors, and bit-exact resumes; the colour test compares against the truth with margins that hold
on any machine."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from threedgen.cli import main
from threedgen.guidance import GUIDANCE

SMALL = ["prior.shapes=[cube,torus]", "prior.resolution=32", "render.resolution=32", "export.resolution=48",
         "export.faces=2000", "export.texture_size=256", "export.video_frames=4", "export.video_resolution=32",
         "checkpoint_every=10", "preview_every=10"]


def _main(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines()[-1] if captured.out.strip() else "", captured.err


def _run(tmp_path, steps=30, extra=(), representation="nerf", prompt="a red cube", refine_steps=None):
    from threedgen.config import build_config, parse_overrides
    from threedgen.runner import run

    overrides = list(SMALL) + list(extra)
    if refine_steps is not None:
        overrides += ["refine.enabled=true", f"refine.steps={refine_steps}"]
    cfg = build_config(representation=representation, overrides=parse_overrides(overrides),
                       flags={"prompt": prompt, "steps": steps})
    return run(cfg, out=tmp_path, progress_bar=False)


def _status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def _texture(run_dir):
    from PIL import Image

    return np.asarray(Image.open(run_dir / "mesh_texture.png").convert("RGB"))


@pytest.fixture(scope="module")
def coarse_run(tmp_path_factory):
    """A finished stage-1 run (30 steps), to copy and refine."""
    return _run(tmp_path_factory.mktemp("coarse"))


def _copy(run_dir, tmp_path):
    dst = tmp_path / run_dir.name
    shutil.copytree(run_dir, dst)
    return dst


def test_a_refined_run_records_both_stages_and_exports_the_refined_mesh(tmp_path):
    run_dir = _run(tmp_path, steps=20, refine_steps=12)
    status = _status(run_dir)
    assert status["status"] == "succeeded"
    assert status["step"] == 20 and status["max_steps"] == 20
    assert status["coarse"]["step"] == 20 and status["coarse"]["total_seconds"] > 0
    refine = status["refine"]
    assert refine["step"] == 12 and refine["max_steps"] == 12 and refine["train_seconds"] > 0
    assert status["total_seconds"] >= status["coarse"]["total_seconds"] + refine["train_seconds"] - 0.01
    assert (run_dir / "refine" / "start.npz").is_file()
    assert (run_dir / "refine" / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "previews" / "refine-step-000010.png").is_file()
    assert (run_dir / "refine" / "logs" / "metrics.csv").is_file()
    # The published texture is the refined one: the baked start plus the learned correction.
    from threedgen.runs import load_representation

    _, mesh, _ = load_representation(run_dir)
    assert type(mesh).__name__ == "TexturedMesh"
    assert float(mesh.texture_delta.detach().abs().max()) > 0.01
    assert np.array_equal(_texture(run_dir), mesh.texture_image())
    start = np.load(run_dir / "refine" / "start.npz")
    assert not np.array_equal(_texture(run_dir), start["image"])
    # Export and eval read the refined mesh: a re-export writes the same texture.
    before = _texture(run_dir)
    assert main(["export", str(run_dir), "--format", "glb", "--format", "obj"]) == 0
    assert np.array_equal(_texture(run_dir), before)
    glb = trimesh.load(run_dir / "mesh.glb", force="mesh")
    assert glb.visual.kind == "texture" and len(glb.faces) == len(start["faces"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["watertight"] and 0 <= metrics["texture_color_error"] <= 3 ** 0.5
    # A refined mesh is exported as it is: the field's export options are one-line errors.
    assert main(["export", str(run_dir), "--texture", "vertex"]) == 2
    assert main(["export", str(run_dir), "--faces", "500"]) == 2
    # Resuming a finished, refined run has nothing left to do: nothing is written again.
    glb = (run_dir / "mesh.glb").stat().st_mtime_ns
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "mesh.glb").stat().st_mtime_ns == glb and _status(run_dir)["refine"]["step"] == 12


def test_refining_moves_the_colour_towards_the_truth(coarse_run, tmp_path, capsys):
    """The refinement (defaults but the step count) lowers the texture colour error of the short
    coarse run's mesh against the truth: the coarse stage's 30 steps leave it far off."""
    run_dir = _copy(coarse_run, tmp_path)
    before = json.loads((run_dir / "metrics.json").read_text())
    code, last, err = _main(capsys, ["refine", str(run_dir), "--steps", "60", "--no-progress"])
    assert code == 0, err[-3000:]
    assert last == str(run_dir)
    after = json.loads((run_dir / "metrics.json").read_text())
    print(f"colour error {before['texture_color_error']:.3f} -> {after['texture_color_error']:.3f}")
    assert after["texture_color_error"] < 0.8 * before["texture_color_error"]
    assert after["watertight"] and after["normal_error_deg"] == pytest.approx(before["normal_error_deg"], abs=0.5)
    status = _status(run_dir)
    assert status["refine"]["step"] == 60 and status["coarse"]["step"] == 30
    assert "refining" in err


def test_geometry_refinement_keeps_the_mesh_closed_and_flattens_it(coarse_run, tmp_path, capsys):
    """With refine.geometry the vertices move (offsets on the welded surface): the mesh stays
    closed, and the normal-consistency term makes neighbouring faces more alike."""
    from threedgen.refine import read_start
    from threedgen.runs import load_representation

    run_dir = _copy(coarse_run, tmp_path)
    code, _, err = _main(capsys, ["refine", str(run_dir), "--steps", "40", "--no-progress", "refine.geometry=true",
                                  "refine.geometry_lr=0.002"])
    assert code == 0, err[-3000:]
    _, mesh, _ = load_representation(run_dir)
    start = read_start(run_dir)
    assert float(mesh.offsets.detach().abs().max()) > 1e-4

    def roughness(vertices):
        normals = mesh.face_normals(torch.as_tensor(vertices, dtype=torch.float32))
        cos = (normals[mesh.adjacent[:, 0]] * normals[mesh.adjacent[:, 1]]).sum(-1)
        return float((1 - cos).mean())

    assert roughness(mesh.vertices().detach()) < roughness(start.positions)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["watertight"] and metrics["open_edges"] == 0 and metrics["pinched_edges"] == 0


@pytest.mark.parametrize("representation", ["nerf", "gaussians"])
@pytest.mark.parametrize("method", sorted(GUIDANCE))
def test_every_method_refines_three_steps(method, representation, tmp_path):
    from threedgen.config import build_config, parse_overrides
    from threedgen.runner import run

    extra = ["refine.enabled=true", "refine.steps=3", "refine.loss=guidance", "export.evaluate=false",
             "export.formats=[glb]", "export.faces=500", "export.resolution=32"]
    if representation == "gaussians":
        extra.append("representation.num_points=300")
    cfg = build_config(method, representation, "shapes", parse_overrides(SMALL + extra), {"prompt": "a red cube",
                                                                                           "steps": 3})
    run_dir = run(cfg, out=tmp_path, progress_bar=False)
    status = _status(run_dir)
    assert status["status"] == "succeeded" and "error" not in status["refine"], status
    assert status["refine"]["step"] == 3 and status["refine"]["skipped_steps"] == 0


def _wait_for(run_dir_parent, predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list(run_dir_parent.glob("*/status.json"))
        if found:
            try:
                state = json.loads(found[0].read_text())
            except ValueError:
                state = {}
            if predicate(found[0].parent, state):
                return found[0].parent
        time.sleep(0.05)
    raise AssertionError(f"the run ended or timed out first: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def test_sigkill_in_stage_two_resumes_in_stage_two_bit_exactly(tmp_path, capsys):
    """A run killed (SIGKILL) in its refinement keeps stage 1's published asset, resumes in stage 2
    (not from scratch), and ends with the same parameters, bit for bit, as an uninterrupted run."""
    args = ["--prompt", "a red cube", "--steps", "20", "--refine", "--no-progress", *SMALL, "refine.steps=40",
            "checkpoint_every=5", "preview_every=5"]
    straight_out = tmp_path / "straight"
    code, straight, err = _main(capsys, ["run", "--out", str(straight_out), *args])
    assert code == 0, err[-3000:]
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "threedgen", "run", "--out", str(killed_out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = _wait_for(killed_out, lambda d, s: s.get("stage") == "refine" and (s.get("step") or 0) >= 15 and
                            (d / "refine" / "checkpoints" / "last.ckpt").is_file(), proc)
        stage_one = (run_dir / "mesh.glb").read_bytes()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = _status(run_dir)
    assert state["status"] == "running" and state["stage"] == "refine" and state["step"] < 40
    assert (run_dir / "mesh.glb").read_bytes() == stage_one  # stage 1's asset intact
    assert state["coarse"]["step"] == 20
    code, _, err = _main(capsys, ["run", "--resume", str(run_dir), "--no-progress"])
    assert code == 0, err[-3000:]
    state = _status(run_dir)
    assert state["status"] == "succeeded" and state["refine"]["step"] == 40 and state["coarse"]["step"] == 20
    ours = torch.load(run_dir / "refine" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    theirs = torch.load(straight_out / os.path.basename(straight) / "refine" / "checkpoints" / "last.ckpt",
                        weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # Stage 1 was not trained again: its checkpoint is the one it ended with.
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20


def test_a_refinement_that_diverges_leaves_the_stage_one_asset(coarse_run, tmp_path, capsys, monkeypatch):
    import threedgen.refine as refine_module
    from threedgen.guidance.base import GuidanceOutput

    run_dir = _copy(coarse_run, tmp_path)
    glb = (run_dir / "mesh.glb").read_bytes()
    metrics = (run_dir / "metrics.json").read_text()

    def nan_loss(prior, images, *args, **kwargs):
        loss = images.sum() * float("nan")
        return GuidanceOutput(loss, torch.zeros(()), torch.zeros(1))

    monkeypatch.setattr(refine_module, "denoised_target_loss", nan_loss)
    code, _, err = _main(capsys, ["refine", str(run_dir), "--steps", "30", "--no-progress",
                                  ])
    assert code == 0, err[-3000:]
    assert "the refinement failed" in err and "stage-1 asset stays" in err
    status = _status(run_dir)
    assert status["status"] == "succeeded" and "diverged" in status["refine"]["error"]
    assert (run_dir / "mesh.glb").read_bytes() == glb and (run_dir / "metrics.json").read_text() == metrics
    assert not (run_dir / "refine").exists() and (run_dir / "refine-failed").is_dir()
    from threedgen.runs import load_representation

    assert type(load_representation(run_dir)[1]).__name__ != "TexturedMesh"  # export/eval read stage 1 again


def test_a_second_refinement_starts_from_stage_one_and_its_failure_republishes_stage_one(coarse_run, tmp_path,
                                                                                        capsys, monkeypatch):
    """Refining again starts from stage 1's asset (the first refinement's start), not from the
    first refinement's result; when that second refinement fails for good, the files on disk
    become stage 1's again (they were the first refinement's)."""
    import threedgen.refine as refine_module
    from threedgen.guidance.base import GuidanceOutput

    run_dir = _copy(coarse_run, tmp_path)
    coarse_texture = _texture(run_dir)
    code, _, err = _main(capsys, ["refine", str(run_dir), "--steps", "10", "--no-progress"])
    assert code == 0, err[-3000:]
    start = np.load(run_dir / "refine" / "start.npz")["image"]
    assert np.array_equal(start, coarse_texture) and not np.array_equal(_texture(run_dir), coarse_texture)
    code, _, err = _main(capsys, ["refine", str(run_dir), "--steps", "12", "--no-progress"])
    assert code == 0, err[-3000:]
    assert np.array_equal(np.load(run_dir / "refine" / "start.npz")["image"], coarse_texture)  # from stage 1 again
    assert _status(run_dir)["refine"]["step"] == 12 and _status(run_dir)["coarse"]["step"] == 30

    def nan_loss(prior, images, *args, **kwargs):
        return GuidanceOutput(images.sum() * float("nan"), torch.zeros(()), torch.zeros(1))

    monkeypatch.setattr(refine_module, "denoised_target_loss", nan_loss)
    code, _, err = _main(capsys, ["refine", str(run_dir), "--steps", "30", "--no-progress"])
    assert code == 0 and "the refinement failed" in err, err[-3000:]
    assert np.array_equal(_texture(run_dir), coarse_texture)  # stage 1's asset, exported again
    status = _status(run_dir)
    assert "error" in status["refine"] and status["step"] == 30 and "republish" not in status["coarse"]


def _unchanged(run_dir):
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}


@pytest.mark.parametrize("argv, message", [
    (["refine.steps=0"], "refine.steps must be an integer from 1"),
    (["refine.loss=sharpen"], "refine.loss must be one of denoised, guidance"),
    (["refine.strength=2"], "refine.strength"),
    (["refine.min_step_percent=0.6", "refine.max_step_percent=0.5"], "is above refine.max_step_percent"),
    (["refine.supersample=9"], "refine.supersample"),
    (["guidance.guidance_scale=3"], "threedgen refine takes refine.* settings only"),
    (["refine.enabled=maybe"], "refine.enabled"),
])
def test_bad_refine_settings_are_one_line_errors_and_write_nothing(coarse_run, tmp_path, capsys, argv, message):
    run_dir = _copy(coarse_run, tmp_path)
    before = _unchanged(run_dir)
    code, _, err = _main(capsys, ["refine", str(run_dir), "--no-progress", *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert _unchanged(run_dir) == before


def test_refining_a_folder_that_cannot_be_refined_is_a_one_line_error(coarse_run, tmp_path, capsys):
    # not a run folder
    code, _, err = _main(capsys, ["refine", str(tmp_path), "--no-progress"])
    assert code == 2 and "is not a threedgen run folder" in err
    # no mesh.glb
    no_mesh = _copy(coarse_run, tmp_path / "a")
    (no_mesh / "mesh.glb").unlink()
    before = _unchanged(no_mesh)
    code, _, err = _main(capsys, ["refine", str(no_mesh), "--no-progress"])
    assert code == 2 and "has no mesh.glb to refine" in err and len(err.strip().splitlines()) == 1
    assert _unchanged(no_mesh) == before
    # vertex colours only: no UVs
    vertex = _copy(coarse_run, tmp_path / "b")
    assert main(["export", str(vertex), "--texture", "vertex", "--format", "glb"]) == 0
    before = _unchanged(vertex)
    code, _, err = _main(capsys, ["refine", str(vertex), "--no-progress"])
    assert code == 2 and "has no UV texture to refine" in err
    assert _unchanged(vertex) == before
    # an open mesh cannot have its vertices moved
    open_mesh = _copy(coarse_run, tmp_path / "c")
    mesh = trimesh.load(open_mesh / "mesh.glb", force="mesh", process=False)
    mesh.update_faces(np.arange(len(mesh.faces)) != 0)
    mesh.export(open_mesh / "mesh.glb")
    before = _unchanged(open_mesh)
    code, _, err = _main(capsys, ["refine", str(open_mesh), "--no-progress", "refine.geometry=true"])
    assert code == 2 and "is not a closed surface" in err
    assert _unchanged(open_mesh) == before
    # an unfinished run
    running = _copy(coarse_run, tmp_path / "d")
    status = _status(running)
    status["status"] = "running"
    (running / "status.json").write_text(json.dumps(status))
    code, _, err = _main(capsys, ["refine", str(running), "--no-progress"])
    assert code == 2 and "has not finished" in err and "threedgen run --resume" in err
    # a damaged mesh file
    damaged = _copy(coarse_run, tmp_path / "e")
    (damaged / "mesh.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    code, _, err = _main(capsys, ["refine", str(damaged), "--no-progress"])
    assert code == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1
    (damaged / "mesh.glb").unlink()  # not a file for the suite's glTF validator, which checks every GLB left


def test_run_refine_flag_rules(tmp_path, capsys):
    code, _, err = _main(capsys, ["run", "--resume", str(tmp_path), "--refine"])
    assert code == 2 and "--refine" in err
    code, _, err = _main(capsys, ["run", "--prompt", "a red cube", "--refine", "export.texture=vertex",
                                  "--out", str(tmp_path)])
    assert code == 2 and "refine.enabled needs export.texture=uv" in err
    assert not any(tmp_path.iterdir())


def test_a_web_job_refines_and_its_view_says_which_stage(tmp_path):
    """A server that refines every job (`threedgen webui --set refine.enabled=true`): the job
    reports stage 2's progress (its steps become the refinement's) and ends with the refined
    asset; the job view says when the mesh is being refined and when a refinement failed."""
    from threedgen.webui.app import WebUI
    from threedgen.webui.service import Service, Settings

    fast = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4", "export.video_resolution=32",
            "export.faces=800", "export.texture_size=256", "export.evaluate=false", "checkpoint_every=5",
            "preview_every=5", "refine.enabled=true", "refine.steps=6"]
    svc = Service(Settings(outputs=tmp_path / "out", state=tmp_path / "state", overrides=fast))
    [job] = svc.submit("a red cube", "", "sds", "nerf", "shapes", 8, "0", "")
    svc.pool.start()
    try:
        deadline = time.time() + 300
        while svc.status(job)["status"] not in ("succeeded", "failed") and time.time() < deadline:
            time.sleep(0.2)
    finally:
        svc.close()
    status = svc.status(job)
    assert status["status"] == "succeeded", status
    run_dir = svc.store.get(job).run_dir
    assert run_dir and not run_dir.endswith("refine"), run_dir  # the run folder, not the stage's
    run = json.loads((Path(run_dir) / "status.json").read_text())
    assert run["refine"]["step"] == 6 and run["coarse"]["step"] == 8
    assert status["step"] == 6 and status["max_steps"] == 6  # the last progress reported was stage 2's
    assert status["stage"] is None and status["refine_error"] is None
    assert {"glb", "preview"} <= set(status["files"])
    ui = WebUI(svc.settings)
    run["status"], run["stage"] = "running", "refine"
    (Path(run_dir) / "status.json").write_text(json.dumps(run))
    assert svc.status(job)["stage"] == "refine" and "refining the mesh (stage 2)" in ui.job_view(job)[0]
    run["status"], run["refine"] = "succeeded", {"error": "diverged: 10 non-finite steps in a row"}
    run.pop("stage")
    (Path(run_dir) / "status.json").write_text(json.dumps(run))
    line = ui.job_view(job)[0]
    assert "the mesh refinement failed (diverged" in line and "the files are the stage-1 asset" in line, line
