"""`threedgen compare` (threedgen.compare): bad input refused in one line with nothing queued; a
real comparison of two methods x two seeds through the local backend writes compare.json, the
sheet, the report and the views with the mean and spread over seeds; a partly failed comparison
still writes its sheet; the wall-time budget; and the Janus gate of `threedgen run --janus-retry`."""

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image
from test_bad_inputs import TINY, cli

from threedgen import compare as cmp
from threedgen.jobs.store import Job
from threedgen.rundir import RunFolder

EVAL = [s for s in TINY if s != "export.evaluate=false"]  # the truth's metrics and the prior's check on


def _sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "sds,nope"], "unknown method 'nope'"),
    (["--methods", "sds,vsd,sds"], "method 'sds' is named twice"),
    (["--methods", " , "], "--methods is empty"),
    (["--seeds", "0,0"], "seed 0 is named twice"),
    (["--seeds", "x"], "is not a seed"),
    (["--budget-steps", "0"], "--budget-steps must be an integer from 1"),
    (["--budget-seconds", "-3"], "--budget-seconds must be a number above 0"),
    (["--budget-seconds", "nan"], "--budget-seconds must be a number above 0"),
    (["--budget-steps", "5", "--budget-seconds", "5"], "give one budget"),
    (["--methods", "all", "--seeds", "0,1", "--max-queue", "10"], "8 methods x 2 seeds is 16 jobs; at most 10"),
    (["--set", "guidance.guidance_scale=-1"], "guidance.guidance_scale"),
])
def test_bad_input_is_one_line_and_queues_nothing(capsys, tmp_path, argv, message):
    out = tmp_path / "cmp"
    code, _, err = cli(capsys, ["compare", "--prompt", "a red cube", "--out", out, *argv, *_sets(TINY)])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing planned, nothing queued


def test_attach_takes_no_new_plan_and_needs_a_comparison(capsys, tmp_path):
    code, _, err = cli(capsys, ["compare", "--attach", tmp_path, "--prompt", "a red cube"])
    assert code == 2 and "drop --prompt" in err
    code, _, err = cli(capsys, ["compare", "--attach", tmp_path])
    assert code == 2 and "is not a comparison folder" in err


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """sds and bsd x seeds 0 and 1, 10 steps each, through the local backend (one job process each)."""
    from threedgen.cli import main

    out = tmp_path_factory.mktemp("compare") / "cmp"
    code = main(["compare", "--prompt", "a red cube", "--methods", "sds,bsd", "--seeds", "0,1", "--budget-steps", "10",
                 "--out", str(out), "--prior", "shapes", *_sets(EVAL)])
    assert code == 0
    return out, json.loads((out / "compare.json").read_text())


def test_a_comparison_runs_every_method_and_seed_on_the_same_plan(comparison):
    out, record = comparison
    assert record["format"] == cmp.FORMAT and record["state"] == "finished" and record["truth"] is True
    assert [(r["method"], r["seed"]) for r in record["runs"]] == [("sds", 0), ("sds", 1), ("bsd", 0), ("bsd", 1)]
    for run in record["runs"]:
        assert run["status"] == "succeeded", run
        status = RunFolder(run["run_dir"]).read_status()
        assert status["step"] == status["max_steps"] == 10 and status["peak_memory_mb"] > 50
        cfg = (Path(run["run_dir"]) / "config.yaml").read_text()
        assert "prompt: a red cube" in cfg and f"seed: {run['seed']}" in cfg and "steps: 10" in cfg
        metrics = RunFolder(run["run_dir"]).read_metrics()
        assert run["values"]["mask_iou"] == pytest.approx(metrics["mask_iou"])
        assert 0.0 <= run["values"]["janus_score_prior"] <= 1.0
        assert len(run["curve"]) >= 1 and run["curve"][-1][0] <= 10
        strip = Image.open(out / run["views"])
        assert strip.size == (len(cmp.VIEW_AZIMUTHS) * cmp.VIEW_SIZE, cmp.VIEW_SIZE)
    for method in ("sds", "bsd"):
        row = next(s for s in record["summary"] if s["method"] == method)
        ious = [r["values"]["mask_iou"] for r in record["runs"] if r["method"] == method]
        assert row["succeeded"] == 2 and row["failed"] == 0
        assert row["stats"]["mask_iou"]["n"] == 2
        assert row["stats"]["mask_iou"]["mean"] == pytest.approx(statistics.fmean(ious))
        assert row["stats"]["mask_iou"]["std"] == pytest.approx(statistics.stdev(ious))
    sheet = Image.open(out / "sheet.png")
    assert sheet.width >= 800 and sheet.height >= 200
    html = (out / "report.html").read_text()
    assert 'src="sheet.png"' in html and "a red cube" in html and "bsd" in html


