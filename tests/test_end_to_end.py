"""End to end on CPU with the shapes prior: outputs, export round trip, eval, resume, quality."""

import json
import os

import numpy as np
import pytest
import torch
import trimesh

from threedgen.cli import main

# A small world (two shapes) and small outputs keep these runs to seconds.
SMALL = ["prior.shapes=[cube,torus]", "export.resolution=48", "export.video_frames=4",
         "export.video_resolution=32", "checkpoint_every=10", "preview_every=10"]


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out.strip().splitlines()[-1], captured


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from threedgen.config import build_config, parse_overrides
    from threedgen.runner import run

    out = tmp_path_factory.mktemp("runs")
    cfg = build_config(overrides=parse_overrides(SMALL), flags={"prompt": "a blue torus", "steps": 30})
    return run(cfg, out=out, progress_bar=False)


def test_a_run_writes_every_output(short_run):
    names = {p.name for p in short_run.iterdir()}
    for name in ("config.yaml", "mesh.glb", "mesh.obj", "mesh.ply", "turntable.mp4", "metrics.json",
                 "status.json", "checkpoints", "previews"):
        assert name in names, name
    assert (short_run / "checkpoints" / "last.ckpt").is_file()
    assert (short_run / "previews" / "final.png").is_file() and (short_run / "previews" / "latest.png").is_file()
    from PIL import Image

    with Image.open(short_run / "previews" / "final.png") as final:  # four views in a 2 x 2 grid
        assert final.size == (64, 64)
    assert short_run.name.startswith("a-blue-torus-")
    # Every file follows the umask (0644 under the usual 022), none is mkstemp's 0600.
    from threedgen.rundir import current_umask

    want = 0o666 & ~current_umask()
    modes = {str(p.relative_to(short_run)): p.stat().st_mode & 0o777 for p in short_run.rglob("*") if p.is_file()}
    assert modes and all(m == want for m in modes.values()), {k: oct(m) for k, m in modes.items() if m != want}
    status = json.loads((short_run / "status.json").read_text())
    assert status["status"] == "succeeded" and status["step"] == 30
    metrics = json.loads((short_run / "metrics.json").read_text())
    for key in ("mask_iou", "mask_iou_unaligned", "psnr", "chamfer", "views", "normal_error_deg",
                "texture_color_error", "watertight", "open_edges", "pinched_edges", "height", "height_error"):
        assert key in metrics
    assert 0 <= metrics["normal_error_deg"] <= 180 and 0 <= metrics["texture_color_error"] <= 3 ** 0.5
    assert metrics["height"] > 0 and isinstance(metrics["watertight"], bool)
    assert len(metrics["views"]) >= 8 and 0 <= metrics["mask_iou"] <= 1
    assert metrics["mask_iou"] >= metrics["mask_iou_unaligned"]
    import imageio.v2 as imageio

    frames = imageio.mimread(short_run / "turntable.mp4")
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)


def test_export_round_trip_keeps_colours(short_run):
    from test_mesh_export import _texel_colours

    ply = trimesh.load(short_run / "mesh.ply", force="mesh")
    assert len(ply.faces) > 100
    colours = ply.visual.vertex_colors
    assert colours.shape == (len(ply.vertices), 4)
    mean = colours[:, :3].mean(0) / 255
    for name in ("mesh.glb", "mesh.obj"):  # textured by default, the same surface as the PLY
        other = trimesh.load(short_run / name, force="mesh")
        assert len(other.faces) == len(ply.faces)
        assert other.visual.kind == "texture", name
        assert np.abs(_texel_colours(other).mean(0) - mean).max() < 0.03, name
    # glTF is +Y up: the torus lies flat, so its extent along Y is its thinnest.
    glb = trimesh.load(short_run / "mesh.glb", force="mesh")
    ext = glb.bounds[1] - glb.bounds[0]
    assert ext[1] < ext[0] and ext[1] < ext[2]


