"""The run folder's layout has one owner: ``threedgen.rundir.RunFolder`` spells every name in it,
and no other module of the package does (this test reads their string constants)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from threedgen.jobs.worker import PUBLIC_FILES
from threedgen.rundir import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["threedgen", "guidance", "representations", "webui"]
OWNER = ROOT / "threedgen" / "rundir.py"
# Names a run folder holds: the files anywhere in a string, the folders as a whole string.
FILE_NAMES = re.compile(r"(config\.yaml|status\.json|metrics\.json|manifest\.json|fingerprints\.json|last\.ckpt|"
                        r"prev\.ckpt|latest\.png|final\.png|metrics\.csv|mesh_texture\.png|splats\.ply|"
                        r"turntable\.(mp4|gif)|mesh\.(glb|obj|ply|mtl))")
FOLDER_NAMES = {"checkpoints", "previews", "logs", "checkpoints/", "previews/", "logs/"}


def _strings(tree: ast.AST):
    """String constants that are not docstrings and not text (a docstring, a message or a help
    text may name a file for the user; a name in code is a string without spaces)."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and not re.search(r"\s", node.value):
            yield node


def test_no_module_but_run_folder_spells_a_run_folder_name():
    found = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == OWNER:
                continue
            for node in _strings(ast.parse(path.read_text())):
                if FILE_NAMES.search(node.value) or node.value in FOLDER_NAMES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "run-folder names outside threedgen/rundir.py (use RunFolder):\n" + "\n".join(found)


def test_the_run_folder_names_every_file():
    folder = RunFolder("/runs/a-red-cube-20261207-120000")
    assert folder.config.name == "config.yaml" and folder.status.name == "status.json"
    assert folder.last_checkpoint.relative_to(folder.path).as_posix() == "checkpoints/last.ckpt"
    assert folder.curve.relative_to(folder.path).as_posix() == "logs/metrics.csv"
    assert [folder.mesh(f).name for f in ("glb", "obj", "ply", "mtl")] == ["mesh.glb", "mesh.obj", "mesh.ply", "mesh.mtl"]
    assert PUBLIC_FILES == {"glb": "mesh.glb", "obj": "mesh.obj", "mtl": "mesh.mtl", "texture": "mesh_texture.png",
                            "ply": "mesh.ply", "splats": "splats.ply", "video": "turntable.mp4",
                            "preview": "previews/final.png", "metrics": "metrics.json"}


def test_status_and_metrics_read_safely(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_status() == {} and folder.read_metrics() is None and folder.step() == 0
    folder.status.write_text('{"status": "running", "step": 12}')
    folder.metrics.write_text("[1, 2]")  # not a mapping: as good as none
    assert folder.step() == 12 and folder.read_metrics() is None
    folder.status.write_text("{broken")
    assert folder.step() == 0