def test_a_finished_comparison_reopens(capsys, comparison):
    out, record = comparison
    (out / "sheet.png").unlink()
    code, stdout, _ = cli(capsys, ["compare", "--attach", out])
    assert code == 0 and stdout.strip().splitlines()[-1] == str(out)
    assert (out / "sheet.png").is_file()
    assert json.loads((out / "compare.json").read_text())["runs"][0]["values"] == record["runs"][0]["values"]
    code, _, err = cli(capsys, ["compare", "--prompt", "a red cube", "--out", out, *_sets(TINY)])
    assert code == 2 and "already holds a comparison" in err


def test_a_partly_failed_comparison_still_writes_its_sheet(tmp_path, comparison):
    _, done = comparison
    record = json.loads(json.dumps(done))
    for run in record["runs"]:
        run.pop("values"), run.pop("views")
    good = record["runs"][0]
    def job(job_id, status, step, run_dir=None, error=None):
        return Job(id=job_id, params={}, status=status, step=step, max_steps=4, created=0.0, started=0.0, finished=1.0,
                   step_time=None, error=error, run_dir=run_dir, resume=False, cancel=False, worker=0, pid=None)

    jobs = {good["job"]: job(good["job"], "succeeded", 4, good["run_dir"]),
            record["runs"][2]["job"]: job(record["runs"][2]["job"], "failed", 1, error="out of memory")}
    record["runs"] = [record["runs"][0], record["runs"][2]]
    record["seeds"] = [0]
    cmp.collect(record, jobs, tmp_path)
    assert record["state"] == "finished"
    failed = next(s for s in record["summary"] if s["method"] == "bsd")
    assert failed["failed"] == 1 and failed["errors"] == ["seed 0: out of memory"] and failed["stats"] == {}
    written = cmp.write_outputs(record, tmp_path)
    assert Image.open(written["sheet"]).height > 0
    assert "out of memory" in Path(written["report"]).read_text()


def test_a_wall_time_budget_stops_training(capsys, tmp_path):
    code, stdout, _ = cli(capsys, ["run", "--prompt", "a red cube", "--steps", "100000", "--out", tmp_path,
                                   "--no-progress", "max_seconds=1.5", *TINY])
    assert code == 0
    status = RunFolder(stdout.strip().splitlines()[-1]).read_status()
    # stopped by the budget: it ran at least the 1.5 s (train_seconds counts from before fit), and
    # far fewer than the 100000 steps, well before they could be done
    assert 1 <= status["step"] < 100000 and 1.5 <= status["train_seconds"] < 30
    planned = cmp.plan("a red cube", ["sds"], [0], "nerf", "shapes", budget_seconds=60.0, overrides=tuple(TINY))
    assert "max_seconds=60.0" in planned[0][2].overrides and planned[0][2].prior == "shapes"


@pytest.mark.parametrize("scores, attempts, best", [([0.8, 0.6, 0.1], 3, 3), ([0.8, 0.4, 0.9], 3, 2), ([0.0], 1, 1)])
def test_the_janus_gate_runs_the_next_seed_until_a_run_passes(capsys, tmp_path, monkeypatch, scores, attempts, best):
    import threedgen.evaluate as evaluate

    given = iter(scores)
    monkeypatch.setattr(evaluate, "janus_prior_metrics", lambda *a, **k: {"janus_score_prior": next(given)})
    code, stdout, err = cli(capsys, ["run", "--prompt", "a red cube", "--steps", "2", "--seed", "5", "--out", tmp_path,
                                     "--no-progress", "--janus-retry", "2", "janus.threshold=0.2", *EVAL])
    assert code == 0, err
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == attempts  # every attempt keeps its folder
    gate = json.loads(RunFolder(folders[-1]).janus_gate.read_text())
    assert [a["seed"] for a in gate["attempts"]] == [5 + k for k in range(attempts)]
    assert [a["janus_score_prior"] for a in gate["attempts"]] == scores[:attempts]
    assert Path(stdout.strip().splitlines()[-1]) == Path(gate["attempts"][best - 1]["run_dir"])
    assert err.count("Janus gate: attempt") == attempts


@pytest.mark.parametrize("argv, message", [
    (["--janus-retry", "-1"], "--janus-retry must be an integer from 0 to 10"),
    (["--janus-retry", "11"], "--janus-retry must be an integer from 0 to 10"),
    (["--janus-retry", "2", "export.evaluate=false"], "needs export.evaluate=true"),
    (["janus.threshold=2"], "janus.threshold"),
])
def test_gate_settings_are_checked(capsys, tmp_path, argv, message):
    code, _, err = cli(capsys, ["run", "--prompt", "a red cube", "--out", tmp_path, *argv])
    assert code == 2 and message in err, err
    assert not any(tmp_path.iterdir())
