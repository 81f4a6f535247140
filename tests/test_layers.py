"""The import layers of docs/architecture.md, kept by a test: no module imports a module of a
higher layer, no import cycle (imports made inside functions count), and importing the CLI does
not import torch (so help, listings and input errors answer at once)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import code_metrics  # noqa: E402  (the import-graph walker, shared with the code-shape benchmark)

# Layer of each module, bottom (0) to top (3); a module may import its own layer or lower ones.
# Listed by prefix: the longest matching prefix decides.
LAYERS = {
    # 0, core: errors, cameras, schedules, the noise schedule, registries, the config schema,
    # devices and kernels, run-folder writes, meshes and images.
    "threedgen.errors": 0, "threedgen.cameras": 0, "threedgen.schedule": 0, "threedgen.noise": 0,
    "threedgen.registry": 0, "threedgen.schema": 0, "threedgen.devices": 0, "threedgen.kernels": 0,
    "threedgen.rundir": 0, "threedgen.meshing": 0, "threedgen.fusion": 0, "threedgen.boxes": 0, "threedgen.modules": 0,
    "threedgen.views": 0, "threedgen.texture": 0, "threedgen.rasterize": 0,
    # 1, components: priors, guidance methods, representations (and their config modules).
    "threedgen.guidance": 1, "threedgen.representations": 1,
    # 2, training: the LightningModule, callbacks, checkpoints.
    "threedgen.system": 2, "threedgen.callbacks": 2, "threedgen.checkpoints": 2, "threedgen.amortised_system": 2,
    "threedgen.fingerprints": 2, "threedgen.refine": 2,
    # 3, the app: config merging, run folders, the runner, export, eval, doctor, CLI, web UI.
    "threedgen.config": 3, "threedgen.runs": 3, "threedgen.runner": 3, "threedgen.export": 3,
    "threedgen.amortised": 3, "threedgen.amortised_folder": 3, "threedgen.evaluate": 3, "threedgen.asset_metrics": 3, "threedgen.janus": 3, "threedgen.doctor": 3, "threedgen.cli": 3, "threedgen.__main__": 3,
    "threedgen.manifest": 3, "threedgen.verify": 3,
    "threedgen.webui": 3, "threedgen": 3,
}
# Within layer 1: a prior never imports guidance methods or representations; a representation
# never imports guidance or priors.
SIBLINGS_APART = [("threedgen.guidance.priors", "threedgen.guidance"), ("threedgen.guidance.priors", "threedgen.representations"),
                  ("threedgen.representations", "threedgen.guidance"), ("threedgen.guidance", "threedgen.representations")]
# The torch-free modules: the CLI's quick paths import only these of the project.
TORCH_FREE = ["threedgen.cli", "threedgen.amortised_folder", "threedgen.config", "threedgen.schema", "threedgen.registry",
              "threedgen.guidance.config", "threedgen.representations.config", "threedgen.guidance.priors.config", "threedgen.manifest"]


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} has no layer in tests/test_layers.py (and docs/architecture.md)"
    return LAYERS[best]


def _part_of(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


GRAPH = code_metrics.graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module):
    for target, line, inner in GRAPH[module]:
        where = f"{module} line {line}{' (inside a function)' if inner else ''}"
        assert layer(target) <= layer(module), f"{where} imports {target} from a higher layer"
        for low, high in SIBLINGS_APART:
            if _part_of(module, low) and _part_of(target, high) and not _part_of(target, low):
                raise AssertionError(f"{where} imports {target}: {low} may not import {high}")


def test_no_import_cycle():
    edges = {m: {t for t, _, _ in items} for m, items in GRAPH.items()}
    assert code_metrics.cycles(edges) == []


def test_function_local_imports_say_why():
    """An import inside a function is for a heavy or optional dependency, never to dodge a cycle:
    each says why in a comment on its line."""
    missing = []
    for module, path in code_metrics.modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if not isinstance(inner, (ast.Import, ast.ImportFrom)):
                        continue
                    if not any("#" in lines[i] for i in range(inner.lineno - 1, inner.end_lineno)):
                        missing.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert missing == [], f"function-local imports without a reason comment: {', '.join(sorted(set(missing)))}"


# The app wing (layer 3) has an order of its own, top to bottom: the page (Gradio) -> the web
# service and its routes -> the jobs (table, backends, job processes) -> the runner and the run
# folder -> the request -> config merging. A module may import its own rank or lower ones.
APP_WING = {
    "threedgen.cli": 6, "threedgen.__main__": 6,
    "threedgen.webui.app": 5,
    "threedgen.webui.service": 4, "threedgen.webui.rest": 4, "threedgen.webui.auth": 4,
    "threedgen.jobs": 3,
    "threedgen.runner": 2, "threedgen.amortised": 2, "threedgen.runs": 2, "threedgen.rundir": 2,
    "threedgen.request": 1,
    "threedgen.config": 0,
}


def _wing_rank(module: str):
    best = max((p for p in APP_WING if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else APP_WING[best]


def test_the_app_wing_imports_downward_only():
    wrong = []
    for module, targets in GRAPH.items():
        rank = _wing_rank(module)
        for target, line, _ in targets if rank is not None else ():
            below = _wing_rank(target)
            if below is not None and below > rank:
                wrong.append(f"{module} line {line} imports {target}")
    assert wrong == [], "the app wing's order is page -> service -> jobs -> runner/run folder -> request -> config: " \
                        + "; ".join(wrong)
    assert _wing_rank("threedgen.jobs.worker") == 3 and _wing_rank("threedgen.webui.app") == 5


def test_layer_table_is_the_documented_one():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for prefix in LAYERS:
        if prefix != "threedgen":
            assert f"`{prefix.removeprefix('threedgen.')}`" in text, f"docs/architecture.md does not place {prefix}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_quick_paths_do_not_import_torch(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'pytorch_lightning', 'gradio', 'diffusers') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"importing {module} imports {out.strip()}"