def test_cli_export_and_eval(short_run, capsys):
    (short_run / "mesh.obj").unlink()
    assert main(["export", str(short_run), "--format", "obj", "--resolution", "32"]) == 0
    assert (short_run / "mesh.obj").is_file()
    assert "mesh.obj" in capsys.readouterr().out
    assert main(["eval", str(short_run)]) == 0
    out = capsys.readouterr().out
    assert "mask_iou" in out and "chamfer" in out and out.count("\n") >= 9
    metrics = json.loads((short_run / "metrics.json").read_text())
    assert metrics["prompt"] == "a blue torus"


def test_resume_continues_from_the_saved_step(tmp_path, capsys):
    import pytorch_lightning as pl

    run_dir, _ = _run(capsys, ["run", "--prompt", "a red cube", "--steps", "20", "--out", str(tmp_path),
                               "--no-progress", *SMALL])
    ckpt = torch.load(f"{run_dir}/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    (tmp_path / "marker").write_text("x")

    starts = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, module):
            starts.append(trainer.global_step)

    from threedgen.runner import run

    again = run(resume=run_dir, steps=40, progress_bar=False, callbacks=[Spy()])
    assert str(again) == run_dir and starts == [20]
    ckpt = torch.load(f"{run_dir}/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 40
    assert json.loads((again / "status.json").read_text())["step"] == 40
    assert "steps: 40" in (again / "config.yaml").read_text()


def test_eval_of_a_run_without_a_truth_is_a_clear_error(short_run, monkeypatch, capsys):
    from threedgen.guidance.priors.shapes.prior import ShapesPrior

    monkeypatch.setattr(ShapesPrior, "truth", classmethod(lambda cls, prompt: None))
    assert main(["eval", str(short_run)]) == 2
    assert "has no ground truth" in capsys.readouterr().err


# The spine's promise, shortened: 250 steps of SDS on the full vocabulary. Checkpoints every 25
# steps and status every 10 so the kill test below can kill it anywhere and resume it.
RED_CUBE = ["run", "--prompt", "a red cube", "--steps", "250", "--seed", "0", "--no-progress",
            "export.video_frames=4", "export.resolution=64", "checkpoint_every=25", "preview_every=10"]


@pytest.fixture(scope="module")
def red_cube(tmp_path_factory):
    out = tmp_path_factory.mktemp("red-cube")
    code = main([*RED_CUBE, "--out", str(out)])
    assert code == 0
    (run_dir,) = out.iterdir()
    return run_dir


# The quality bar, with room for what differs between machines (CPUs differ in the last bits and
# training amplifies them). Measured on one Xeon, seeds 0-2: IoU 0.930-0.936, Chamfer 0.018-0.031
# (it includes the underside, which no camera sees). The field as initialised (one step: a centred
# blob) scores IoU 0.645, so the IoU bound fails a method that does not train; its Chamfer, 0.043,
# passes the Chamfer bound, which is there for gross failures (a misplaced or misscaled mesh).
MIN_IOU, MAX_CHAMFER = 0.75, 0.06


def test_red_cube_reaches_the_quality_bar(red_cube):
    metrics = json.loads((red_cube / "metrics.json").read_text())
    assert metrics["mask_iou"] >= MIN_IOU, metrics["mask_iou"]
    assert metrics["chamfer"] < MAX_CHAMFER, metrics["chamfer"]


def test_sigkill_at_a_random_step_then_resume_scores_like_an_uninterrupted_run(red_cube, tmp_path, capsys):
    """The same run killed with SIGKILL at a random step (any moment: mid-step, mid-save), then
    ``--resume``d, finishes and scores within tolerance of the uninterrupted run above."""
    import random
    import signal
    import subprocess
    import sys
    import time

    kill_at = random.Random(os.urandom(8)).randrange(20, 231)
    print(f"killing at step >= {kill_at}")
    proc = subprocess.Popen([sys.executable, "-m", "threedgen", *RED_CUBE, "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, step = time.time() + 300, -1
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("*/status.json"))
        if found:
            try:
                step = json.loads(found[0].read_text()).get("step") or 0
            except ValueError:
                step = -1
            if step >= kill_at:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {kill_at}: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    (run_dir,) = tmp_path.iterdir()
    state = json.loads((run_dir / "status.json").read_text())
    killed_step = state["step"]
    assert state["status"] == "running" and kill_at <= killed_step < 250  # killed: nothing recorded the end
    assert not (run_dir / "mesh.glb").exists()

    code = main(["run", "--resume", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    state = json.loads((run_dir / "status.json").read_text())
    assert state["status"] == "succeeded" and state["step"] == 250
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 250
    resumed = json.loads((run_dir / "metrics.json").read_text())
    straight = json.loads((red_cube / "metrics.json").read_text())
    print(f"killed at step {killed_step} (asked {kill_at}); IoU uninterrupted {straight['mask_iou']:.4f}, "
          f"resumed {resumed['mask_iou']:.4f}; chamfer {straight['chamfer']:.4f} / {resumed['chamfer']:.4f}")
    # Resume replays the run (test_resume_from_a_checkpoint_replays_the_run_exactly): the scores
    # agree to within float noise, not merely to within seed-to-seed spread.
    assert resumed["mask_iou"] >= MIN_IOU and resumed["chamfer"] < MAX_CHAMFER
    assert abs(resumed["mask_iou"] - straight["mask_iou"]) <= 0.005
    assert abs(resumed["psnr"] - straight["psnr"]) <= 0.2
    assert abs(resumed["chamfer"] - straight["chamfer"]) <= 0.002


def test_ctrl_c_stops_cleanly_with_a_resume_hint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "threedgen", "run", "--prompt", "a red cube", "--out", str(tmp_path),
                             "--no-progress", "--steps", "5000", *SMALL], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # A suite started in the background (`pytest &`) ignores SIGINT, and a
                            # child Python would inherit that: give the run the default handler.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    status = None
    while time.time() < deadline:  # wait until training has saved a checkpoint
        found = list(tmp_path.glob("*/checkpoints/last.ckpt"))
        if found:
            status = found[0].parent.parent / "status.json"
            break
        time.sleep(0.5)
    assert status is not None, "no checkpoint within 120 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("threedgen: interrupted; continue with: threedgen run --resume ")
    state = json.loads(status.read_text())
    assert state["status"] == "interrupted" and 0 < state["step"] < 5000


@pytest.mark.parametrize("representation, extra", [
    ("nerf", []),
    ("gaussians", ["representation.densify_every=3", "representation.densify_start=0.0",
                   "representation.densify_stop=0.9", "representation.num_points=300"]),
    ("nerf-sdf", ["representation.beta_anneal=1"]),
    ("surfels", ["representation.densify_every=3", "representation.densify_start=0.0",
                 "representation.densify_stop=0.9", "representation.num_points=300", "representation.regularize_from=0",
                 "representation.mesh_view_size=32", "representation.mesh_views_per_ring=4"]),
])
def test_resume_from_a_checkpoint_replays_the_run_exactly(representation, extra, tmp_path):
    """A run resumed from its step-10 checkpoint ends with the very parameters of the run that was
    never stopped: cameras, timestep and noise draws, Adam moments, the NeRF's occupancy grid and
    the Gaussians' densification statistics all continue where they were."""
    from threedgen.config import build_config, parse_overrides
    from threedgen.runner import run

    items = ["prior.shapes=[cube,torus]", "render.resolution=16", "render.coarse_resolution=0",
             "export.resolution=32", "export.video_frames=4", "export.video_resolution=32", "export.texture=vertex",
             "export.evaluate=false", "checkpoint_every=10", "preview_every=5", *extra]
    cfg = build_config("sds", representation, overrides=parse_overrides(items),
                       flags={"prompt": "a red cube", "steps": 20})
    straight = run(cfg, out=tmp_path / "a", progress_bar=False)
    final = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 20
    # The same run as if killed after step 10: its last checkpoint is the step-10 one.
    killed = tmp_path / "b" / straight.name
    import shutil

    shutil.copytree(straight, killed)
    (killed / "checkpoints" / "prev.ckpt").replace(killed / "checkpoints" / "last.ckpt")
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    run(resume=killed, progress_bar=False)
    resumed = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 20
    assert final["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in final["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
