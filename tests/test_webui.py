"""The web UI: the durable job table, the API through gradio_client (submit -> progress -> GLB),
validation of requests sent straight to the API, downloads by id only, cancel, a server killed
mid-job and restarted (interrupted -> resume -> succeeded), and one real browser."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from threedgen.errors import UserError
from threedgen.jobs.store import JobStore, wait_for
from threedgen.webui.app import Settings, WebUI, _escape_md, parse_seeds

# Small, fast jobs: every job the tests run gets these server-side settings (`--set`).
FAST = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4", "export.video_resolution=32",
        "export.formats=[glb,obj,ply]", "export.evaluate=false", "checkpoint_every=5", "preview_every=5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the job table --------------------------------------------------------------------------

def test_job_store_lifecycle(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite", max_queued=2)
    a = store.submit({"prompt": "a red cube", "steps": 10}, 10)
    b = store.submit({"prompt": "a blue torus", "steps": 10}, 10)
    with pytest.raises(UserError, match="queue is full"):
        store.submit({"prompt": "x"}, 10)
    job = store.claim(worker=0)
    assert job.id == a and job.status == "running" and job.worker == 0  # oldest first
    assert store.progress(a, 4, 10, step_time=0.5, run_dir="/tmp/run") is False
    job = store.get(a)
    assert (job.step, job.max_steps, job.progress, job.eta_seconds, job.run_dir) == (4, 10, 0.4, 3.0, "/tmp/run")
    assert store.cancel(a) == "cancelling" and store.progress(a, 5, 10) is True
    assert store.cancel(b) == "cancelled"  # queued: at once
    store.finish(a, "cancelled")
    with pytest.raises(UserError, match="already cancelled"):
        store.cancel(a)
    c = store.submit({"prompt": "a green sphere"}, 10)
    store.claim(worker=1)
    assert store.recover() == [c]  # a new server: what was running is interrupted
    job = store.get(c)
    assert job.status == "interrupted" and "resume" in job.error
    store.resume(c)
    assert store.get(c).status == "queued"
    for bad in ("../../etc/passwd", "ABCDEF123456", "", None, "1" * 13, "0" * 12 + "\n"):  # "$" let the newline by
        with pytest.raises(UserError, match="unknown job id"):
            store.get(bad)
    with pytest.raises(UserError, match="no job"):
        store.get("0" * 12)
    # Durable: a second store on the same file sees everything.
    assert {j.id for j in JobStore(tmp_path / "jobs.sqlite").list()} == {a, b, c}


def test_seeds_and_escaping():
    assert parse_seeds("0") == [0] and parse_seeds("3, 1, 3") == [3, 1] and parse_seeds("2-4") == [2, 3, 4]
    for bad, msg in (("0-20", "at most 8"), ("a", "integers"), ("1,2,3,4,5,6,7,8,9", "at most 8"),
                     ("5-2", "must go up"), ("99999999999", "integers"),
                     ("\u0663", "integers"), ("1-\u0663", "integers"), ("\u00b2", "integers")):  # only 0-9
        with pytest.raises(UserError, match=msg):
            parse_seeds(bad)
    shown = _escape_md('<img src=x onerror="alert(1)"> **bold** [link](javascript:x)')
    assert "<" not in shown and "**" not in shown and "](" not in shown


def test_state_and_outputs_must_be_separate(tmp_path):
    with pytest.raises(UserError, match="separate folders"):
        WebUI(Settings(outputs=tmp_path / "out", state=tmp_path / "out" / "state"))


# ---- the API, in-process server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gradio_client import Client

    root = tmp_path_factory.mktemp("webui")
    ui = WebUI(Settings(outputs=root / "outputs", state=root / "state", overrides=FAST, max_queued=5))
    port = free_port()
    demo = ui.launch(port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield ui, client, port
    ui.close(demo)


FORM = ("a red cube", "", "sds", "nerf", "shapes", 30, "0", "")


def test_submit_progress_and_glb_download(server):
    ui, client, port = server
    started = time.time()
    (job_id,) = client.predict(*FORM, api_name="/submit")["jobs"]
    seen = []

    def done():
        st = client.predict(job_id, api_name="/status")
        seen.append((st["status"], st["step"]))
        return st if st["status"] in ("succeeded", "failed") else None

    st = wait_for(done, 300)
    assert st["status"] == "succeeded", st
    assert any(s == "running" and 0 < step < 30 for s, step in seen) or st["step"] == 30
    assert {"glb", "obj", "mtl", "texture", "ply", "video", "preview"} <= set(st["files"])
    line, preview, glb, splats, video, downloads, curve = ui.job_view(job_id)
    assert Path(preview).name == "preview-000030-final.png" and glb.endswith("mesh.glb") and splats is None
    assert {r["series"] for r in curve} == {"loss", "grad_norm"} and max(r["step"] for r in curve) >= 19
    # The polling API: the same answers as plain JSON, outside Gradio's queue.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/{job_id}", timeout=30) as r:
        assert json.loads(r.read()) == client.predict(job_id, api_name="/status")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/jobs", timeout=30) as r:
        listed = json.loads(r.read())["jobs"]
    assert any(j["id"] == job_id and j["status"] == "succeeded" and j["step"] == 30 for j in listed)
    for bad, code in (("not-an-id", 400), ("0123456789ab", 404)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status/{bad}", timeout=30)
        assert err.value.code == code and "\n" not in json.loads(err.value.read())["error"]
    path = client.predict(job_id, "glb", api_name="/download")
    data = Path(path).read_bytes()
    assert data[:4] == b"glTF" and len(data) > 1000
    from threedgen.rundir import current_umask

    published = ui.settings.outputs / job_id / "mesh.glb"  # readable by the web server as the umask says
    assert published.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    import trimesh

    mesh = trimesh.load(path, force="mesh")
    assert len(mesh.faces) > 50
    # The run's private folder (config, checkpoints) is in the state folder, not in outputs.
    job = ui.store.get(job_id)
    assert Path(job.run_dir).is_relative_to(ui.settings.state)
    assert (Path(job.run_dir) / "checkpoints" / "last.ckpt").is_file()
    assert not list(ui.settings.outputs.rglob("*.ckpt")) and not list(ui.settings.outputs.rglob("*.sqlite"))
    print(f"submit to GLB: {time.time() - started:.1f} s")


@pytest.mark.parametrize("form, message", [
    (("a red cube", "", "sds", "nerf", "shapes", 0, "0", ""), "steps must be an integer from 1 to"),
    (("a red cube", "", "sds", "nerf", "shapes", 10 ** 9, "0", ""), "steps must be an integer from 1 to"),
    (("a red cube", "", "nope", "nerf", "shapes", 10, "0", ""), "unknown guidance 'nope'"),
    (("a red cube", "", "sds", "mesh", "shapes", 10, "0", ""), "unknown representation 'mesh'"),
    (("a red cube", "", "sds", "nerf", "stable-diffusion", 10, "0", ""), "not offered by this server"),
    (("a red cube", "", "sds", "nerf", "/etc/passwd", 10, "0", ""), "not offered by this server"),
    (("", "", "sds", "nerf", "shapes", 10, "0", ""), "prompt is empty"),
    (("a red cube " * 200, "", "sds", "nerf", "shapes", 10, "0", ""), "the limit is 1000"),
    (("a purple dragon", "", "sds", "nerf", "shapes", 10, "0", ""), "outside the shapes prior's vocabulary"),
    (("a red cube", "", "sds", "nerf", "shapes", 10, "0-99", ""), "at most 8 seeds"),
    (("a red cube", "", "sds", "nerf", "shapes", 10, "0", "999"), "resolution must be one of"),
    (("${oc.env:HOME}", "", "sds", "nerf", "shapes", 10, "0", ""), "vocabulary"),
])
def test_bad_requests_sent_straight_to_the_api_are_refused(server, form, message):
    from gradio_client.exceptions import AppError

    _, client, _ = server
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
        client.predict(*form, api_name="/submit")


def test_downloads_only_by_job_id_and_kind(server):
    from gradio_client.exceptions import AppError

    ui, client, port = server
    (job_id,) = client.predict("a blue torus", "", "sds", "nerf", "shapes", 1000, "0", "", api_name="/submit")["jobs"]
    client.predict(job_id, api_name="/cancel")
    for job, kind, message in (("../../state/jobs", "glb", "unknown job id"), (job_id, "../state/jobs.sqlite", "unknown file kind"),
                               (job_id, "/etc/passwd", "unknown file kind"), ("0" * 12, "glb", "no job")):
        with pytest.raises(AppError, match=message):
            client.predict(job, kind, api_name="/download")
    # Gradio itself serves nothing outside the outputs folder: not the database, not a checkpoint.
    targets = [ui.settings.state / "jobs.sqlite", ui.settings.outputs / ".." / "state" / "jobs.sqlite", Path("/etc/passwd")]
    targets += list((ui.settings.state / "runs").rglob("*.ckpt"))[:1]
    for target in targets:
        url = f"http://127.0.0.1:{port}/gradio_api/file={target}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code in (403, 404), (target, err.value.code)
    # Nor does it take files: the page has no file input, so the upload route answers 404.
    boundary = "threedgenboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n").encode()
    for path in ("/gradio_api/upload", "/gradio_api/upload/", "/upload"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 404, (path, err.value.code)


def test_cancel_a_running_job_keeps_its_checkpoints(server):
    ui, client, _ = server
    (job_id,) = client.predict("a blue torus", "", "sds", "nerf", "shapes", 2000, "0", "", api_name="/submit")["jobs"]
    wait_for(lambda: client.predict(job_id, api_name="/status")["step"] >= 12, 240)
    asked = time.time()
    assert client.predict(job_id, api_name="/cancel") == {"status": "cancelling"}
    st = wait_for(lambda: (s := client.predict(job_id, api_name="/status"))["status"] == "cancelled" and s, 60)
    assert time.time() - asked < 30 and st["step"] < 2000
    run_dir = Path(ui.store.get(job_id).run_dir)
    assert list((run_dir / "checkpoints").glob("*.ckpt"))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"


def test_a_closed_tab_leaves_the_job_running(server):
    """The page's connection is not the job: a client that submits and goes away (a closed tab)
    leaves the job running; a new client (the page reopened) finds it and its result."""
    from gradio_client import Client

    ui, client, port = server
    tab = Client(f"http://127.0.0.1:{port}/", verbose=False)
    (job_id,) = tab.predict("a red torus", "", "sds", "nerf", "shapes", 30, "0", "", api_name="/submit")["jobs"]
    wait_for(lambda: tab.predict(job_id, api_name="/status")["status"] == "running", 240)
    getattr(tab, "close", lambda: None)()
    reopened = Client(f"http://127.0.0.1:{port}/", verbose=False)
    listed = reopened.predict(api_name="/jobs")
    assert job_id in json.dumps(listed)
    st = wait_for(lambda: (s := reopened.predict(job_id, api_name="/status"))["status"] in ("succeeded", "failed") and s,
                  300)
    assert st["status"] == "succeeded" and st["step"] == 30 and "glb" in st["files"], st


# ---- a server killed mid-job ------------------------------------------------------------------

def _start_server(root: Path, port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "threedgen", "webui", "--port", str(port), "--outputs", str(root / "outputs"),
            "--state", str(root / "state")] + [x for item in FAST for x in ("--set", item)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"),
                            start_new_session=True)


def _client(port: int, proc: subprocess.Popen):
    from gradio_client import Client

    def up():
        assert proc.poll() is None, "the server exited"
        try:
            return Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:
            return None

    return wait_for(up, 120, every=1.0)


def test_server_killed_mid_job_then_resumed(tmp_path):
    port = free_port()
    proc = _start_server(tmp_path, port)
    try:
        client = _client(port, proc)
        (job_id,) = client.predict("a red cube", "", "sds", "nerf", "shapes", 60, "0", "", api_name="/submit")["jobs"]
        wait_for(lambda: client.predict(job_id, api_name="/status")["step"] >= 12, 240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server dies at once; its job process notices and stops
        proc.wait()
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    job = store.get(job_id)
    wait_for(lambda: not job.pid or not Path(f"/proc/{job.pid}").exists(), 60)
    proc = _start_server(tmp_path, port)
    try:
        client = _client(port, proc)
        st = client.predict(job_id, api_name="/status")
        assert st["status"] == "interrupted" and 0 < st["step"] < 60, st
        assert client.predict(job_id, api_name="/resume") == {"status": "queued"}
        st = wait_for(lambda: (s := client.predict(job_id, api_name="/status"))["status"] in ("succeeded", "failed") and s, 300)
        assert st["status"] == "succeeded" and st["step"] == 60, st
        assert "glb" in st["files"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


# ---- one real browser --------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_submits_a_prompt_and_sees_the_3d_viewer(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    _, _, port = server
    with playwright.sync_playwright() as p:
        # WebGL in headless Chromium without a GPU: the SwiftShader software renderer.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--use-angle=swiftshader",
                                                                    "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("Steps").fill("20")
        page.get_by_role("button", name="Generate").click()
        shot = Path(os.environ.get("THREEDGEN_SCREENSHOT_DIR", tmp_path)) / "webui-finished-job.png"
        try:
            # The selected job's status line (Markdown **succeeded**), then the Model3D canvas.
            page.locator("strong", has_text="succeeded").first.wait_for(state="visible", timeout=300_000)
            canvas = page.locator("canvas").first
            canvas.wait_for(state="visible", timeout=60_000)
            page.wait_for_timeout(5000)  # let the viewer load and draw the mesh
            viewer = canvas.screenshot()
            # The loss plot, watched from the submit to the end (it starts with no rows): drawn with lines.
            plot = page.locator(".block", has_text="Loss and gradient norm").last.screenshot()
        finally:
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    assert shot.stat().st_size > 10_000
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(viewer)).convert("RGB")).astype(float)
    reddish = (pixels[..., 0] > pixels[..., 1] + 40) & (pixels[..., 0] > pixels[..., 2] + 40)
    assert reddish.mean() > 0.01, "the 3D viewer shows no red cube"
    lines = np.asarray(Image.open(io.BytesIO(plot)).convert("RGB")).astype(float)
    for name, colour in (("loss", (31, 119, 180)), ("grad_norm", (255, 127, 14))):  # the plot's color_map
        near = np.abs(lines - np.array(colour)).max(-1) < 40
        assert near.sum() > 30, f"the loss plot draws no {name} line ({int(near.sum())} pixels of its colour)"


def test_a_job_whose_server_died_stops_and_is_marked_interrupted(tmp_path):
    """The job process checks its parent at every progress write: started for a parent that is not
    its own (as after the server was killed), it stops like Ctrl-C and records `interrupted`."""
    import multiprocessing

    from threedgen.jobs.worker import run_job

    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    params = {"prompt": "a red cube", "negative_prompt": "", "guidance": "sds", "representation": "nerf",
              "prior": "shapes", "steps": 500, "seed": 0, "resolution": None, "server_overrides": FAST}
    job_id = store.submit(params, 500)
    store.claim(0)
    proc = multiprocessing.get_context("spawn").Process(
        target=run_job, args=(str(store.path), job_id, str(tmp_path / "state" / "runs"), str(tmp_path / "outputs"),
                              "cpu", os.getpid() + 10 ** 6))  # a parent pid that is not this process's
    proc.start()
    proc.join(180)
    assert proc.exitcode == 0
    job = store.get(job_id)
    assert job.status == "interrupted" and job.step < 500 and "resume" in job.error
    status = json.loads((Path(job.run_dir) / "status.json").read_text())
    assert status["status"] == "interrupted"


def test_the_job_view_shows_the_score_and_the_janus_metrics(tmp_path):
    from threedgen.webui.app import EXAMPLE_PROMPTS, SHAPES_PROMPT_INFO, score_line

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"mask_iou": 0.9312, "psnr": 21.64}))
    assert score_line(path) == "\n\nmask IoU 0.931 · PSNR 21.6 dB"
    path.write_text(json.dumps({"mask_iou": 0.92, "psnr": 21.0, "front_markers": 3, "janus": True,
                                "janus_view_rate": 0.556, "view_mi": 0.41}))
    line = score_line(path)
    assert "front markers 3 (Janus)" in line and "Janus view rate 0.56" in line and "view MI 0.41" in line
    path.write_text("{not json")
    assert score_line(path) == ""
    assert score_line(tmp_path / "missing.json") == ""
    for word in ("house (door)", "mug (badge)", "head (nose)", "magenta"):
        assert word in SHAPES_PROMPT_INFO
    from threedgen.guidance.priors.shapes.vocab import parse_prompt

    for (prompt,) in EXAMPLE_PROMPTS:
        parse_prompt(prompt)  # every example is inside the vocabulary


def test_previews_are_named_by_step_and_older_ones_removed(tmp_path):
    """Each published preview is a new file name (a browser never shows a cached, stale one under
    the current name); the one before it is removed; the finished run's is the last."""
    from PIL import Image

    from threedgen.jobs.worker import latest_preview, publish, publish_preview

    src = tmp_path / "latest.png"
    Image.new("RGB", (8, 8), "red").save(src)
    public = tmp_path / "public"
    first = publish_preview(src, public, 100)
    (public / "preview.png").write_bytes(src.read_bytes())  # a folder from an older version
    second = publish_preview(src, public, 200)
    assert second.name == "preview-000200.png" and not first.exists() and not (public / "preview.png").exists()
    assert latest_preview(public) == second
    run = tmp_path / "run"
    (run / "previews").mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(run / "previews" / "final.png")
    (run / "status.json").write_text(json.dumps({"status": "succeeded", "step": 250}))
    assert publish(run, public, ("preview",)) == ["preview"]
    assert [p.name for p in public.glob("preview-*.png")] == ["preview-000250-final.png"]
    assert latest_preview(public).name == "preview-000250-final.png"
    assert latest_preview(tmp_path / "nothing") is None
    from threedgen.webui.app import WebUI

    (public / "splats.ply").write_bytes(b"ply")  # a Gaussians job's splats go to their own viewer
    assert WebUI._public_file(public, "splats") == public / "splats.ply"
    assert WebUI._public_file(public, "preview") == public / "preview-000250-final.png"
    assert WebUI._public_file(public, "glb") is None


