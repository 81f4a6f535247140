"""threedgen: text-to-3D generation by score distillation.

The package imports nothing heavy at top level; see ``threedgen.cli`` for the command line and
``threedgen.runner.run`` for the Python entry point used by the CLI and the web UI.
"""

__version__ = "0.1.0"
