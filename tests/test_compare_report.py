"""The sheet and the HTML report of a comparison folder, from a synthetic compare.json record."""

import copy
import math

import pytest
from PIL import Image

from threedgen.compare_report import COLUMNS, format_stat, write_html, write_sheet

AZIMUTHS = [0.0, 60.0, 120.0, 180.0, -120.0, -60.0]
BAD_ERROR = "seed 1: <script>alert(1)</script> & out of memory"
GLB = "/nonexistent/threedgen-runs/sds-seed0/mesh.glb"  # a path only: no file is made


def _strip(path, colour):
    """A 6-view strip of 32 px squares, each a shade of ``colour``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (6 * 32, 32), (255, 255, 255))
    for i in range(6):
        image.paste(tuple(min(255, c + 20 * i) for c in colour), (i * 32 + 4, 4, i * 32 + 28, 28))
    image.save(path)


def _stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def _record(folder, methods=("sds", "vsd", "esd"), failed=("esd", 1), truth=True, budget=None):
    """A record of ``methods`` x seeds 0 and 1 with strips and curves in ``folder``; the run named by
    ``failed`` (method, seed) failed with an error full of HTML."""
    seeds = [0, 1]
    colours = [(0, 90, 200), (0, 150, 60), (120, 60, 160)]
    runs, summary = [], []
    for m, method in enumerate(methods):
        method_runs = []
        for seed in seeds:
            bad = failed is not None and (method, seed) == tuple(failed)
            views = f"views/{method}-seed{seed}.png"
            if not bad:
                _strip(folder / views, colours[m % 3])
            values = {"wall_seconds": 40.0 + m + seed, "steps_per_second": 7.5, "peak_memory_mb": 812.0,
                      "janus_score_prior": 0.1 * seed}
            if truth:
                values.update({"mask_iou": 0.9 + 0.01 * seed, "psnr": 21.0, "chamfer": 0.012, "normal_error_deg": 18.0,
                               "texture_color_error": 0.09, "janus": bool(seed), "janus_view_rate": 0.5 * seed})
            method_runs.append({
                "method": method, "seed": seed, "job": f"job{m}{seed}", "error": BAD_ERROR if bad else None,
                "status": "failed" if bad else "succeeded", "run_dir": None if bad else f"/nonexistent/{method}-{seed}",
                "step": 120 if bad else 300, "max_steps": 300, "views": None if bad else views,
                "curve": [] if bad else [[s, 1.0 / (1 + s) + 0.05 * seed] for s in range(0, 300, 10)],
                "glb": GLB if (method, seed) == ("sds", 0) else None, "values": {} if bad else values})
        runs += method_runs
        ok = [run for run in method_runs if run["status"] == "succeeded"]
        keys = {k for run in ok for k in run["values"]}
        summary.append({"method": method, "runs": 2, "succeeded": len(ok), "failed": 2 - len(ok),
                        "errors": [run["error"] for run in method_runs if run["error"]],
                        "stats": {k: _stat([float(run["values"].get(k)) for run in ok]) for k in keys}})
    return {"format": "threedgen-compare/1", "compare": "3f2a9c1e", "prompt": "a green house & <b>garden</b>",
            "negative_prompt": "", "representation": "nerf", "prior": "shapes", "methods": list(methods),
            "seeds": seeds, "budget": budget or {"steps": 300}, "truth": truth, "view_azimuths": AZIMUTHS,
            "created": "2026-12-07T21:00:00", "written": "2026-12-07T21:10:00", "state": "finished",
            "runs": runs[::-1], "summary": summary}


def _red_rows(image):
    """The y of every pixel row that holds a strongly red pixel."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    pixels = rgb.load()
    return [y for y in range(height)
            if any(pixels[x, y][0] > 170 and pixels[x, y][1] < 60 and pixels[x, y][2] < 60 for x in range(width))]