def test_the_training_curve_comes_from_the_run_s_log(tmp_path):
    from threedgen.webui.service import read_curve

    log = tmp_path / "metrics.csv"
    log.write_text("epoch,grad_norm,loss,step,t,vsd_lora_loss\n0,1.5,0.25,9,500,\n0,,,9,,0.1\n0,1.25,0.125,19,400,\n")
    assert read_curve(log) == [
        {"step": 9, "value": 0.25, "series": "loss"}, {"step": 9, "value": 1.5, "series": "grad_norm"},
        {"step": 19, "value": 0.125, "series": "loss"}, {"step": 19, "value": 1.25, "series": "grad_norm"}]
    assert read_curve(tmp_path / "missing.csv") == []
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert read_curve(tmp_path / "bad.csv") == []


def test_numbers_from_outside_are_ascii_digits_only(monkeypatch):
    """A port, a launcher's rank and a job id are read only when they are plain ASCII: a
    superscript passed str.isdigit and then crashed int(); a trailing newline passed the job-id
    pattern's "$"."""
    from threedgen.amortised_folder import launched_rank
    from threedgen.jobs.cluster import _reachable
    from threedgen.jobs.store import check_job_id
    from threedgen.schema import is_ascii_integer

    assert is_ascii_integer("0123") and not any(map(is_ascii_integer, ["", " 1", "1\n", "\u00b2", "\u0663", "-1", "1e3", 5]))
    assert _reachable("localhost:\u00b2", 0.1) == "'localhost:\u00b2' is not host:port"
    assert _reachable("localhost:\u0666\u0666", 0.1) == "'localhost:\u0666\u0666' is not host:port"
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "\u00b2")
    assert launched_rank() == 0
    monkeypatch.setenv("RANK", "2")
    assert launched_rank() == 2
    assert check_job_id("0123456789ab") == "0123456789ab"
    with pytest.raises(UserError, match="unknown job id"):
        check_job_id("0123456789ab\n")


