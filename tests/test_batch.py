"""`threedgen batch`: the batch file's grammar and its bad inputs (each a one-line error naming the
line, nothing queued), on the local backend end to end, and the Ray backend's errors that need no
cluster (Ray missing, an unreachable address). The Ray backend's runs are in test_cluster.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from threedgen.cli import main
from threedgen.errors import UserError
from threedgen.jobs.batch import read_batch, split_line
from threedgen.jobs.store import JobStore

DEFAULTS = {"guidance": "sds", "representation": "nerf", "prior": "shapes", "steps": None, "seed": 0}
FAST = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4", "export.video_resolution=32",
        "export.formats=[glb]", "checkpoint_every=5", "preview_every=5"]


def test_split_line():
    assert split_line("a red cube") == ("a red cube", [])
    assert split_line("a red cube --seed 3 guidance.guidance_scale=50") == (
        "a red cube", ["--seed", "3", "guidance.guidance_scale=50"])
    assert split_line('"a cube --not an option" --seed 1') == ("a cube --not an option", ["--seed", "1"])
    assert split_line("a red-cube --guidance vsd") == ("a red-cube", ["--guidance", "vsd"])


def test_read_batch_lines_and_defaults(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\na red cube\n  a blue torus --guidance vsd --seed 3 --steps 7 guidance.guidance_scale=50\n")
    jobs = read_batch(f, DEFAULTS, ["export.resolution=32"], 100)
    assert [n for n, _ in jobs] == [3, 4]
    (_, a), (_, b) = jobs
    assert (a.prompt, a.guidance, a.seed, a.overrides) == ("a red cube", "sds", 0, ("export.resolution=32",))
    assert a.steps > 0  # the preset's default, resolved
    assert (b.prompt, b.guidance, b.seed, b.steps) == ("a blue torus", "vsd", 3, 7)
    assert b.overrides == ("export.resolution=32", "guidance.guidance_scale=50")


@pytest.mark.parametrize("content, message", [
    (b"", "holds no prompts"),
    (b"# only a comment\n\n", "holds no prompts"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    (b"a red cube\n\xff\xfe bad bytes\n", "not UTF-8 text"),
    (b"a red cube\na blue torus --guidance nope\n", "line 2: "),
    (b"a red cube\n\n# c\na blue torus --seed -1\n", "line 4: "),
    (b"a red cube --steps many\n", "line 1: "),
    (b"a red cube --bogus 1\n", "line 1: "),
    (b"a red cube --seed 1 guidance\n", "line 1: 'guidance' is neither a flag nor a key=value setting"),
    (b"a red cube --seed 1 ${oc.env:HOME}=1\n", "line 1: "),
    (b"a purple dodecahedron\n", "line 1: "),
    (b"--seed 3\n", "line 1: the line has no prompt"),
    (b"a red cube " + b"x" * 1000 + b"\n", "line 1: the prompt has 1011 characters; at most 1000"),
])
def test_a_bad_batch_file_queues_nothing(tmp_path, capsys, content, message):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    code = main(["batch", str(f), "--state", str(tmp_path / "state"), "--outputs", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("threedgen: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "state" / "jobs.sqlite").exists() or JobStore(tmp_path / "state" / "jobs.sqlite").list() == []


def test_ten_thousand_lines_check_quickly_and_too_many_queue_nothing(tmp_path, capsys):
    f = tmp_path / "p.txt"
    colours = ["red", "green", "blue", "yellow"]
    f.write_text("".join(f"a {colours[i % 4]} {'cube' if i % 3 else 'torus'} --seed {i}\n" for i in range(10000)))
    started = time.perf_counter()
    jobs = read_batch(f, DEFAULTS, [], 10000)
    print(f"10,000 lines checked in {time.perf_counter() - started:.1f} s")
    assert len(jobs) == 10000 and jobs[-1][1].seed == 9999 and jobs[5][1].prompt == "a green cube"
    bad = tmp_path / "q.txt"  # a bad last line after 10,000 good ones with the same settings: still caught
    bad.write_text(f.read_text() + "a red cube --seed 4294967296\n")
    with pytest.raises(UserError, match="line 10001: seed must be an integer from 0 to 4294967295"):
        read_batch(bad, DEFAULTS, [], 10001)
    code = main(["batch", str(f), "--max-queue", "9999", "--state", str(tmp_path / "state")])
    assert code == 2 and "holds 10000 prompts; a batch queues at most 9999" in capsys.readouterr().err
    assert not (tmp_path / "state" / "jobs.sqlite").exists() or JobStore(tmp_path / "state" / "jobs.sqlite").list() == []


def test_local_batch_runs_every_job_and_writes_batch_json(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("# two prompts\na red cube\n\"a blue torus\" --seed 2 export.video_frames=2\n")
    report = tmp_path / "batch.json"
    args = ["batch", str(f), "--steps", "12", "--state", str(tmp_path / "state"), "--outputs", str(tmp_path / "out"),
            "--report", str(report)] + [x for item in FAST for x in ("--set", item)]
    assert main(args) == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["counts"] == {"succeeded": 2} and r["backend"] == "local"
    assert [(j["line"], j["prompt"], j["seed"]) for j in r["jobs"]] == [(2, "a red cube", 0), (3, "a blue torus", 2)]
    for j in r["jobs"]:
        assert (tmp_path / "out" / j["id"] / "mesh.glb").read_bytes()[:4] == b"glTF"
        assert 0.3 < j["metrics"]["mask_iou"] <= 1 and j["step"] == j["max_steps"] == 12
    assert main(["batch", "--status", "--state", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert "2 succeeded" in out and "a blue torus" in out and "line    3" in out


def test_ray_backend_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = main(["batch", str(f), "--backend", "ray", "--state", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == 'threedgen: error: the ray backend needs Ray: pip install "threedgen[cluster]"'
    assert JobStore(tmp_path / "state" / "jobs.sqlite").list() == []


def test_an_unreachable_ray_address_fails_fast_and_queues_nothing(tmp_path):
    pytest.importorskip("ray", reason='needs Ray: pip install "threedgen[cluster]"')
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "threedgen", "batch", str(f), "--backend", "ray", "--ray-address",
                           f"127.0.0.1:{port}", "--state", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=60)
    assert time.time() - started < 15
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"threedgen: error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert JobStore(tmp_path / "state" / "jobs.sqlite").list() == []


def test_no_running_cluster_for_ray_address_auto_is_one_line(tmp_path):
    pytest.importorskip("ray", reason='needs Ray: pip install "threedgen[cluster]"')
    import os

    f = tmp_path / "p.txt"
    f.write_text("a red cube\n")
    (tmp_path / "raytmp" / "ray").mkdir(parents=True)  # no cluster recorded there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp_path / "raytmp"), RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "threedgen", "batch", str(f), "--backend", "ray",
                           "--state", str(tmp_path / "state")], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("threedgen: error: no running Ray cluster found on this machine (--ray-address "
                                   "auto); start one with `ray start --head`, or give --ray-address HOST:PORT")
    assert JobStore(tmp_path / "state" / "jobs.sqlite").list() == []