def test_sheet(tmp_path):
    three, one = tmp_path / "three", tmp_path / "one"
    path = write_sheet(_record(three), three)
    assert path == three / "sheet.png" and path.exists()
    with Image.open(path) as image:
        image.load()
    assert 500 < image.width < 3000 and image.mode == "RGB"
    assert not [p for p in three.iterdir() if p.name.startswith(".")]  # no temp file left behind

    with Image.open(write_sheet(_record(one, methods=("sds",), failed=None), one)) as small:
        small.load()
    assert small.height + 150 < image.height

    # The failure is named in red on the last row (esd), and only there.
    red = _red_rows(image)
    assert red and min(red) > image.height / 2
    assert not _red_rows(small)


def test_sheet_all_failed_and_missing_views(tmp_path):
    record = _record(tmp_path, methods=("sds", "vsd"), failed=None)
    for run in record["runs"]:
        if run["method"] == "vsd":
            run.update(status="failed", error="boom", views=None, curve=[], values={})
    record["summary"][1].update(succeeded=0, failed=2, errors=["seed 0: boom", "seed 1: boom"], stats={})
    (tmp_path / "views" / "sds-seed0.png").unlink()  # the strip the sheet would show
    record["runs"].append({"method": "sds", "seed": 2, "status": "succeeded", "views": "views/nope.png"})
    record["summary"].append({"method": "ghost"})  # not in methods: ignored
    with Image.open(write_sheet(record, tmp_path)) as image:
        image.load()
    assert _red_rows(image)

    empty = copy.deepcopy(record)
    empty.update(methods=[], runs=[], summary=[], view_azimuths=[], budget=None, seeds=[])
    with Image.open(write_sheet(empty, tmp_path)) as image:
        assert image.width > 100


def test_html(tmp_path):
    record = _record(tmp_path)
    path = write_html(record, tmp_path)
    assert path == tmp_path / "report.html"
    text = path.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; out of memory" in text
    assert "<script" not in text.lower()
    assert "&lt;b&gt;garden&lt;/b&gt;" in text and "<b>" not in text
    for method in record["methods"]:
        assert f"<th>{method}</th>" in text
    assert '<img class="sheet" src="sheet.png"' in text
    assert 'src="views/sds-seed0.png"' in text and 'src="views/vsd-seed1.png"' in text
    assert 'href="file:///nonexistent/threedgen-runs/sds-seed0/mesh.glb"' in text
    assert "300 steps per run" in text
    assert "<th>IoU</th>" in text and "<th>Janus view rate</th>" in text and "<th>Janus (prior)</th>" in text
    assert "0.905 &#177; 0.007" in text  # the mean and sample std of IoU over sds's seeds
    assert "http" not in text  # nothing from outside the folder

    record = _record(tmp_path / "notruth", truth=False, budget={"seconds": 60.0, "steps": 600})
    text = write_html(record, tmp_path / "notruth").read_text()
    assert "60 s of training per run (at most 600 steps)" in text
    for _, title, _ in COLUMNS[3:10]:
        assert f"<th>{title.replace('°', '&#176;')}</th>" not in text
    assert "<th>wall s</th>" in text and "<th>Janus (prior)</th>" in text

    for entry in record["summary"]:
        entry["stats"]["janus_score_prior"] = {"mean": None, "std": None, "n": 0}
    assert "Janus (prior)" not in write_html(record, tmp_path / "notruth").read_text()


@pytest.mark.parametrize("stat, digits, text", [
    ({"mean": 0.93123, "std": 0.0121, "n": 3}, 3, "0.931 ± 0.012"),
    ({"mean": 0.93123, "std": 0.0, "n": 1}, 3, "0.931"),
    ({"mean": 812.4, "std": 3.6, "n": 2}, 0, "812 ± 4"),
    ({"mean": None, "std": None, "n": 0}, 2, "—"),
    ({"mean": 1.0, "std": 0.0, "n": 0}, 2, "—"),
    (None, 2, "—"),
    ({}, 2, "—"),
])
def test_format_stat(stat, digits, text):
    assert format_stat(stat, digits) == text


def test_columns():
    assert [key for key, _, _ in COLUMNS] == [
        "wall_seconds", "steps_per_second", "peak_memory_mb", "mask_iou", "psnr", "chamfer", "normal_error_deg",
        "texture_color_error", "janus", "janus_view_rate", "janus_score_prior"]
    assert all(isinstance(title, str) and isinstance(digits, int) for _, title, digits in COLUMNS)