def test_a_resumed_job_counts_against_the_queue_limit(tmp_path):
    """Resume put a job back in a full queue (--max-queue held for new jobs only)."""
    store = JobStore(tmp_path / "jobs.sqlite", max_queued=1)
    old = store.submit({"prompt": "a red cube"}, 10)
    store.claim(worker=0)
    assert store.recover() == [old]  # interrupted: the server stopped
    waiting = store.submit({"prompt": "a blue torus"}, 10)  # the queue (1) is full again
    with pytest.raises(UserError, match=r"the queue is full \(1 jobs waiting, at most 1; this request adds 1\)"):
        store.resume(old)
    assert store.get(old).status == "interrupted"
    store.cancel(waiting)
    store.resume(old)
    assert store.get(old).status == "queued"


def test_a_damaged_job_table_or_run_config_is_one_line_naming_the_file(tmp_path, capsys):
    from test_bad_inputs import cli_error

    from threedgen.config import load_run_config

    table = tmp_path / "state" / "jobs.sqlite"
    table.parent.mkdir()
    table.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match=rf"the job table {table} is damaged \(file is not a database\); move it aside"):
        JobStore(table)
    assert table.read_bytes() == b"this is not a database" * 100  # left as it was, for the user to look at
    run = tmp_path / "run"
    run.mkdir()
    for text, reason in ((b"guidance: {name: [sds\n", "while parsing a flow sequence"),
                         (b"\xff\xfe", "'utf-8' codec can't decode"), (b"- a\n- b\n", "it must hold a mapping")):
        (run / "config.yaml").write_bytes(text)
        with pytest.raises(UserError, match=re.escape(f"{run / 'config.yaml'} is damaged ({reason}")):
            load_run_config(run / "config.yaml")
        line = cli_error(capsys, ["export", str(run)])
        assert f"{run / 'config.yaml'} is damaged" in line and "restore it from a copy" in line, line


