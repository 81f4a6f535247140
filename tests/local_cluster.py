"""A Ray cluster on this machine, for the tests and benchmarks of the Ray backend (not part of the
package: `ray start` makes a real cluster)."""

from __future__ import annotations

import os

from threedgen.jobs.cluster import NAMESPACE, import_ray


class LocalCluster:
    """A Ray cluster on this machine for the tests and benchmarks:
    a head without CPUs (it holds the dispatcher) and ``workers`` worker nodes of ``cpus`` CPUs
    each (``ray.cluster_utils.Cluster``), every session file (logs, sockets, the address file) in
    one private temporary folder, Ray's token auth off for this process; this process joins it as
    the driver. ``close`` (or leaving the ``with`` block) shuts it down and removes the folder."""

    ENV = ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_TMPDIR")

    def __init__(self, workers: int = 2, cpus: float = 1, object_store_mb: int = 100):
        import tempfile  # only for a local cluster

        ray = import_ray()
        from ray.cluster_utils import Cluster  # optional (the cluster extra)

        self.object_store = object_store_mb * 1024 ** 2
        self.saved = {k: os.environ.get(k) for k in self.ENV}
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.pop("RAY_ADDRESS", None)
        # Short: Ray's socket paths must fit in 107 bytes.
        self.temp = tempfile.mkdtemp(prefix="tgray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        os.environ["RAY_TMPDIR"] = self.temp
        os.makedirs(os.path.join(self.temp, "ray"))
        self.cluster, self.workers, self.cpus = None, [], cpus
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "object_store_memory": self.object_store, "include_dashboard": False,
                "temp_dir": os.path.join(self.temp, "ray")})
            for _ in range(workers):
                self.add_worker()
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address, namespace=NAMESPACE, log_to_driver=False, logging_level="warning")
        except BaseException:
            self.close()
            raise
        self.address = self.cluster.address

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=self.cpus, object_store_memory=self.object_store)
        self.workers.append(node)
        return node

    def kill_worker(self, node) -> None:
        """The node dies at once (its processes are killed), as a machine that loses power."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def head_pids(self) -> list[int]:
        return [info.process.pid for infos in self.cluster.head_node.all_processes.values() for info in infos]

    def close(self) -> None:
        import shutil  # only for a local cluster

        import ray  # optional (the cluster extra)

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        shutil.rmtree(self.temp, ignore_errors=True)
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
