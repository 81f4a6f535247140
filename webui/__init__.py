"""The Gradio web UI and its durable job queue (``threedgen webui``); not built yet.

It will call ``threedgen.runner.run`` — the same entry point as the CLI — from worker processes.
"""
