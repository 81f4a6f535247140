"""The picture and the page of a ``threedgen compare`` folder, made from its record (``compare.json``).

``sheet.png`` (Pillow only) has a title line (prompt, representation, prior, budget, seeds) and then one
row per guidance method, in the record's ``methods`` order: the method's name; the view strip of its
first succeeded seed (the views at ``view_azimuths``, side by side); the training-loss curves of all
its seeds overlaid, one colour per seed; and its numbers over the seeds (mean ± sample std for each
column of :data:`COLUMNS` that applies). Failed runs are named in red under the row; a method whose
runs all failed shows its error where the strip would be.

``report.html`` is one self-contained file that opens from disk (inline CSS, no script, no external
resource): the settings and the budget in words, the sheet, a summary table (one row per method, with
the failures and their errors), a table of every run (status, steps, values, error, links to its
mesh and run folder) and the view strips of every run. All text from the record is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from threedgen.rundir import atomic_path, atomic_write_text

SHEET = "sheet.png"
REPORT = "report.html"

# (stats key, column title, digits), in table order.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("wall_seconds", "wall s", 1),
    ("steps_per_second", "steps/s", 2),
    ("peak_memory_mb", "peak MB", 0),
    ("mask_iou", "IoU", 3),
    ("psnr", "PSNR dB", 2),
    ("chamfer", "Chamfer", 4),
    ("normal_error_deg", "normal err °", 1),
    ("texture_color_error", "colour err", 3),
    ("janus", "Janus (truth)", 2),
    ("janus_view_rate", "Janus view rate", 2),
    ("janus_score_prior", "Janus (prior)", 2),
)
_ALWAYS = ("wall_seconds", "steps_per_second", "peak_memory_mb")
_TRUTH = ("mask_iou", "psnr", "chamfer", "normal_error_deg", "texture_color_error", "janus", "janus_view_rate")
_PRIOR = ("janus_score_prior",)

_FAILED = ("failed", "cancelled", "interrupted")
_PENDING = ("queued", "running")
_DASH = "—"

# ---- numbers ------------------------------------------------------------------------------------


def format_stat(stat: dict | None, digits: int) -> str:
    """``"0.931 ± 0.012"``; ``"0.931"`` when one seed has the value; ``"—"`` when none has."""
    if not stat:
        return _DASH
    mean, n = stat.get("mean"), stat.get("n")
    if mean is None or n == 0:
        return _DASH
    std = stat.get("std")
    if n == 1 or std is None:
        return f"{float(mean):.{digits}f}"
    return f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"


def _format_value(value, digits: int) -> str:
    """One run's value: a number to ``digits``, a flag as yes/no, ``"—"`` when missing."""
    if value is None:
        return _DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{float(value):.{digits}f}"
    return str(value)


def _shown_columns(record: dict) -> list[tuple[str, str, int]]:
    """The COLUMNS that apply: always the cost ones, the truth ones in a world with truth, the prior's
    Janus score when some method has it."""
    keys = set(_ALWAYS)
    if record.get("truth"):
        keys.update(_TRUTH)
    for entry in record.get("summary") or []:
        stat = (entry.get("stats") or {}).get("janus_score_prior")
        if stat and stat.get("n"):
            keys.update(_PRIOR)
    return [column for column in COLUMNS if column[0] in keys]


def _budget_words(budget: dict | None) -> str:
    """``"300 steps per run"`` or ``"60 s of training per run (at most 600 steps)"``."""
    budget = budget or {}
    seconds, steps = budget.get("seconds"), budget.get("steps")
    if seconds:
        words = f"{float(seconds):g} s of training per run"
        return words + (f" (at most {steps} steps)" if steps else "")
    if steps:
        return f"{steps} steps per run"
    return "no budget recorded"


def _seed_list(record: dict) -> str:
    return ", ".join(str(seed) for seed in record.get("seeds") or [])


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ---- the record, read forgivingly ------------------------------------------------------------------


def _methods(record: dict) -> list[str]:
    """The methods in row order: ``methods``, then any method that only the runs name."""
    methods = list(record.get("methods") or [])
    for run in record.get("runs") or []:
        if run.get("method") not in methods:
            methods.append(run.get("method"))
    return methods


