"""Jobs: the durable SQLite job table (``store``), the backends that run its jobs (``local``
workers on this machine's devices, ``ray`` on a cluster; ``backends.Backend``), what a job process
does (``worker``, ``cluster_job``) and many prompts at once (``batch``). Used by `threedgen batch`
and by the web UI's service; neither branches on the backend's name."""

BACKENDS = ("local", "ray")  # the names `--backend` takes (threedgen.jobs.backends.make_backend builds them)