def test_a_huge_prompt_is_refused_before_it_is_cleaned():
    """The length cap held only after the character-by-character cleaning, which a megabyte of
    control characters made cost CPU; such a prompt is now refused on its raw length."""
    from threedgen.schema import MAX_PROMPT_CHARS, clean_prompt

    assert clean_prompt("\x00" * (4 * MAX_PROMPT_CHARS - 10) + "a red cube") == "a red cube"
    with pytest.raises(UserError, match=f"prompt is {4 * MAX_PROMPT_CHARS + 10} characters; the limit is "
                                        f"{MAX_PROMPT_CHARS}"):
        clean_prompt("\x00" * (4 * MAX_PROMPT_CHARS) + "a red cube")


def test_a_job_s_traceback_stays_out_of_the_served_outputs(tmp_path, monkeypatch):
    """An unexpected failure's traceback went to ``<outputs>/.<id>.log``, served to every user; it
    now sits beside the runs (under the state folder by default)."""
    from threedgen.jobs import worker
    from threedgen.request import RunRequest

    def boom(request, device=None):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(RunRequest, "to_config", boom)
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    job = store.submit({"prompt": "a red cube"}, 10)
    store.claim(worker=0)
    outputs, runs = tmp_path / "outputs", tmp_path / "state" / "runs"
    worker.run_job(str(store.path), job, str(runs), str(outputs), "cpu", os.getppid())
    done = store.get(job)
    assert done.status == "failed" and done.error == "RuntimeError: something unexpected"
    assert "RuntimeError: something unexpected" in (runs / f".{job}.log").read_text()
    assert not [p for p in outputs.rglob("*") if p.is_file()]  # nothing but the job's empty public folder