def _runs_of(record: dict, method: str) -> list[dict]:
    """The method's runs in seed order (the record's ``seeds`` order, unknown seeds last)."""
    seeds = list(record.get("seeds") or [])
    runs = [run for run in record.get("runs") or [] if run.get("method") == method]
    return sorted(runs, key=lambda run: (seeds.index(run.get("seed")) if run.get("seed") in seeds else len(seeds),
                                         str(run.get("seed"))))


def _summary_of(record: dict, method: str) -> dict:
    """The method's summary entry; one counted from its runs when the record has none."""
    for entry in record.get("summary") or []:
        if entry.get("method") == method:
            return entry
    runs = _runs_of(record, method)
    failed = [run for run in runs if run.get("status") in _FAILED]
    return {"method": method, "runs": len(runs),
            "succeeded": sum(run.get("status") == "succeeded" for run in runs), "failed": len(failed),
            "errors": [f"seed {run.get('seed')}: {run.get('error') or run.get('status')}" for run in failed],
            "stats": {}}


def _errors_of(record: dict, method: str, summary: dict) -> list[str]:
    errors = [_one_line(error) for error in summary.get("errors") or [] if error]
    if not errors:
        errors = [f"seed {run.get('seed')}: {_one_line(run.get('error') or run.get('status'))}"
                  for run in _runs_of(record, method) if run.get("status") in _FAILED]
    return errors


def _counts(record: dict, method: str, summary: dict) -> tuple[int, int, int, int]:
    """(runs, succeeded, failed, pending) of a method."""
    runs = _runs_of(record, method)
    total = int(summary.get("runs") if summary.get("runs") is not None else len(runs))
    succeeded = int(summary.get("succeeded") or 0)
    failed = int(summary.get("failed") or 0)
    pending = sum(run.get("status") in _PENDING for run in runs)
    return total, succeeded, failed, pending


# ---- the sheet ----------------------------------------------------------------------------------

_STRIP_H = 96            # every view strip is scaled to this height
_PLOT_W, _PLOT_H = 220, 96
_PAD, _GAP = 14, 16
_LINE = 16               # line height of the 12 px text
_RED = (200, 0, 0)
_GREY_TEXT = (110, 110, 110)
_BOX_GREY = (215, 215, 215)
_FRAME = (190, 190, 190)
_SEED_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0))  # no red: red is failure
_BITMAP_SAFE = str.maketrans({"—": "-", "–": "-", "±": "+/-", "°": " deg", "…": "..."})
_GLYPH_SAFE = str.maketrans({"—": "-", "–": "-"})  # the default FreeType font (Aileron) lacks the dashes


@lru_cache(maxsize=None)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _safe(text: str, font) -> str:
    """Text the font can draw: no dashes it lacks; Latin-1 only for the old bitmap font."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return str(text).translate(_GLYPH_SAFE)
    return str(text).translate(_BITMAP_SAFE).encode("latin-1", "replace").decode("latin-1")


def _width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(_safe(text, font), font=font)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    text = _one_line(text)
    if _width(draw, text, font) <= width:
        return text
    while text and _width(draw, text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float, lines: int) -> list[str]:
    """``text`` broken into at most ``lines`` lines of ``width`` pixels (the last one cut)."""
    out, words = [], _one_line(text).split(" ")
    while words and len(out) < lines:
        line = words.pop(0)
        while words and _width(draw, line + " " + words[0], font) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words:
        out[-1] = out[-1] + " " + " ".join(words)
    return [_fit(draw, line, font, width) for line in out]


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill=(0, 0, 0)) -> None:
    draw.text(xy, _safe(text, font), font=font, fill=fill)


def _load_strip(folder: Path, views, max_width: int) -> Image.Image | None:
    """The strip at ``folder / views`` scaled to the strip height (and at most ``max_width``), or
    None when there is none or it cannot be read."""
    if not views:
        return None
    try:
        with Image.open(folder / views) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                flat = Image.new("RGB", image.size, (255, 255, 255))
                flat.paste(image, mask=image.getchannel("A"))
                image = flat
            else:
                image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if image.width < 1 or image.height < 1:
        return None
    scale = min(_STRIP_H / image.height, max_width / image.width)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, getattr(Image, "Resampling", Image).LANCZOS)


def _first_strip_run(runs: list[dict]) -> dict | None:
    """The first succeeded seed's run that has a view strip (else the first succeeded one)."""
    succeeded = [run for run in runs if run.get("status") == "succeeded"]
    for run in succeeded:
        if run.get("views"):
            return run
    return succeeded[0] if succeeded else None


