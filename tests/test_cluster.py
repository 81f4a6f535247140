"""The Ray backend on a real local cluster: a head without CPUs and two 1-CPU worker nodes
(``ray.cluster_utils.Cluster``), started here and removed afterwards with its session files.

Submit -> succeed with a GLB; cancel a running job; kill the node running a job -> it resumes on the
other node and scores like an uninterrupted run; restart the web UI mid-job; a batch of 4 prompts;
a bad batch file queues nothing; a node with another threedgen version; run storage a worker
cannot write; an unreachable --ray-address."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason='the cluster tests need Ray: pip install "threedgen[cluster]"')

from threedgen.webui.cluster import RayBackend  # noqa: E402
from threedgen.webui.jobs import JobStore  # noqa: E402

FAST = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4", "export.video_resolution=32",
        "export.formats=[glb,obj,ply]", "export.evaluate=false", "checkpoint_every=5", "preview_every=5"]
MB = 1024 ** 2


def wait_for(fn, timeout: float, every: float = 0.25):
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def job_params(prompt="a red cube", steps=30, seed=0, overrides=FAST):
    return {"prompt": prompt, "negative_prompt": "", "guidance": "sds", "representation": "nerf", "prior": "shapes",
            "steps": steps, "seed": seed, "resolution": None, "server_overrides": list(overrides)}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token written to the home folder
    os.environ.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="tgray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * MB, "include_dashboard": False, "temp_dir": temp})
    c.workers = [c.add_node(num_cpus=1, object_store_memory=100 * MB) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="threedgen", log_to_driver=False, logging_level="warning")
    yield c
    ray.shutdown()
    c.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
    assert (tmp_path / "outputs" / job_id / "preview.png").is_file()
    assert Path(job.run_dir).parent == (tmp_path / "runs" / job_id).resolve()
    b.shutdown_dispatcher()