def test_an_empty_steps_box_runs_the_preset_s_steps(tmp_path):
    """The form's Steps box said 600 for every combination: a web job on the shapes prior with SDS
    ran 600 steps where `threedgen run` runs the preset's 250. Empty now means the preset's, and
    the box's hint says how many that is for the chosen components."""
    from threedgen.config import resolve_request
    from threedgen.webui.app import steps_info
    from threedgen.webui.service import preset_steps, validate

    settings = Settings(outputs=tmp_path / "w", state=tmp_path / "s", priors=["shapes", "stable-diffusion"])
    cli_steps = resolve_request("sds", "nerf", "shapes", flags={"prompt": "a red cube", "device": "cpu"})[0].cfg.steps
    assert preset_steps("sds", "nerf", "shapes") == cli_steps == 250
    assert preset_steps("sds", "nerf", "stable-diffusion") == 10000
    assert steps_info("sds", "nerf", "shapes") == "empty: the preset's 250 steps"
    for empty in (None, "", "  "):
        [(request, max_steps)] = validate(settings, "a red cube", "", "sds", "nerf", "shapes", empty, "0", "")
        assert request.steps is None and max_steps == 250
        assert request.to_config("cpu").steps == 250
    [(request, max_steps)] = validate(settings, "a red cube", "", "sds", "nerf", "shapes", 12, "0", "")
    assert (request.steps, max_steps) == (12, 12)
    small = Settings(outputs=tmp_path / "w", state=tmp_path / "s", max_steps=100)
    with pytest.raises(UserError, match="the preset runs 250 steps, over this server's limit of 100"):
        validate(small, "a red cube", "", "sds", "nerf", "shapes", None, "0", "")