def _curve_points(curve) -> list[tuple[float, float]]:
    points = []
    for point in curve or []:
        try:
            step, loss = float(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(step) and math.isfinite(loss):
            points.append((step, loss))
    return points


def _plot_curves(draw: ImageDraw.ImageDraw, x0: int, y0: int, runs: list[dict], seeds: list) -> None:
    """The loss curves of ``runs`` overlaid in the plot box at (x0, y0), one colour per seed."""
    small = _font(10)
    draw.rectangle((x0, y0, x0 + _PLOT_W - 1, y0 + _PLOT_H - 1), fill=(250, 250, 250), outline=_FRAME)
    curves = [(run, _curve_points(run.get("curve"))) for run in runs]
    curves = [(run, points) for run, points in curves if points]
    if not curves:
        label, font = "no curve", _font(12)
        _text(draw, (x0 + (_PLOT_W - _width(draw, label, font)) / 2, y0 + _PLOT_H / 2 - 7), label, font, _GREY_TEXT)
        return
    steps = [step for _, points in curves for step, _ in points]
    losses = [loss for _, points in curves for _, loss in points]
    s_lo, s_hi, l_lo, l_hi = min(steps), max(steps), min(losses), max(losses)
    if s_hi == s_lo:
        s_lo, s_hi = s_lo - 0.5, s_hi + 0.5
    if l_hi == l_lo:
        pad = abs(l_hi) * 0.05 or 0.5
        l_lo, l_hi = l_lo - pad, l_hi + pad
    left, right, top, bottom = x0 + 4, x0 + _PLOT_W - 5, y0 + 14, y0 + _PLOT_H - 14

    def to_xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - s_lo) / (s_hi - s_lo) * (right - left),
                bottom - (loss - l_lo) / (l_hi - l_lo) * (bottom - top))

    for run, points in curves:
        seed = run.get("seed")
        index = seeds.index(seed) if seed in seeds else len(seeds)
        colour = _SEED_COLOURS[index % len(_SEED_COLOURS)]
        xy = [to_xy(step, loss) for step, loss in points]
        if len(xy) == 1:
            x, y = xy[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        else:
            draw.line(xy, fill=colour, width=1)
    _text(draw, (x0 + 3, y0 + 1), f"{l_hi:.4g}", small, _GREY_TEXT)
    _text(draw, (x0 + 3, y0 + _PLOT_H - 13), f"{l_lo:.4g}", small, _GREY_TEXT)
    label = f"step {max(steps):g}"
    _text(draw, (x0 + _PLOT_W - 4 - _width(draw, label, small), y0 + _PLOT_H - 13), label, small, _GREY_TEXT)


def _number_lines(summary: dict, columns) -> list[tuple[str, str]]:
    stats = summary.get("stats") or {}
    return [(title, format_stat(stats.get(key), digits)) for key, title, digits in columns]


def write_sheet(record: dict, folder: Path) -> Path:
    """Draw ``folder/sheet.png``: a title line, then one row per method (name, the view strip of its
    first succeeded seed, its seeds' loss curves, its numbers, its failures in red). Returns the path."""
    folder = Path(folder)
    title_font, head_font, name_font, font = _font(18), _font(13), _font(15), _font(12)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    methods = _methods(record)
    seeds = list(record.get("seeds") or [])
    columns = _shown_columns(record)
    n_views = len(record.get("view_azimuths") or []) or 6
    max_strip_w = 12 * _STRIP_H

    rows = []
    for method in methods:
        runs = _runs_of(record, method)
        summary = _summary_of(record, method)
        strip_run = _first_strip_run(runs)
        strip = _load_strip(folder, strip_run.get("views"), max_strip_w) if strip_run else None
        rows.append({"method": method, "runs": runs, "summary": summary, "strip_run": strip_run, "strip": strip,
                     "numbers": _number_lines(summary, columns), "counts": _counts(record, method, summary),
                     "errors": _errors_of(record, method, summary)})

    name_w = max([90] + [int(_width(scratch, str(row["method"]), name_font)) + 4 for row in rows])
    strip_w = max([n_views * _STRIP_H] + [row["strip"].width for row in rows if row["strip"] is not None])
    half = (len(columns) + 1) // 2
    number_cols = [columns[:half], columns[half:]] if len(columns) > 6 else [columns]

    def col_width(part: int) -> int:
        lo = sum(len(c) for c in number_cols[:part])
        titles = max(_width(scratch, title + "  ", font) for _, title, _ in number_cols[part])
        values = max(_width(scratch, value, font) for row in rows or [{"numbers": _number_lines({}, columns)}]
                     for _, value in row["numbers"][lo:lo + len(number_cols[part])])
        return int(titles + values) + 16

    number_ws = [col_width(part) for part in range(len(number_cols))]
    x_name = _PAD
    x_strip = x_name + name_w + _GAP
    x_plot = x_strip + strip_w + _GAP
    x_numbers = x_plot + _PLOT_W + _GAP
    width = x_numbers + sum(number_ws) + _PAD

    number_h = max(len(part) for part in number_cols) * _LINE
    body_h = max(_STRIP_H, number_h)
    for row in rows:
        total, succeeded, failed, pending = row["counts"]
        row["status_lines"] = int(failed > 0) + int(pending > 0)
        row["height"] = 8 + body_h + row["status_lines"] * _LINE + 8
    title_h = _PAD + 24 + 2 * _LINE + 6
    header_h = _LINE + 4
    height = title_h + header_h + sum(row["height"] for row in rows) + _PAD
    if not rows:
        height += _LINE * 2

    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    text_w = width - 2 * _PAD

    y = _PAD
    _text(draw, (_PAD, y), _fit(draw, record.get("prompt") or "(no prompt)", title_font, text_w), title_font)
    y += 24
    negative = record.get("negative_prompt")
    settings = (f"{record.get('representation') or '?'} · prior {record.get('prior') or '?'} · "
                f"{_budget_words(record.get('budget'))} · seeds {_seed_list(record) or '-'}")
    if record.get("state") and record.get("state") != "finished":
        settings += f" · {record.get('state')} (partial)"
    _text(draw, (_PAD, y), _fit(draw, settings, head_font, text_w), head_font, (40, 40, 40))
    y += _LINE
    extra = f"negative prompt: {negative}" if negative else ""
    if record.get("compare"):
        extra = (extra + " · " if extra else "") + f"compare {record.get('compare')}"
    _text(draw, (_PAD, y), _fit(draw, extra, head_font, text_w), head_font, _GREY_TEXT)
    y = title_h

    # Column headings: the azimuth of each view, the seed colours of the curves, the numbers' note.
    _text(draw, (x_name, y), "method", font, _GREY_TEXT)
    azimuths = record.get("view_azimuths") or []
    if azimuths and strip_w == len(azimuths) * _STRIP_H:
        for i, azimuth in enumerate(azimuths):
            label = f"{float(azimuth):g}°"
            _text(draw, (x_strip + i * _STRIP_H + (_STRIP_H - _width(draw, label, font)) / 2, y), label, font,
                  _GREY_TEXT)
    else:
        _text(draw, (x_strip, y), "views", font, _GREY_TEXT)
    x = x_plot
    _text(draw, (x, y), "loss:", font, _GREY_TEXT)
    x += _width(draw, "loss: ", font)
    for i, seed in enumerate(seeds):
        label = f"seed {seed}"
        if x + _width(draw, label, font) > x_plot + _PLOT_W + _GAP:
            break
        _text(draw, (x, y), label, font, _SEED_COLOURS[i % len(_SEED_COLOURS)])
        x += _width(draw, label + "  ", font)
    _text(draw, (x_numbers, y), "mean ± std over seeds", font, _GREY_TEXT)
    y += header_h
    draw.line((_PAD, y - 2, width - _PAD, y - 2), fill=_FRAME)

    if not rows:
        _text(draw, (_PAD, y + 8), "no methods in this comparison", font, _GREY_TEXT)

    for row in rows:
        top = y + 8
        total, succeeded, failed, pending = row["counts"]
        _text(draw, (x_name, top), _fit(draw, str(row["method"]), name_font, name_w), name_font)
        _text(draw, (x_name, top + 22), f"{succeeded} of {total} ok", font, _GREY_TEXT)

        box = (x_strip, top, x_strip + n_views * _STRIP_H - 1, top + _STRIP_H - 1)
        if total and failed >= total and succeeded == 0:
            draw.rectangle(box, outline=_RED)
            lines = ["all runs failed"] + _wrap(draw, "; ".join(row["errors"]) or "no error recorded", font,
                                                box[2] - box[0] - 12, 4)
            for i, line in enumerate(lines):
                _text(draw, (x_strip + 6, top + 6 + i * _LINE), line, font, _RED)
        elif row["strip"] is not None:
            sheet.paste(row["strip"], (x_strip, top))
        else:
            draw.rectangle(box, fill=_BOX_GREY)
            if row["strip_run"] is None:
                label = "no finished run" if pending else "no views"
            elif row["strip_run"].get("views"):
                label = f"view strip missing: {row['strip_run'].get('views')}"
            else:
                label = "no views"
            _text(draw, (x_strip + 6, top + _STRIP_H / 2 - 7), _fit(draw, label, font, box[2] - box[0] - 12), font,
                  _GREY_TEXT)

        _plot_curves(draw, x_plot, top, row["runs"], seeds)

        x = x_numbers
        lo = 0
        for part, cols in enumerate(number_cols):
            value_x = x + max(_width(draw, title + "  ", font) for _, title, _ in cols)
            for i, (title, value) in enumerate(row["numbers"][lo:lo + len(cols)]):
                _text(draw, (x, top + i * _LINE), title, font, _GREY_TEXT)
                _text(draw, (value_x, top + i * _LINE), value, font)
            lo += len(cols)
            x += number_ws[part]

        status_y = top + body_h + 2
        if failed:
            words = f"{failed} of {total} failed: " + ("; ".join(row["errors"]) or "no error recorded")
            _text(draw, (x_name, status_y), _fit(draw, words, font, text_w), font, _RED)
            status_y += _LINE
        if pending:
            _text(draw, (x_name, status_y), f"{pending} of {total} not finished yet", font, _GREY_TEXT)
        y += row["height"]
        draw.line((_PAD, y - 1, width - _PAD, y - 1), fill=(230, 230, 230))

    path = folder / SHEET
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


# ---- the page -----------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; font-size: 1.2em; }
h3 { font-size: 1em; margin: 1em 0 0.3em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
table.settings th { background: none; border: none; color: #666; font-weight: normal; padding-right: 12px; }
table.settings td { border: none; }
.failed, .error { color: #b00; }
.pending { color: #888; }
.succeeded { color: #070; }
img.sheet { max-width: 100%; border: 1px solid #ddd; }
figure { display: inline-block; margin: 0 12px 8px 0; }
figcaption { font-size: 0.85em; color: #555; }
ul.errors { margin: 0; padding-left: 1.1em; }
code { font-size: 0.9em; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _href(path: str) -> str:
    """A link to a file: a file:// URI for an absolute path, the path itself (quoted) otherwise."""
    target = Path(path)
    if target.is_absolute():
        return target.as_uri()
    return quote(str(path).replace("\\", "/"), safe="/")


def _link(path, label: str | None = None) -> str:
    if not path or str(path) == "None":
        return _DASH
    return f'<a href="{_e(_href(str(path)))}">{_e(label if label is not None else path)}</a>'


def _status_class(status) -> str:
    if status in _FAILED:
        return "failed"
    if status in _PENDING:
        return "pending"
    return "succeeded" if status == "succeeded" else ""


def _settings_table(record: dict) -> str:
    azimuths = ", ".join(f"{float(a):g}°" for a in record.get("view_azimuths") or [])
    rows = [("compare", record.get("compare")), ("negative prompt", record.get("negative_prompt") or None),
            ("representation", record.get("representation")), ("prior", record.get("prior")),
            ("methods", ", ".join(str(m) for m in _methods(record))), ("seeds", _seed_list(record)),
            ("budget", _budget_words(record.get("budget"))), ("views at azimuths", azimuths or None),
            ("truth metrics", "yes (shapes world)" if record.get("truth") else "no"),
            ("state", record.get("state")), ("created", record.get("created")), ("written", record.get("written"))]
    cells = "".join(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>\n" for name, value in rows
                    if value not in (None, ""))
    return f'<table class="settings">\n{cells}</table>'


def _summary_table(record: dict, columns) -> str:
    head = ("<tr><th>method</th><th>runs</th><th>succeeded</th><th>failed</th>"
            + "".join(f"<th>{_e(title)}</th>" for _, title, _ in columns) + "</tr>\n")
    body = []
    for method in _methods(record):
        summary = _summary_of(record, method)
        total, succeeded, failed, pending = _counts(record, method, summary)
        errors = _errors_of(record, method, summary)
        failed_cell = f'<span class="failed">{failed}</span>' if failed else "0"
        if errors and failed:
            failed_cell += '<ul class="errors">' + "".join(f'<li class="error">{_e(error)}</li>' for error in errors) \
                + "</ul>"
        if pending:
            failed_cell += f' <span class="pending">({pending} not finished)</span>'
        stats = summary.get("stats") or {}
        cells = "".join(f'<td class="num">{_e(format_stat(stats.get(key), digits))}</td>'
                        for key, _, digits in columns)
        body.append(f"<tr><th>{_e(method)}</th><td class=\"num\">{total}</td><td class=\"num\">{succeeded}</td>"
                    f"<td>{failed_cell}</td>{cells}</tr>\n")
    return f"<table>\n{head}{''.join(body)}</table>"


def _runs_table(record: dict, columns) -> str:
    head = ("<tr><th>method</th><th>seed</th><th>status</th><th>steps</th>"
            + "".join(f"<th>{_e(title)}</th>" for _, title, _ in columns)
            + "<th>error</th><th>mesh</th><th>run folder</th><th>job</th></tr>\n")
    body = []
    for method in _methods(record):
        for run in _runs_of(record, method):
            values = run.get("values") or {}
            step, max_steps = run.get("step"), run.get("max_steps")
            steps = f"{_DASH if step is None else step} / {_DASH if max_steps is None else max_steps}"
            cells = "".join(f'<td class="num">{_e(_format_value(values.get(key), digits))}</td>'
                            for key, _, digits in columns)
            error = f'<span class="error">{_e(_one_line(run["error"]))}</span>' if run.get("error") else ""
            glb = run.get("glb")
            mesh = _link(glb, Path(str(glb)).name) if glb else _DASH
            status = run.get("status") or "?"
            body.append(f"<tr><th>{_e(method)}</th><td class=\"num\">{_e(run.get('seed'))}</td>"
                        f"<td class=\"{_status_class(status)}\">{_e(status)}</td><td class=\"num\">{_e(steps)}</td>"
                        f"{cells}<td>{error}</td><td>{mesh}</td><td>{_link(run.get('run_dir'))}</td>"
                        f"<td><code>{_e(run.get('job') or _DASH)}</code></td></tr>\n")
    return f"<table>\n{head}{''.join(body)}</table>"


def _views_section(record: dict) -> str:
    parts = []
    for method in _methods(record):
        figures = []
        for run in _runs_of(record, method):
            caption = f"seed {run.get('seed')} · {run.get('status') or '?'}"
            if run.get("views"):
                src = _e(_href(str(run["views"])))
                figures.append(f'<figure><img src="{src}" alt="{_e(method)} seed {_e(run.get("seed"))} views">'
                               f"<figcaption>{_e(caption)}</figcaption></figure>")
            else:
                figures.append(f'<figure><figcaption class="pending">{_e(caption)}: no views</figcaption></figure>')
        parts.append(f"<h3>{_e(method)}</h3>\n" + ("\n".join(figures) or '<p class="pending">no runs</p>'))
    return "\n".join(parts)


def write_html(record: dict, folder: Path) -> Path:
    """Write ``folder/report.html``: settings, the sheet, the summary and per-run tables and the view
    strips, in one file with no script and no external resource. Returns the path."""
    folder = Path(folder)
    columns = _shown_columns(record)
    prompt = record.get("prompt") or "(no prompt)"
    state = record.get("state")
    note = ('<p class="pending">This comparison is still running: the numbers cover the runs finished so far.</p>'
            if state and state != "finished" else "")
    azimuths = ", ".join(f"{float(a):g}°" for a in record.get("view_azimuths") or [])
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>threedgen compare: {_e(prompt)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(prompt)}</h1>
<p>Guidance methods compared on one prompt: {_e(_budget_words(record.get("budget")))}, seeds {_e(_seed_list(record))}.
</p>
{note}
{_settings_table(record)}
<h2>Sheet</h2>
<p><img class="sheet" src="{SHEET}" alt="comparison sheet: views, loss curves and numbers of every method"></p>
<h2>Summary</h2>
<p>Mean ± sample standard deviation over the seeds that have the value.</p>
{_summary_table(record, columns)}
<h2>Runs</h2>
{_runs_table(record, columns)}
<h2>Views</h2>
<p>Each strip shows the views at azimuths {_e(azimuths or "(not recorded)")}.</p>
{_views_section(record)}
</body>
</html>
"""
    path = folder / REPORT
    # Pure ASCII (other characters as references): the page reads the same whatever the locale's encoding.
    atomic_write_text(path, page.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path
