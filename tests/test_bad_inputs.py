"""Every row of the bad-input and fault tables (docs/reliability.md).

Two parametrised tests, ``test_input`` and ``test_fault``, one case per table row, with the row's
id as the case name; the few rows that need a web server or a killed process name their test in
the table's last column. ``test_every_row_has_a_test`` keeps the table and this file in step.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from threedgen.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"

# Tiny, fast runs: a 16x16 render of a two-shape world, small exports, no scoring.
TINY = ["prior.shapes=[cube,torus]", "render.resolution=16", "render.coarse_resolution=0",
        "representation.num_samples=16", "export.resolution=32", "export.video_frames=4",
        "export.video_resolution=32", "export.texture=vertex", "export.evaluate=false", "preview_every=1000"]


def cli(capsys, argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def cli_error(capsys, argv, code: int = 2) -> str:
    """The one line a refused command prints (exit ``code``)."""
    got, _, err = cli(capsys, argv)
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("threedgen: error: "), err
    return lines[0]


def tiny_cfg(prompt="a red cube", steps=12, extra=()):
    from threedgen.config import build_config, parse_overrides

    return build_config(overrides=parse_overrides([*TINY, *extra]), flags={"prompt": prompt, "steps": steps})


def tiny_run(out, prompt="a red cube", steps=12, extra=(), callbacks=()):
    from threedgen.runner import run

    return run(tiny_cfg(prompt, steps, extra), out=out, progress_bar=False, callbacks=callbacks)


def status_of(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def only_run_dir(out: Path) -> Path:
    (run_dir,) = [p for p in Path(out).iterdir() if p.is_dir()]
    return run_dir


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.is_file()]


class NaNSteps:
    """Makes the prior's noise prediction NaN on the listed calls (all calls from ``start`` on
    when ``forever``), through ``build_prior``: the run builds its prior as usual."""

    def __init__(self, monkeypatch, calls=(), forever_from=None):
        import threedgen.guidance.priors as priors

        real = priors.build_prior
        self.calls = 0

        def build(cfg, device):
            prior = real(cfg, device)
            predict = prior.predict_noise

            def flaky(*args, **kwargs):
                self.calls += 1
                eps = predict(*args, **kwargs)
                bad = self.calls in calls or forever_from is not None and self.calls >= forever_from
                return eps * float("nan") if bad else eps

            prior.predict_noise = flaky
            return prior

        monkeypatch.setattr(priors, "build_prior", build)


@contextmanager
def disk_full_on(monkeypatch, module, filename: str):
    """``module``'s atomic writes of ``filename`` run out of space: half the bytes land in the
    temporary file, then ENOSPC (as a full disk does)."""
    real = module.atomic_path

    @contextmanager
    def flaky(path):
        with real(path) as tmp:
            yield tmp
            if Path(path).name == filename:
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(module, "atomic_path", flaky)
    yield


# ==== Input ===================================================================================

def input_empty_prompt(tmp_path, capsys, **_):
    for prompt in ("", "   ", "\t\n "):
        line = cli_error(capsys, ["run", "--prompt", prompt, "--out", tmp_path / "out"])
        assert "prompt is empty" in line
    assert not (tmp_path / "out").exists()


def input_long_prompt(tmp_path, capsys, **_):
    prompt = ("a red cube " * 1000)[:10_000]
    line = cli_error(capsys, ["run", "--prompt", prompt, "--out", tmp_path / "out"])
    assert "prompt is 10000 characters; the limit is 1000" in line
    assert not (tmp_path / "out").exists()
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "1000 characters" in readme  # the documented cap


NASTY = ("a red cube 🎲 مكعب أحمر ../../etc/passwd /abs/path C:\\x ~ a/b ${oc.env:THREEDGEN_SECRET} "
         "<script>alert(1)</script> <img src=x onerror=alert(2)>\x00\x07\x1b[31m")


@pytest.fixture(scope="module")
def nasty_run(tmp_path_factory, tiny_sd_dir):
    """One real run whose prompt and negative prompt carry every hostile kind of text, on the tests'
    tiny Stable Diffusion (the shapes prior takes only its vocabulary; a diffusers prior takes any text)."""
    root = tmp_path_factory.mktemp("nasty")
    cwd = root / "cwd"
    cwd.mkdir()
    os.environ["THREEDGEN_SECRET"] = "s3cr3t-value"
    old = os.getcwd()
    os.chdir(cwd)
    try:
        before = sorted(str(p) for p in root.rglob("*"))
        code = main(["run", "--prior", str(tiny_sd_dir), "--steps", "2", "--prompt", NASTY, "--negative-prompt",
                     "${oc.env:THREEDGEN_SECRET} ../x <b>", "--out", str(root / "out"), "--no-progress",
                     "export.resolution=32", "export.video_frames=2", "export.video_resolution=32",
                     "export.texture=vertex"])
        after = sorted(str(p) for p in root.rglob("*") if not str(p).startswith(str(root / "out")))
    finally:
        os.chdir(old)
        os.environ.pop("THREEDGEN_SECRET", None)
    assert code == 0
    return {"root": root, "run_dir": only_run_dir(root / "out"), "before": before, "after": after}


def input_unicode_and_controls(nasty_run, **_):
    run_dir = nasty_run["run_dir"]
    assert status_of(run_dir)["status"] == "succeeded"
    assert re.fullmatch(r"[a-z0-9-]+-\d{8}-\d{6}(-\d+)?", run_dir.name), run_dir.name
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert "🎲 مكعب أحمر" in cfg["prompt"]
    assert not any(ch in cfg["prompt"] for ch in "\x00\x07\x1b")  # controls stripped
    from threedgen.webui.app import _escape_md

    shown = _escape_md(cfg["prompt"])
    assert "🎲" in shown and "<" not in shown


def input_path_like_prompt(nasty_run, **_):
    root, run_dir = nasty_run["root"], nasty_run["run_dir"]
    assert run_dir.parent == root / "out"
    # Nothing appeared outside the outputs folder (the working directory included).
    assert nasty_run["after"] == [p for p in nasty_run["before"] if not p.startswith(str(root / "out"))]
    assert not Path("/abs/path").exists()
    for path in (root / "out").rglob("*"):
        assert path.resolve().is_relative_to((root / "out").resolve())


def input_interpolation(nasty_run, capsys, tmp_path, **_):
    run_dir = nasty_run["run_dir"]
    text = (run_dir / "config.yaml").read_text()
    assert "${oc.env:THREEDGEN_SECRET}" in text
    for path in run_dir.rglob("*"):
        if path.suffix in (".yaml", ".json", ".csv", ".txt"):
            assert "s3cr3t-value" not in path.read_text(), path
    # In an override value of a number field: refused as a value, not resolved.
    os.environ["THREEDGEN_SECRET"] = "17"
    try:
        line = cli_error(capsys, ["run", "--prompt", "a red cube", "--out", tmp_path / "o",
                                  "guidance.guidance_scale=${oc.env:THREEDGEN_SECRET}"])
    finally:
        os.environ.pop("THREEDGEN_SECRET", None)
    assert "guidance.guidance_scale" in line and "17" not in line.split("got")[-1]


def input_markup(nasty_run, tmp_path, **_):
    from threedgen.webui.app import Settings, WebUI, _escape_md

    shown = _escape_md("<script>alert(1)</script> <img src=x onerror=alert(2)>")
    assert "<" not in shown and ">" not in shown and "onerror" in shown
    ui = WebUI(Settings(outputs=tmp_path / "outputs", state=tmp_path / "state"))
    # A job of a diffusers prior (which takes any text) with markup in its prompt.
    ui.store.submit({"prompt": "a red cube <script>alert(1)</script>", "negative_prompt": "<img src=x onerror=alert(2)>",
                     "guidance": "sds", "representation": "nerf", "prior": "stable-diffusion", "steps": 10, "seed": 0}, 10)
    row = ui.table()[0]
    assert row[1] == "a red cube <script>alert(1)</script>"  # kept as text in the table ...
    import gradio as gr

    demo = ui.blocks()
    tables = [b for b in demo.blocks.values() if isinstance(b, gr.Dataframe)]
    assert tables and all(set(t.datatype if isinstance(t.datatype, list) else [t.datatype]) == {"str"}
                          for t in tables)  # ... which the page shows as plain text, never as HTML
    # No HTML report is written: every text file of a run holds the prompt only as YAML/JSON data.
    assert not list(nasty_run["run_dir"].rglob("*.htm*"))


STEP_VALUES = ["-1", "0", "1e12", "1.5", "nan", "abc"]
NON_ASCII_DIGITS = ["\u00b2", "\u0663", "\u0666\u0664"]  # a superscript 2, an Arabic-Indic 3 and 64


def input_steps(tmp_path, capsys, **_):
    from threedgen.errors import UserError
    from threedgen.webui.app import Settings, validate

    for value in STEP_VALUES:
        line = cli_error(capsys, ["run", "--prompt", "a red cube", "--steps", value, "--out", tmp_path / "o"])
        assert "--steps must be an integer from 1 to 1000000" in line, line
        line = cli_error(capsys, ["run", "--prompt", "a red cube", f"steps={value}", "--out", tmp_path / "o"])
        assert "steps must be an integer from 1 to 1000000" in line, line
    # int() reads other scripts' digits ("\u0663" as 3) and str.isdigit() superscripts: neither is a number here.
    for value in NON_ASCII_DIGITS:
        line = cli_error(capsys, ["run", "--prompt", "a red cube", "--steps", value, "--out", tmp_path / "o"])
        assert f"--steps must be an integer from 1 to 1000000; got {value!r}" in line, line
        line = cli_error(capsys, ["run", "--prompt", "a red cube", f"steps={value}", "--out", tmp_path / "o"])
        assert f"override steps={value}: write numbers with the digits 0-9" in line, line
    line = cli_error(capsys, ["run", "--prompt", "a red cube", "guidance.guidance_scale=\u0667.5", "--out", tmp_path / "o"])
    assert "write numbers with the digits 0-9" in line, line
    settings = Settings(outputs=tmp_path / "w", state=tmp_path / "s", max_steps=20000)
    # "\u00b2" (superscript 2) passed str.isdigit and then leaked int()'s own error; other scripts'
    # digits ("\u0663", Arabic-Indic 3) were taken as numbers.
    for value in (-1, 0, 1e12, 1.5, float("nan"), "abc", "1.5", True, "\u00b2", "\u0663"):
        with pytest.raises(UserError, match="steps must be an integer from 1 to 20000"):
            validate(settings, "a red cube", "", "sds", "nerf", "shapes", value, "0", "")
    for value in ("\u00b2", "\u0666\u0664", "64.0", "0x40"):
        with pytest.raises(UserError, match="resolution must be one of"):
            validate(settings, "a red cube", "", "sds", "nerf", "shapes", 10, "0", value)
    assert validate(settings, "a red cube", "", "sds", "nerf", "shapes", " 12 ", "0", "64")[0][0].steps == 12
    assert not (tmp_path / "o").exists()


def input_resolution(tmp_path, capsys, **_):
    for value in ("0", "1", "100000", "abc", "64.5"):
        line = cli_error(capsys, ["run", "--prompt", "a red cube", f"render.resolution={value}", "--out", tmp_path])
        assert "render.resolution must be an integer from 8 to 1024" in line, line
    line = cli_error(capsys, ["run", "--prompt", "a red cube", "export.video_resolution=8", "--out", tmp_path])
    assert "export.video_resolution must be an integer from 16 to 2048" in line
    # No multiple is needed: both renderers take any size in range (the prior resizes).
    from threedgen.cameras import Cameras
    from threedgen.config import build_config
    from threedgen.representations import REPRESENTATIONS

    cams = Cameras.from_angles([20.0], [30.0], 3.0, 40.0)
    for name in ("nerf", "gaussians"):
        rep_cfg = build_config("sds", name, flags={"prompt": "a red cube"}).representation
        out = REPRESENTATIONS[name].cls(rep_cfg, "cpu").render(cams, 33, 21)
        assert tuple(out.rgb.shape) == (1, 33, 21, 3), (name, out.rgb.shape)


def input_scale_and_seed(tmp_path, capsys, **_):
    for value in ("-1", "inf", "nan", "-inf"):
        line = cli_error(capsys, ["run", "--prompt", "a red cube", f"guidance.guidance_scale={value}", "--out", tmp_path])
        assert "guidance.guidance_scale must be a finite number >= 0" in line, line
    for value in ("-1", str(2 ** 32), "1e3", "x"):
        line = cli_error(capsys, ["run", "--prompt", "a red cube", "--seed", value, "--out", tmp_path])
        assert "--seed must be an integer from 0 to 4294967295" in line, line
        line = cli_error(capsys, ["run", "--prompt", "a red cube", f"seed={value}", "--out", tmp_path])
        assert "seed must be an integer from 0 to 4294967295" in line, line
    from threedgen.errors import UserError
    from threedgen.webui.app import parse_seeds

    with pytest.raises(UserError, match="from 0 to 4294967295"):
        parse_seeds(str(2 ** 32))


def input_unknown_names(tmp_path, capsys, **_):
    cases = [(["--guidance", "sdss"], "unknown guidance 'sdss'; valid: sds, "),
             (["--representation", "nerff"], "unknown representation 'nerff'; valid: nerf, nerf-sdf, "),
             (["--prior", "shape"], "unknown prior 'shape'; valid: shapes, "),
             (["render.resolutoin=64"], "unknown config key 'render.resolutoin'; nearest valid keys: render.resolution"),
             (["guidance.guidance_scal=5"], "nearest valid keys: guidance.guidance_scale")]
    for args, expected in cases:
        assert expected in cli_error(capsys, ["run", "--prompt", "a red cube", "--out", tmp_path, *args])
    # Names are looked up in fixed tables, never imported.
    before = set(sys.modules)
    for args in (["--guidance", "antigravity"], ["--representation", "this"], ["guidance.name=webbrowser"],
                 ["representation.name=os.path"]):
        cli_error(capsys, ["run", "--prompt", "a red cube", "--out", tmp_path, *args])
    assert not {"antigravity", "this", "webbrowser"} & (set(sys.modules) - before)


def input_missing_model(tmp_path, capsys, **_):
    line = cli_error(capsys, ["run", "--prompt", "a red cube", "--prior", tmp_path / "nope", "--out", tmp_path / "o"])
    assert "no such folder" in line
    (tmp_path / "not-diffusers").mkdir()
    (tmp_path / "not-diffusers" / "weights.bin").write_bytes(b"x")
    line = cli_error(capsys, ["run", "--prompt", "a red cube", "--prior", tmp_path / "not-diffusers", "--out",
                              tmp_path / "o"])
    assert "is not a diffusers model (no model_index.json)" in line
    assert not (tmp_path / "o").exists()
    # Offline with an empty cache: tests/test_diffusion_cli.py::test_hub_offline_with_an_empty_cache and
    # ::test_no_network_with_an_empty_cache_fails_fast (they need a fresh process and environment).


def input_vocabulary(tmp_path, capsys, **_):
    line = cli_error(capsys, ["run", "--prompt", "a purple dragon", "--prior", "shapes", "--out", tmp_path / "o"])
    assert "outside the shapes prior's vocabulary" in line
    for word in ("cube", "torus", "sphere"):
        assert word in line
    assert not (tmp_path / "o").exists()


def input_marker_colour(tmp_path, capsys, **_):
    for prompt in ("a magenta house", "the fuchsia head", "a magenta cube"):
        line = cli_error(capsys, ["run", "--prompt", prompt, "--prior", "shapes", "--out", tmp_path / "o"])
        assert "reserved for the front markers" in line and "red, orange" in line
    line = cli_error(capsys, ["run", "--prompt", "a red mug", "--negative-prompt", "magenta", "--out", tmp_path / "o"])
    assert "reserved for the front markers" in line
    assert not (tmp_path / "o").exists()


def input_front_bias(tmp_path, capsys, **_):
    base = ["run", "--prompt", "a red house", "--prior", "shapes", "--out", tmp_path / "o"]
    for value in ("0", "1", "-0.2", "1.5", "nan"):
        line = cli_error(capsys, base + ["prior.camera_kappa=0", f"prior.front_bias={value}"])
        assert "prior.front_bias" in line and "between 0 and 1" in line, line
    line = cli_error(capsys, base + ["prior.front_bias=0.8"])  # the default prior is camera-conditioned
    assert "prior.camera_kappa=0" in line and "no meaning" in line
    line = cli_error(capsys, base + ["prior.perp_neg=true"])
    assert "prior.perp_neg" in line and "prior.camera_kappa=0" in line
    assert not (tmp_path / "o").exists()


INPUT = {
    "empty-prompt": input_empty_prompt,
    "long-prompt": input_long_prompt,
    "unicode-and-controls": input_unicode_and_controls,
    "path-like-prompt": input_path_like_prompt,
    "interpolation": input_interpolation,
    "markup": input_markup,
    "steps": input_steps,
    "resolution": input_resolution,
    "scale-and-seed": input_scale_and_seed,
    "unknown-names": input_unknown_names,
    "missing-model": input_missing_model,
    "vocabulary": input_vocabulary,
    "marker-colour": input_marker_colour,
    "front-bias": input_front_bias,
}


def _check_row(fn, request, **kwargs):
    """Run a row's check with the module fixtures it names among its arguments."""
    for name in ("nasty_run", "finished_run"):
        if name in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
            kwargs[name] = request.getfixturevalue(name)
    fn(**kwargs)


