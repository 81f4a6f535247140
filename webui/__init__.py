"""The Gradio web UI (``threedgen webui``) and its durable job queue.

- ``jobs``: the SQLite job table (WAL), the queue's single source of truth;
- ``worker``: one worker thread per device, each job in its own process through
  ``threedgen.runner.run``, the CLI's entry point;
- ``app``: the Blocks page and its API, validating every request on the server.
"""
