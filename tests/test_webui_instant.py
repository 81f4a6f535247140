"""The web UI's instant tab: generation from an amortised model (``threedgen webui --amortised``),
published to the outputs folder without the private run folder; bad prompts refused before
anything is written; the page with and without a model; the ``instant`` API."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from threedgen.cli import main
from threedgen.errors import UserError
from threedgen.webui.app import INSTANT_OFF, Settings, WebUI, guard

# gradio is the web UI's alone: the GPU machine's image has none, and its CUDA step collects this module.
gr = pytest.importorskip("gradio", reason="the web UI's tests need gradio (pip install threedgen)")

# Two colours x two shapes, the red torus held out; a small generator and a two-shape world (the
# prior renders each of its shapes once per test session), small exports: seconds to train and generate.
PROMPTS = "a red cube\na blue torus\na blue cube\n"
SMALL = ["prior.shapes=[cube,torus]", "amortised.prompts_per_step=2", "representation.density_resolution=24",
         "representation.color_resolution=12", "amortised.latent=4", "amortised.hidden=32", "render.resolution=32",
         "render.coarse_resolution=0", "representation.num_samples=16", "checkpoint_every=2", "preview_every=2",
         "export.resolution=32", "export.video_frames=4", "export.video_resolution=32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instant-model")
    (root / "prompts.txt").write_text(PROMPTS)
    code = main(["train-amortised", str(root / "prompts.txt"), "--out", str(root / "model"), "--steps", "4",
                 "--no-progress", *SMALL])
    assert code == 0
    return root / "model"


@pytest.fixture(scope="module")
def ui(model, tmp_path_factory) -> WebUI:
    root = tmp_path_factory.mktemp("instant-webui")
    ui = WebUI(Settings(outputs=root / "outputs", state=root / "state", amortised=model))
    yield ui
    ui.close()


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


def _config(demo) -> tuple[list[dict], set[str]]:
    config = demo.config
    return config["components"], {d.get("api_name") for d in config["dependencies"]}


def _texts(components, kind: str, prop: str = "value") -> list[str]:
    return [str(c["props"].get(prop)) for c in components if c["type"] == kind]


def test_instant_generates_held_out_combinations_and_publishes_only_deliverables(ui):
    results: dict[str, dict] = {}

    def click(prompt):
        results[prompt] = ui.instant(prompt)

    # Two clicks at once: one model load, one generation at a time, two run folders.
    threads = [threading.Thread(target=click, args=(p,)) for p in ("a red torus", "a crimson donut")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(results) == {"a red torus", "a crimson donut"}
    assert results["a red torus"]["run"] != results["a crimson donut"]["run"]
    outputs, state = ui.settings.outputs, ui.settings.state
    for prompt, r in results.items():
        assert r["prompt"] == prompt and r["words"] == ["red", "torus"]
        assert 0 <= r["generate_ms"] < 1000 and r["export_s"] >= 0 and 0 <= r["mask_iou"] <= 1
        public = outputs / "instant" / r["run"]
        assert {"glb", "obj", "mtl", "texture", "ply", "video", "preview", "metrics"} <= set(r["files"])
        for kind, path in r["files"].items():
            assert Path(path).is_file() and Path(path).parent == public, kind
        assert Path(r["files"]["glb"]).read_bytes()[:4] == b"glTF"
        assert Path(r["files"]["preview"]).name.startswith("preview-")
        assert (state / "instant" / r["run"] / "checkpoints" / "last.ckpt").is_file()  # the private run folder
    # Nothing of the state folder is served: no checkpoint, config or status under outputs.
    published = {p.name for p in _files(outputs)}
    assert not any(name.endswith(".ckpt") or name in ("config.yaml", "status.json", "checkpoints")
                   for name in published)
    assert not any(state in p.parents for p in _files(outputs))
    # The page's handler: a line with the time in ms and the score, then the viewers' files.
    line, preview, glb, video, downloads = ui.instant_view("a red torus")
    assert "generated in" in line and " ms" in line and "mask IoU" in line
    assert glb.endswith("mesh.glb") and Path(preview).is_file() and Path(video).is_file()
    assert str(outputs / "instant") in glb and any(d.endswith("mesh.obj") for d in downloads)


@pytest.mark.parametrize("prompt,message", [
    ("a green cube", "uses 'green', which this model never saw in training; it knows colours: red, blue; "
                     "shapes: cube, torus"),
    ("a red mug", "uses 'mug', which this model never saw in training"),
    ("a hamburger", "outside the shapes prior's vocabulary"),
    ("", "prompt is empty"),
    ("a red cube " * 200, "the limit is 1000"),
    (None, "prompt must be text"),
])
def test_bad_prompts_are_one_line_errors_and_write_nothing(ui, prompt, message):
    before = _files(ui.settings.outputs) | _files(ui.settings.state / "instant")
    with pytest.raises(UserError, match="^[^\n]*$") as plain:
        ui.instant(prompt)
    assert message in str(plain.value)
    for handler in (ui.instant_view, guard(ui.instant)):  # the page's click; the API endpoint
        with pytest.raises(gr.Error) as err:
            handler(prompt)
        assert message in err.value.message and "\n" not in err.value.message
    assert _files(ui.settings.outputs) | _files(ui.settings.state / "instant") == before


def test_the_page_has_an_instant_tab_with_what_the_model_knows(ui):
    demo = ui.blocks()
    components, apis = _config(demo)
    assert {"Per-prompt job", "Instant (amortised model)"} <= set(_texts(components, "tabitem", "label"))
    summary = next(t for t in _texts(components, "markdown") if "amortised model" in t)
    assert "colours: red, blue" in summary and "shapes: cube, torus" in summary and "3 training prompts" in summary
    assert "Create instantly" in _texts(components, "button")
    assert _texts(components, "model3d", "label").count("Mesh (GLB)") == 2  # the job view's and the instant tab's
    assert {"instant", "submit", "status", "cancel", "resume", "jobs", "download"} <= apis
    examples = [c for c in components if c["type"] == "dataset"]
    assert any("a red torus" in str(c["props"].get("samples")) for c in examples)  # a held-out example
    assert INSTANT_OFF not in _texts(components, "markdown")


def test_the_page_without_a_model_says_how_to_enable_it(tmp_path):
    ui = WebUI(Settings(outputs=tmp_path / "outputs", state=tmp_path / "state"))
    demo = ui.blocks()
    components, apis = _config(demo)
    assert {"Per-prompt job", "Instant (amortised model)"} <= set(_texts(components, "tabitem", "label"))
    assert INSTANT_OFF in _texts(components, "markdown")
    assert "threedgen webui --amortised MODEL" in INSTANT_OFF and "threedgen train-amortised PROMPTS.txt" in INSTANT_OFF
    assert "Create instantly" not in _texts(components, "button")
    assert "instant" in apis  # the API answers, with the same line
    with pytest.raises(gr.Error, match="threedgen webui --amortised MODEL"):
        guard(ui.instant)("a red cube")
    assert _files(tmp_path / "outputs") == set() and not (tmp_path / "state" / "instant").exists()


def test_a_folder_that_is_no_model_is_refused_at_start(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not an amortised model folder"):
        WebUI(Settings(outputs=tmp_path / "outputs", state=tmp_path / "state", amortised=tmp_path / "empty"))