@pytest.mark.parametrize("row", INPUT)
def test_input(row, tmp_path, capsys, request):
    _check_row(INPUT[row], request, tmp_path=tmp_path, capsys=capsys)


# ==== Faults ==================================================================================

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 6 and 12), copied per test that damages it."""
    return tiny_run(tmp_path_factory.mktemp("finished"), steps=12, extra=["checkpoint_every=6"])


def copy_run(finished_run, tmp_path) -> Path:
    dst = tmp_path / finished_run.name
    shutil.copytree(finished_run, dst)
    return dst


def fault_non_finite_step(tmp_path, monkeypatch, **_):
    NaNSteps(monkeypatch, calls={3, 4, 9})
    run_dir = tiny_run(tmp_path, steps=20)
    st = status_of(run_dir)
    assert st["status"] == "succeeded" and st["skipped_steps"] == 3 and st["step"] == 20 and st["rollbacks"] == 0
    import csv

    with open(run_dir / "logs" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert max(float(r["skipped"]) for r in rows if r.get("skipped")) == 3.0  # logged


def fault_divergence(tmp_path, monkeypatch, **_):
    from threedgen.errors import RunFailed

    # Five bad steps in a row (rollback_after=5) after the step-6 checkpoint: one rollback, lr x0.5.
    NaNSteps(monkeypatch, calls=set(range(9, 14)))
    run_dir = tiny_run(tmp_path / "a", steps=16, extra=["checkpoint_every=6", "optimizer.rollback_after=5"])
    st = status_of(run_dir)
    assert st["status"] == "succeeded" and st["rollbacks"] == 1 and st["skipped_steps"] == 5
    assert st["rolled_back_steps"] == 2  # steps 7 and 8, taken after the step-6 checkpoint
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    from threedgen.representations.nerf import NeRF

    lrs = {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    expected = {g["name"]: g["lr"] * 0.5 for g in NeRF(tiny_cfg().representation).parameter_groups()}
    assert lrs == pytest.approx(expected)
    assert ckpt["threedgen"]["rollbacks"] == 1 and ckpt["threedgen"]["lr_scale"] == 0.5
    # Bad for good: every rollback fails again; after max_rollbacks the run fails as diverged.
    monkeypatch.undo()
    NaNSteps(monkeypatch, forever_from=8)
    with pytest.raises(RunFailed, match=r"diverged: 3 non-finite steps in a row at step \d+, after 2 rollback"):
        tiny_run(tmp_path / "b", steps=40, extra=["checkpoint_every=6", "optimizer.rollback_after=3",
                                                   "optimizer.max_rollbacks=2"])
    run_dir = only_run_dir(tmp_path / "b")
    st = status_of(run_dir)
    assert st["status"] == "failed" and st["error"].startswith("diverged")
    assert not list(run_dir.glob("mesh.*"))  # no mesh of a diverged run
    from threedgen.checkpoints import read_checkpoint

    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt", run_dir)["global_step"] == 6


def fault_nan_mesh(tmp_path, monkeypatch, capsys, **_):
    import pytorch_lightning as pl

    from threedgen.errors import RunFailed

    class Poison(pl.Callback):  # parameters turn NaN after the last checkpoint
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step == trainer.max_steps:
                with torch.no_grad():
                    next(module.representation.parameters()).fill_(float("nan"))

    with pytest.raises(RunFailed, match="diverged: the trained parameters are not finite; nothing was exported"):
        tiny_run(tmp_path, steps=8, extra=["checkpoint_every=4"], callbacks=[Poison()])
    run_dir = only_run_dir(tmp_path)
    assert status_of(run_dir)["status"] == "failed" and not list(run_dir.glob("mesh.*"))
    # A checkpoint holding NaN is refused by export too (a clear error, exit 2).
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("representation."))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] * float("nan")
    torch.save(ckpt, run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "checkpoints" / "prev.ckpt").unlink(missing_ok=True)
    line = cli_error(capsys, ["export", run_dir])
    assert "no usable checkpoint" in line and "non-finite values" in line


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARKER}",))


EVIL_MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"threedgen-evil-{os.getpid()}"


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(len(data)))
    elif kind == "pickle carrying code":
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": Evil(), "global_step": 12}, fh)
    elif kind == "symlink out of the run folder":
        outside = path.parent.parent.parent / "outside.ckpt"
        shutil.copyfile(path, outside)
        path.unlink()
        path.symlink_to(outside)


def fault_corrupt_checkpoint(tmp_path, capsys, finished_run, **_):
    kinds = ("empty", "truncated", "random bytes", "pickle carrying code", "symlink out of the run folder")
    for kind in kinds:
        run_dir = copy_run(finished_run, tmp_path / kind.replace(" ", "-"))
        last = run_dir / "checkpoints" / "last.ckpt"
        _corrupt(last, kind)
        damaged = last.read_bytes()
        code, out, err = cli(capsys, ["export", run_dir, "--format", "ply"])
        assert code == 0, (kind, err)
        assert "threedgen: warning: last.ckpt" in err and "using prev.ckpt (step 6) instead" in err, (kind, err)
        assert last.read_bytes() == damaged  # export may run beside a live run: it changes no checkpoint
        assert not EVIL_MARKER.exists(), "a checkpoint's pickle ran code"
    # Resume falls back the same way and finishes from step 6.
    from threedgen.runner import run

    run_dir = copy_run(finished_run, tmp_path / "resume")
    _corrupt(run_dir / "checkpoints" / "last.ckpt", "pickle carrying code")
    (run_dir / "checkpoints" / ".last-killed.ckpt").write_bytes(b"half a save")  # a killed save's leftover
    run(resume=run_dir, steps=14, progress_bar=False)
    assert status_of(run_dir)["status"] == "succeeded" and status_of(run_dir)["step"] == 14
    assert not EVIL_MARKER.exists()
    # Resuming (the folder's only writer) set the damaged file aside and removed the leftover.
    assert (run_dir / "checkpoints" / "last.ckpt.corrupt").is_file() and no_temporaries(run_dir)
    capsys.readouterr()
    # Both unusable: a clear error, nothing executed.
    run_dir = copy_run(finished_run, tmp_path / "both")
    _corrupt(run_dir / "checkpoints" / "last.ckpt", "pickle carrying code")
    _corrupt(run_dir / "checkpoints" / "prev.ckpt", "truncated")
    line = cli_error(capsys, ["export", run_dir])
    assert "no usable checkpoint" in line and "last.ckpt cannot be read" in line and "prev.ckpt" in line
    line = cli_error(capsys, ["run", "--resume", run_dir])
    assert "no usable checkpoint" in line and "last.ckpt cannot be read" in line and "prev.ckpt" in line
    line = cli_error(capsys, ["run", "--resume", run_dir])  # and again, once both were set aside
    assert "no usable checkpoint" in line and "last.ckpt.corrupt was set aside earlier" in line
    assert not EVIL_MARKER.exists()


def fault_disk_full(tmp_path, monkeypatch, capsys, finished_run, **_):
    import pytorch_lightning as pl

    import threedgen.export as export
    from threedgen.errors import RunFailed

    # While saving a checkpoint (the second one): half a file, then ENOSPC.
    real_save, saves = pl.Trainer.save_checkpoint, []

    def flaky_save(trainer, filepath, *args, **kwargs):
        saves.append(filepath)
        if len(saves) == 2:
            Path(filepath).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", str(filepath))
        return real_save(trainer, filepath, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pl.Trainer, "save_checkpoint", flaky_save)
        with pytest.raises(RunFailed, match="disk full writing .*last.*ckpt; free space, then continue with: "
                                            "threedgen run --resume"):
            tiny_run(tmp_path / "ckpt", steps=12, extra=["checkpoint_every=4"])
    run_dir = only_run_dir(tmp_path / "ckpt")
    assert status_of(run_dir)["status"] == "failed" and "disk full" in status_of(run_dir)["error"]
    from threedgen.checkpoints import read_checkpoint

    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt", run_dir)["global_step"] == 4
    assert no_temporaries(run_dir)
    # The disk has room again: --resume finishes the run.
    code, out, err = cli(capsys, ["run", "--resume", run_dir, "--no-progress"])
    assert code == 0 and status_of(run_dir)["status"] == "succeeded", err

    # While exporting a mesh or the video of a finished run: earlier outputs stay as they were.
    for name in ("mesh.glb", "mesh.ply", "turntable.mp4"):
        run_dir = copy_run(finished_run, tmp_path / name.replace(".", "-"))
        before = files_of(run_dir)
        with monkeypatch.context() as m:
            with disk_full_on(m, export, name):
                line = cli_error(capsys, ["export", run_dir, "--texture", "vertex"], code=1)
        assert f"cannot write {run_dir / name}: No space left on device; earlier files are intact" in line
        after = files_of(run_dir)
        assert set(before) <= set(after) and after[Path(name)] == before[Path(name)]
        assert no_temporaries(run_dir)
        import trimesh

        for mesh in ("mesh.glb", "mesh.ply", "mesh.obj"):
            assert len(trimesh.load(run_dir / mesh, force="mesh").faces) > 0


def fault_outputs_unwritable(tmp_path, monkeypatch, **_):
    import pytorch_lightning as pl

    import threedgen.rundir as rundir
    from threedgen.errors import RunFailed

    class DeleteRunFolder(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step == 5:
                shutil.rmtree(trainer.default_root_dir)

    with pytest.raises(RunFailed, match="the run folder .* was deleted while the run wrote to it"):
        tiny_run(tmp_path / "deleted", steps=12, extra=["checkpoint_every=4"], callbacks=[DeleteRunFolder()])
    assert list((tmp_path / "deleted").iterdir()) == []  # and no "succeeded" anywhere
    # Read-only (root ignores permission bits, so the filesystem's answer is injected): the
    # status write at the first checkpoint meets EROFS.
    real = rundir.atomic_write_text

    def read_only(path, text):
        if Path(path).name == "status.json" and "running" in text and '"step": 4' in text:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, text)

    monkeypatch.setattr(rundir, "atomic_write_text", read_only)
    with pytest.raises(RunFailed, match=r"cannot write .*status.json \(Read-only file system\); check the folder"):
        tiny_run(tmp_path / "ro", steps=12, extra=["checkpoint_every=4", "preview_every=4"])
    assert status_of(only_run_dir(tmp_path / "ro"))["status"] == "failed"
    if os.geteuid() != 0:  # a real read-only folder where permission bits apply
        out = tmp_path / "locked"
        out.mkdir()
        out.chmod(0o555)
        try:
            from threedgen.errors import UserError

            with pytest.raises(UserError, match="is not writable"):
                tiny_run(out)
        finally:
            out.chmod(0o755)


def fault_out_of_memory(tmp_path, monkeypatch, **_):
    from threedgen.errors import RunFailed
    from threedgen.representations.nerf import NeRF

    real, calls = NeRF.render, []

    def oom(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(NeRF, "render", oom)
        with pytest.raises(RunFailed, match=r"out of memory at render.resolution=16 with camera.batch_size=1; lower "
                                            r"those .* in .*config.yaml, then continue with: threedgen run --resume"):
            tiny_run(tmp_path / "a")
    assert status_of(only_run_dir(tmp_path / "a"))["status"] == "failed"
    run_dir = tiny_run(tmp_path / "b")  # the next job in the same process runs normally
    assert status_of(run_dir)["status"] == "succeeded"


def fault_queue(tmp_path, **_):
    from threedgen.errors import UserError
    from threedgen.webui.app import Settings, WebUI

    ui = WebUI(Settings(outputs=tmp_path / "outputs", state=tmp_path / "state", max_queued=3))
    form = ("a red cube", "", "sds", "nerf", "shapes", 10, "0-1", "")
    first = ui.submit(*form)
    assert len(first) == 2
    assert ui.submit(*form) == first  # a double submit is the same request: no new rows
    with pytest.raises(UserError, match=r"the queue is full \(2 jobs waiting, at most 3; this request adds 2\)"):
        ui.submit("a blue torus", "", "sds", "nerf", "shapes", 10, "0-1", "")
    assert len(ui.table()) == 2  # all or nothing: no orphan row of the refused request
    (third,) = ui.submit("a blue torus", "", "sds", "nerf", "shapes", 10, "0", "")
    assert len(ui.table()) == 3 and third not in first


FAULTS = {
    "non-finite-step": fault_non_finite_step,
    "divergence": fault_divergence,
    "nan-mesh": fault_nan_mesh,
    "corrupt-checkpoint": fault_corrupt_checkpoint,
    "disk-full": fault_disk_full,
    "outputs-unwritable": fault_outputs_unwritable,
    "out-of-memory": fault_out_of_memory,
    "queue-full-or-double-submit": fault_queue,
}


@pytest.mark.parametrize("row", FAULTS)
def test_fault(row, tmp_path, capsys, monkeypatch, request):
    _check_row(FAULTS[row], request, tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)


# ==== the table and the tests, side by side ===================================================

def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("case", "---") and not set(cells[0]) <= {"-"}:
            rows.append(cells)
    return rows


def test_every_row_has_a_test():
    rows = _table_rows(DOCS.read_text())
    assert len(rows) >= 23
    cases = {**{f"test_input[{k}]": v for k, v in INPUT.items()}, **{f"test_fault[{k}]": v for k, v in FAULTS.items()}}
    named = set()
    for case, _expected, tests in rows:
        for ref in re.findall(r"`([^`]+)`", tests):
            if ref in cases:
                named.add(ref)
                continue
            file, _, func = ref.partition("::")
            source = (Path(__file__).parent.parent / file).read_text()
            assert re.search(rf"^def {re.escape(func)}\(", source, re.M), f"{case}: {ref} not found"
        assert re.findall(r"`([^`]+)`", tests), f"row {case!r} names no test"
    assert named == set(cases), set(cases) ^ named  # every parametrised case is a row, and back
