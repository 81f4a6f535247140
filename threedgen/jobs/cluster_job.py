"""The Ray task of one job, shipped to the worker nodes by value.

Ray sends this module's code with each task (``register_pickle_by_value``), so it imports nothing
of threedgen at the top: on a node without threedgen, or with another version than the head's,
the job fails with one line that names the node and both versions instead of a pickling error.
"""

from __future__ import annotations

import socket


def node_label() -> str:
    """The node as a person reads it: its address, Ray's node id (shortened) and its host name."""
    try:
        import ray  # on the node: this module travels by value

        address = ray.util.get_node_ip_address()
        node_id = ray.get_runtime_context().get_node_id()[:8]
    except Exception:  # noqa: BLE001 - a label only
        address, node_id = "?", "?"
    return f"{address} [{node_id}] ({socket.gethostname()})"


def run_cluster_job(job_id: str, params: dict, resume_dir, runs_dir: str, head_version: str, dispatcher: str,
                    namespace: str) -> dict:
    """Run one job on whatever node Ray chose; report progress to the head's dispatcher actor; the
    outcome as ``{"status", "error", "run_dir", "node"}`` (the dispatcher records it)."""
    import os  # on the node: this module travels by value
    from pathlib import Path  # on the node: this module travels by value

    import ray  # on the node: this module travels by value

    node = node_label()
    try:
        import threedgen  # may be missing on a node: the point of this check
    except ImportError:
        return {"status": "failed", "run_dir": None, "node": node,
                "error": f"node {node} has no threedgen installed (the head runs {head_version}); install the same "
                         "version on every node"}
    if threedgen.__version__ != head_version:
        return {"status": "failed", "run_dir": None, "node": node,
                "error": f"node {node} runs threedgen {threedgen.__version__} and the head {head_version}; install "
                         "the same version on every node"}
    from threedgen.errors import UserError  # after the version check: the node's own threedgen
    from threedgen.jobs.worker import ActorReporter, execute_job  # after the version check: the node's own threedgen
    from threedgen.rundir import check_writable  # after the version check: the node's own threedgen

    try:
        check_writable(Path(runs_dir))
    except UserError as exc:
        return {"status": "failed", "run_dir": None, "node": node,
                "error": f"node {node}: {exc} (the run storage must be writable from every node)"}
    board = ray.get_actor(dispatcher, namespace=namespace)
    ray.get(board.started.remote(job_id, node, os.getpid()), timeout=60)
    device = "cuda:0" if ray.get_gpu_ids() else "cpu"  # Ray set CUDA_VISIBLE_DEVICES to this task's GPU
    log = Path(runs_dir) / f".{job_id}.log"
    outcome = execute_job(job_id, params, resume_dir, runs_dir, device, ActorReporter(board, job_id), log)
    return {**outcome, "node": node}
