"""Run folders and output writers."""

import numpy as np
import pytest

from threedgen.rundir import atomic_path, new_run_dir, slugify


@pytest.mark.parametrize("prompt,slug", [
    ("a red cube", "a-red-cube"),
    ("../../etc/passwd", "etc-passwd"),
    ("C:\\x", "c-x"),
    ("~", "prompt"),
    ("a/b", "a-b"),
    ("${oc.env:HOME}", "oc-env-home"),
    ("un cube rouge café ☕ مكعب", "un-cube-rouge-cafe"),
    ("x" * 200, "x" * 40),
])
def test_slugs_are_safe(prompt, slug):
    assert slugify(prompt) == slug


def test_run_dirs_stay_inside_out_and_never_collide(tmp_path):
    a = new_run_dir(tmp_path, "../../etc/passwd")
    b = new_run_dir(tmp_path, "../../etc/passwd")
    assert a != b and a.parent == tmp_path.resolve() and b.parent == tmp_path.resolve()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_turntable_falls_back_to_gif(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    from threedgen.export import write_turntable

    frames = (np.random.default_rng(0).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    assert write_turntable(frames, tmp_path).name == "turntable.mp4"

    def no_encoder(*args, **kwargs):
        raise RuntimeError("no ffmpeg")

    monkeypatch.setattr(imageio, "get_writer", no_encoder)
    path = write_turntable(frames, tmp_path)
    assert path.name == "turntable.gif" and len(imageio.mimread(path)) == 3
    from PIL import Image

    assert Image.open(path).info["duration"] == pytest.approx(1000 / 12, abs=5)  # GIF stores centiseconds


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    """Written through a temporary file (mkstemp makes 0600), an output still ends with the mode
    any file the user creates gets, so teammates and web servers can read it."""
    import os
    import stat

    from threedgen.rundir import atomic_write_text, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_path(tmp_path / "mesh.obj") as tmp:
            tmp.write_text("v 0 0 0\n")
        (tmp_path / "plain.txt").write_text("made by open()")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"metrics.json": mode, "mesh.obj": mode, "plain.txt": mode}
