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


def test_run_folders_are_named_slug_and_time_then_numbered(tmp_path, monkeypatch):
    """The first run of a prompt in a second is ``<slug>-<time>``; others in the same second get
    ``-1``, ``-2``; a nested ``--out`` that does not exist yet is made."""
    from threedgen import rundir

    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260102-030405")
    out = tmp_path / "a" / "b" / "outputs"
    names = [new_run_dir(out, "a red cube").name for _ in range(3)]
    assert names == ["a-red-cube-20260102-030405", "a-red-cube-20260102-030405-1", "a-red-cube-20260102-030405-2"]
    assert new_run_dir(out, "a blue torus").name == "a-blue-torus-20260102-030405"


@pytest.mark.parametrize("proc", ["missing", "garbled", "no-value"])
def test_outputs_follow_the_umask_where_proc_does_not_tell_it(tmp_path, monkeypatch, proc):
    """Where ``/proc/self/status`` is missing (macOS) or says something unexpected, the umask is
    read the portable way and outputs still get ``0666 & ~umask``."""
    import os
    import stat
    from pathlib import Path

    from threedgen.rundir import atomic_write_text, current_umask

    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == "/proc/self/status":
            if proc == "missing":
                raise FileNotFoundError(2, "No such file or directory", str(self))
            return "Name:\tpython\nUmask:\tzz\n" if proc == "garbled" else "Name:\tpython\nUmask:\n"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        atomic_write_text(tmp_path / "status.json", "{}")
        assert os.umask(0o027) == 0o027  # reading it left it as it was
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "status.json").stat().st_mode) == 0o640