def test_the_curve_plot_gets_numbers_even_before_the_first_rows():
    """An empty curve was a frame of Python objects, which the plot drew as categories (a pile of
    overlapping labels that stayed after the numbers came): its columns are numbers from the start."""
    from threedgen.webui.app import curve_frame

    for rows in ([], [{"step": 9, "value": 0.25, "series": "loss"}]):
        frame = curve_frame(rows)
        assert list(frame.columns) == ["step", "value", "series"]
        assert str(frame["step"].dtype) == "int64" and str(frame["value"].dtype) == "float64", frame.dtypes


def test_old_job_rows_still_read_as_requests():
    """A job table row of an earlier version (``server_overrides``) reads as a request."""
    from threedgen.request import RunRequest

    old = {"prompt": "a red cube", "negative_prompt": "", "guidance": "vsd", "representation": "nerf", "prior": "shapes",
           "steps": 20, "seed": 3, "resolution": 64, "server_overrides": ["export.resolution=32"],
           "batch": {"id": "0123abcd", "line": 2}}
    request = RunRequest.from_dict(old)
    assert (request.guidance, request.steps, request.seed, request.overrides) == ("vsd", 20, 3, ("export.resolution=32",))
    cfg = request.to_config("cpu")
    assert (cfg.steps, cfg.seed, cfg.render.resolution, cfg.export.resolution) == (20, 3, 64, 32)
    assert RunRequest.from_dict(request.to_dict()) == request


