"""The Ray backend on a real local cluster: a head without CPUs and two 1-CPU worker nodes
(``ray.cluster_utils.Cluster``), started here and removed afterwards with its session files.

Submit -> succeed with a GLB; cancel a running job; kill the node running a job -> it resumes on the
other node and scores like an uninterrupted run; restart the web UI mid-job; a batch of 4 prompts;
a bad batch file queues nothing; a node with another threedgen version; run storage a worker
cannot write; an unreachable --ray-address."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason='the cluster tests need Ray: pip install "threedgen[cluster]"')

from local_cluster import LocalCluster  # noqa: E402

from threedgen.jobs.cluster import RayBackend  # noqa: E402
from threedgen.jobs.store import JobStore, wait_for  # noqa: E402

FAST = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4", "export.video_resolution=32",
        "export.formats=[glb,obj,ply]", "export.evaluate=false", "checkpoint_every=5", "preview_every=5"]
FINAL = ("succeeded", "failed", "cancelled", "interrupted")


def job_params(prompt="a red cube", steps=30, seed=0, overrides=FAST):
    return {"prompt": prompt, "negative_prompt": "", "guidance": "sds", "representation": "nerf", "prior": "shapes",
            "steps": steps, "seed": seed, "resolution": None, "server_overrides": list(overrides)}


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=2, cpus=1, object_store_mb=100) as c:
        yield c


def backend(tmp_path, **kwargs) -> RayBackend:
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    return RayBackend(store, tmp_path / "runs", tmp_path / "outputs", address="auto", **kwargs).start()


def finished(store, job_id, timeout=300):
    return wait_for(lambda: (j := store.get(job_id)).status in ("succeeded", "failed", "cancelled", "interrupted")
                    and j, timeout)


def test_submit_runs_on_the_cluster_and_publishes_a_glb(cluster, tmp_path):
    b = backend(tmp_path)
    job_id = b.store.submit(job_params(), 30)
    job = finished(b.store, job_id)
    assert job.status == "succeeded", job
    assert job.step == 30 and job.node and [e["event"] for e in job.history][-1] == "succeeded"
    glb = tmp_path / "outputs" / job_id / "mesh.glb"
    assert glb.read_bytes()[:4] == b"glTF"
    assert [p.name for p in (tmp_path / "outputs" / job_id).glob("preview-*.png")] == ["preview-000030-final.png"]
    assert Path(job.run_dir).parent == (tmp_path / "runs" / job_id).resolve()
    b.shutdown_dispatcher()


def test_cancel_a_running_job_the_job_stops_itself_and_keeps_its_checkpoints(cluster, tmp_path):
    b = backend(tmp_path)
    job_id = b.store.submit(job_params(steps=400), 400)
    wait_for(lambda: b.store.get(job_id).step >= 10, 120)
    asked = time.time()
    assert b.store.cancel(job_id) == "cancelling"
    job = finished(b.store, job_id, 60)
    print(f"cancelled in {time.time() - asked:.2f} s")
    assert job.status == "cancelled" and job.step < 400
    assert list((Path(job.run_dir) / "checkpoints").glob("*.ckpt"))
    b.shutdown_dispatcher()


def test_cancel_is_backed_up_by_ray_cancel_force(cluster, tmp_path):
    # A grace of 0 s: the dispatcher kills the task with ray.cancel(force=True) at once, as it does
    # after 10 s when a job does not stop by itself.
    b = backend(tmp_path, cancel_grace_s=0.0)
    job_id = b.store.submit(job_params(steps=400), 400)
    wait_for(lambda: b.store.get(job_id).step >= 5, 120)
    b.store.cancel(job_id)
    job = finished(b.store, job_id, 30)
    assert job.status == "cancelled" and job.step < 400
    b.shutdown_dispatcher()


def test_a_dead_node_s_job_resumes_on_the_other_node_and_scores_like_an_uninterrupted_run(cluster, tmp_path):
    b = backend(tmp_path)
    scored = [*FAST[:-3], "export.evaluate=true", "checkpoint_every=5", "preview_every=5"]
    # The same job twice (a harmless extra key keeps the second from being taken for a double submit):
    # one per node; the node running the first is killed mid-run.
    victim = b.store.submit({**job_params(steps=60, overrides=scored), "batch": {"line": 1}}, 60)
    straight = b.store.submit({**job_params(steps=60, overrides=scored), "batch": {"line": 2}}, 60)
    job = wait_for(lambda: (j := b.store.get(victim)).step >= 20 and j.node and j, 180, every=0.05)
    node = next(n for n in cluster.workers if n.node_id[:8] in job.node)
    cluster.kill_worker(node)
    killed_at = job.step
    try:
        a, s = finished(b.store, victim, 400), finished(b.store, straight, 400)
    finally:
        cluster.add_worker()  # for the next tests
    assert s.status == "succeeded" and s.restarts == 0, s
    assert a.status == "succeeded" and a.restarts == 1 and a.step == 60, a
    events = [e["event"] for e in a.history]
    assert events[:2] == ["queued", "started"] and events[-1] == "succeeded"
    fault = next(e for e in a.history if e["event"] == "interrupted")
    assert fault["reason"].startswith("node ") and fault["reason"].endswith(" died") and node.node_id[:8] in fault["reason"]
    assert events.count("started") == 2 and events.count("first step") == 2 and "requeued" in events
    assert node.node_id[:8] not in a.node  # it finished elsewhere
    resumed = json.loads((Path(a.run_dir) / "metrics.json").read_text())
    uninterrupted = json.loads((Path(s.run_dir) / "metrics.json").read_text())
    print(f"killed at step >= {killed_at}; IoU {uninterrupted['mask_iou']:.4f} / {resumed['mask_iou']:.4f}")
    # Resume replays the run from its last checkpoint (test_end_to_end's kill test): the same tolerances.
    assert abs(resumed["mask_iou"] - uninterrupted["mask_iou"]) <= 0.005
    assert abs(resumed["psnr"] - uninterrupted["psnr"]) <= 0.2
    assert abs(resumed["chamfer"] - uninterrupted["chamfer"]) <= 0.002
    b.shutdown_dispatcher()


def test_a_node_with_another_threedgen_version_fails_the_job_in_one_line(cluster, tmp_path):
    b = backend(tmp_path, head_version="9.9.9")
    job = finished(b.store, b.store.submit(job_params(), 30), 120)
    from threedgen import __version__

    assert job.status == "failed"
    assert job.error.startswith("node ") and f"runs threedgen {__version__} and the head 9.9.9" in job.error
    assert "\n" not in job.error
    b.shutdown_dispatcher()


def test_run_storage_a_worker_cannot_write_fails_the_job_and_others_go_on(cluster, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the run storage should be")
    store = JobStore(tmp_path / "state" / "jobs.sqlite")
    bad = RayBackend(store, blocked / "runs", tmp_path / "outputs").start()
    first = finished(store, store.submit(job_params(), 30), 120)
    assert first.status == "failed" and "not writable" in first.error and first.error.startswith("node ")
    assert "every node" in first.error and "\n" not in first.error
    bad.shutdown_dispatcher()
    good = backend(tmp_path / "good")
    assert finished(good.store, good.store.submit(job_params(steps=10), 10), 120).status == "succeeded"
    good.shutdown_dispatcher()


def test_a_batch_of_four_prompts_on_the_cluster(cluster, tmp_path, capsys):
    from threedgen.cli import main

    f = tmp_path / "prompts.txt"
    f.write_text("# four\na red cube\na blue torus --seed 1\na green cube --steps 10\n\"a yellow torus\" --seed 2\n")
    report = tmp_path / "batch.json"
    args = ["batch", str(f), "--backend", "ray", "--ray-address", cluster.address, "--steps", "15",
            "--state", str(tmp_path / "state"), "--outputs", str(tmp_path / "outputs"), "--runs", str(tmp_path / "runs"),
            "--report", str(report), *[x for item in [*FAST[:-3], "export.evaluate=true"] for x in ("--set", item)]]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    r = json.loads(report.read_text())
    assert r["backend"] == "ray" and r["counts"] == {"succeeded": 4}
    assert [(j["line"], j["prompt"], j["seed"], j["max_steps"]) for j in r["jobs"]] == [
        (2, "a red cube", 0, 15), (3, "a blue torus", 1, 15), (4, "a green cube", 0, 10), (5, "a yellow torus", 2, 15)]
    nodes = set()
    for j in r["jobs"]:
        assert j["status"] == "succeeded" and j["node"] and 0.3 < j["metrics"]["mask_iou"] <= 1
        assert (tmp_path / "outputs" / j["id"] / "mesh.glb").read_bytes()[:4] == b"glTF"
        assert Path(j["run_dir"]).is_relative_to(tmp_path / "runs")
        nodes.add(j["node"])
    assert len(nodes) == 2  # both worker nodes took jobs
    assert main(["batch", "--status", "--state", str(tmp_path / "state")]) == 0
    assert "4 succeeded" in capsys.readouterr().out
    RayBackend(JobStore(tmp_path / "state" / "jobs.sqlite"), tmp_path / "runs", tmp_path / "outputs").shutdown_dispatcher()


def test_the_web_ui_restarts_mid_job_and_the_job_runs_on(cluster, tmp_path):
    import signal
    import socket
    import subprocess
    import sys

    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "threedgen", "webui", "--backend", "ray", "--ray-address", cluster.address,
            "--port", str(port), "--outputs", str(tmp_path / "outputs"), "--state", str(tmp_path / "state"),
            "--runs", str(tmp_path / "runs")] + [x for item in FAST for x in ("--set", item)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def start():
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "a"),
                                start_new_session=True, env=env)

        def up():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                return Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:
                return None

        return proc, wait_for(up, 120, every=1.0)

    proc, client = start()
    try:
        (job_id,) = client.predict("a red cube", "", "sds", "nerf", "shapes", 150, "0", "", api_name="/submit")["jobs"]
        wait_for(lambda: client.predict(job_id, api_name="/status")["step"] >= 5, 180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the web UI dies at once; the job is the cluster's
        proc.wait()
    step_at_kill = JobStore(tmp_path / "state" / "jobs.sqlite").get(job_id).step
    proc, client = start()
    try:
        st = client.predict(job_id, api_name="/status")
        assert st["status"] in ("running", "succeeded") and st["step"] >= step_at_kill, st
        st = wait_for(lambda: (s := client.predict(job_id, api_name="/status"))["status"] in FINAL and s, 300)
        assert st["status"] == "succeeded" and st["step"] == 150 and st["restarts"] == 0, st
        assert [e["event"] for e in st["history"]] == ["queued", "started", "first step", "succeeded"]  # it never stopped
        assert "glb" in st["files"] and st["node"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    RayBackend(JobStore(tmp_path / "state" / "jobs.sqlite"), tmp_path / "runs", tmp_path / "outputs").shutdown_dispatcher()


def test_a_restarted_dispatcher_resumes_the_jobs_it_lost(cluster, tmp_path):
    """A head restart: the dispatcher and the tasks it owned die (Ray stops a task whose owner died);
    the next dispatcher finds the job the table says is running and queues it again to resume."""
    b = backend(tmp_path)
    job_id = b.store.submit(job_params(steps=120), 120)
    wait_for(lambda: b.store.get(job_id).step >= 10, 120)
    ray.kill(b.actor, no_restart=True)  # the head's dispatcher dies with its tasks
    again = backend(tmp_path)
    assert again.reconciled == [job_id]
    job = finished(again.store, job_id, 300)
    assert job.status == "succeeded" and job.step == 120 and job.restarts == 0
    events = [e["event"] for e in job.history]
    assert events.count("started") == 2 and "interrupted" in events
    again.shutdown_dispatcher()


def test_ctrl_c_on_a_cluster_batch_leaves_the_jobs_running(cluster, tmp_path):
    import signal
    import subprocess
    import sys

    f = tmp_path / "prompts.txt"
    # Long enough (300 steps, tens of seconds) that both are still running when Ctrl-C comes: at 60
    # steps a job could finish between two polls of its step, and the batch then exited 0.
    f.write_text("a red cube --steps 300\na blue torus --steps 300\n")
    state = tmp_path / "state"
    args = [sys.executable, "-m", "threedgen", "batch", str(f), "--backend", "ray", "--ray-address", cluster.address,
            "--state", str(state), "--outputs", str(tmp_path / "outputs"), "--runs", str(tmp_path / "runs"),
            "--report", str(tmp_path / "batch.json"), *[x for item in FAST for x in ("--set", item)]]
    # A suite started in the background (`pytest &`) ignores SIGINT, and a child inherits that:
    # the batch gets the default disposition back, as a terminal's Ctrl-C finds it.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: (state / "jobs.sqlite").exists() and any(
            j.step >= 3 for j in JobStore(state / "jobs.sqlite").list()), 180)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "the jobs stay queued and running on the cluster" in err and "threedgen batch --status" in err
    assert "Traceback" not in err
    store = JobStore(state / "jobs.sqlite")
    jobs = store.list()
    assert len(jobs) == 2 and all(j.status in ("queued", "running") for j in jobs)
    assert [finished(store, j.id, 300).status for j in jobs] == ["succeeded", "succeeded"]  # they ran on
    report = json.loads((tmp_path / "batch.json").read_text())  # written at Ctrl-C with the state then
    assert len(report["jobs"]) == 2 and all(j["status"] in ("queued", "running") for j in report["jobs"])
    RayBackend(store, tmp_path / "runs", tmp_path / "outputs").shutdown_dispatcher()


def test_a_node_without_threedgen_fails_the_job_in_one_line():
    """The task's code travels by value (cluster_job imports no threedgen at the top), so on a node
    where `import threedgen` fails it still runs and answers one line naming the node."""
    import subprocess
    import sys

    import threedgen.jobs.cluster_job as cluster_job

    code = ("import importlib.util, json, sys\n"
            "spec = importlib.util.spec_from_file_location('shipped', sys.argv[1])\n"
            "job = importlib.util.module_from_spec(spec); spec.loader.exec_module(job)\n"
            "sys.modules['threedgen'] = None  # as on a node without threedgen\n"
            "print(json.dumps(job.run_cluster_job('0123456789ab', {}, None, '/tmp', '0.1.0', 'x', 'threedgen')))\n")
    proc = subprocess.run([sys.executable, "-c", code, cluster_job.__file__], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "failed" and outcome["error"].startswith("node ")
    assert "has no threedgen installed (the head runs 0.1.0)" in outcome["error"]