def test_the_service_answers_without_gradio(tmp_path):
    """The endpoints are plain Python: submit, list, status, cancel and a file lookup work in a
    process that never imports Gradio (the page alone does)."""
    code = f"""
import sys
from pathlib import Path
from threedgen.errors import UserError
from threedgen.webui.service import Service, Settings
svc = Service(Settings(outputs=Path({str(tmp_path / 'out')!r}), state=Path({str(tmp_path / 'state')!r})))
[job] = svc.submit("a red cube", "", "sds", "nerf", "shapes", "", "0", "")
assert svc.jobs()[0]["id"] == job and svc.jobs()[0]["status"] == "queued"
assert svc.status(job)["max_steps"] == 250 and svc.status(job)["files"] == []
assert svc.cancel(job) == "cancelled"
try:
    svc.file(job, "../../etc/passwd")
except UserError as exc:
    print("refused:", exc)
svc.close()
print("gradio" in sys.modules, "pandas" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    refused, modules = proc.stdout.strip().splitlines()
    assert refused.startswith("refused: unknown file kind")
    assert modules == "False False"


def test_a_finished_job_shows_its_recipe_hash_and_verifies(tmp_path):
    """The job view shows the run's recipe (the manifest's short hash); Verify replays the run's
    first steps in a child process and records the one-line result in the job's history."""
    from threedgen.webui.service import Service

    svc = Service(Settings(outputs=tmp_path / "out", state=tmp_path / "state",
                           overrides=[*FAST, "verify_steps=3"]))
    [job] = svc.submit("a red cube", "", "sds", "nerf", "shapes", 6, "0", "")
    with pytest.raises(UserError, match=f"job {job} is queued: only a finished job can be verified"):
        svc.verify(job)
    svc.pool.start()
    try:
        wait_for(lambda: svc.status(job)["status"] in ("succeeded", "failed"), timeout=300)
    finally:
        svc.close()
    status = svc.status(job)
    assert status["status"] == "succeeded", status
    manifest = json.loads((Path(svc.store.get(job).run_dir) / "manifest.json").read_text())
    assert status["manifest"] == manifest["config_sha256"][:12] and re.fullmatch(r"[0-9a-f]{12}", status["manifest"])
    report = svc.verify(job)
    assert report["status"] == "bit-exact" and report["text"].startswith("bit-exact: 3 step(s)"), report
    assert svc.status(job)["history"][-1]["event"] == "verified"
    line = WebUI(svc.settings).job_view(job)[0]  # the page over the same state folder
    assert f"recipe `{status['manifest']}`" in line and "verified: bit\\-exact" in line, line
