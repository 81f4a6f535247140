"""The web UI's Compare tab (the guidance workbench): a comparison queued from the form or the API
(every method x seed in one submission, or nothing on bad input), brought up to date while its jobs
run, its sheet and report written once every run is final, and listed again after a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from threedgen.errors import UserError
from threedgen.jobs.store import wait_for
from threedgen.webui.service import COMPARISONS, Service, Settings

# Tiny, quick runs: every job of these tests gets these server-side settings (`--set`).
TINY = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=2", "export.video_resolution=32",
        "export.texture=vertex", "export.formats=[glb]", "export.evaluate=false", "preview_every=100000",
        "janus.enabled=false"]
GOOD = ("a red cube", "", ["sds", "vsd"], "nerf", "shapes", "0", "steps", 5)


def _service(tmp_path, **settings) -> Service:
    return Service(Settings(outputs=tmp_path / "outputs", state=tmp_path / "state", overrides=TINY, **settings))


def _form(**changes) -> tuple:
    names = ("prompt", "negative_prompt", "methods", "representation", "prior", "seeds", "budget_kind", "budget_value")
    values = dict(zip(names, GOOD))
    values.update(changes)
    return tuple(values[n] for n in names)


@pytest.fixture
def svc(tmp_path):
    service = _service(tmp_path, max_queued=6, max_steps=100)
    yield service
    service.close()


@pytest.mark.parametrize("changes, message", [
    ({"methods": []}, "methods is empty; give some of sds, vsd"),
    ({"methods": ["sds", "nope"]}, "unknown method 'nope'"),
    ({"methods": ["sds", "sds"]}, "method 'sds' is named twice"),
    ({"methods": ["sds", 3]}, "methods must be names of guidance methods"),
    ({"methods": {"sds": 1}}, "methods must be names of guidance methods"),
    ({"representation": "mesh"}, "unknown representation 'mesh'"),
    ({"prior": "stable-diffusion"}, "prior 'stable-diffusion' is not offered by this server"),
    ({"prior": "/etc/passwd"}, "not offered by this server"),
    ({"seeds": ""}, "seeds is empty; give seeds such as 0,1,2"),
    ({"seeds": "0, 0"}, "seed 0 is named twice in seeds"),
    ({"seeds": "0-3"}, "is not a seed"),
    ({"seeds": "\u0663"}, "is not a seed"),
    ({"budget_kind": "minutes"}, "the budget is counted in steps or seconds"),
    ({"budget_value": 0}, "whole number of steps from 1 to 100"),
    ({"budget_value": 101}, "whole number of steps from 1 to 100"),
    ({"budget_value": 2.5}, "whole number of steps from 1 to 100"),
    ({"budget_value": None}, "whole number of steps from 1 to 100"),
    ({"budget_value": True}, "whole number of steps from 1 to 100"),
    ({"budget_value": "1e400"}, "whole number of steps from 1 to 100"),
    ({"budget_kind": "seconds", "budget_value": -1}, "number of seconds above 0"),
    ({"budget_kind": "seconds", "budget_value": "nan"}, "number of seconds above 0"),
    ({"budget_kind": "seconds", "budget_value": float("inf")}, "number of seconds above 0"),
    ({"budget_kind": "seconds", "budget_value": "\u0663"}, "number of seconds above 0"),
    # a seconds budget runs each preset's steps at most: 250 for sds here, over the server's 100
    ({"budget_kind": "seconds", "budget_value": 30}, "sds: the preset runs 250 steps, over this server's limit of 100"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": None}, "prompt and negative prompt must be text"),
    ({"prompt": "a purple dragon"}, "outside the shapes prior's vocabulary"),
    ({"methods": "all"}, "8 methods x 1 seeds is 8 jobs; the queue has room for 6 now (0 waiting, at most 6)"),
])
def test_bad_input_is_one_line_and_queues_nothing(svc, changes, message):
    with pytest.raises(UserError) as err:
        svc.compare(*_form(**changes))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert svc.store.counts() == {}
    assert svc.comparisons() == [] and not list((svc.settings.outputs / COMPARISONS).glob("*"))


def test_a_queue_without_room_for_all_runs_takes_none(svc):
    for seed in range(5):  # 5 of the 6 places taken: a comparison of 2 runs does not fit
        svc.submit("a red cube", "", "sds", "nerf", "shapes", 5, str(seed), "")
    with pytest.raises(UserError, match=r"is 2 jobs; the queue has room for 1 now \(5 waiting, at most 6\)"):
        svc.compare(*GOOD)
    assert svc.store.counts() == {"queued": 5} and svc.comparisons() == []


def test_a_comparison_queues_every_method_and_seed_in_one_submission(svc):
    compare_id = svc.compare("a red cube", "", "sds, vsd", "nerf", "shapes", "0, 3", "steps", "7")  # as the API sends
    assert len(compare_id) == 8 and int(compare_id, 16) >= 0
    assert svc.store.counts() == {"queued": 4}
    folder = svc.settings.outputs / COMPARISONS / compare_id
    record = json.loads((folder / "compare.json").read_text())  # written at once, with the job ids
    assert [(r["method"], r["seed"]) for r in record["runs"]] == [("sds", 0), ("sds", 3), ("vsd", 0), ("vsd", 3)]
    assert record["budget"] == {"steps": 7} and record["state"] == "queued"
    assert record["state_folder"] == str(svc.settings.state)
    for run in record["runs"]:
        job = svc.store.get(run["job"])
        p = job.params
        assert (p["guidance"], p["seed"], p["steps"], job.max_steps) == (run["method"], run["seed"], 7, 7)
        assert (p["prompt"], p["representation"], p["prior"]) == ("a red cube", "nerf", "shapes")
        assert p["overrides"] == TINY  # the server's --set, as for a job of the per-prompt form
        assert p["compare"] == {"id": compare_id, "method": run["method"], "seed": run["seed"]}
    st = svc.compare_status(compare_id)
    assert (st["state"], st["progress"], st["sheet"], st["report"]) == ("queued", "4 queued", None, None)
    assert st["record_file"] == str(folder / "compare.json")
    # A budget of seconds: every run trains that long, each stopping at its preset's steps at most.
    roomy = Service(Settings(outputs=svc.settings.outputs, state=svc.settings.state, overrides=TINY, max_queued=6))
    seconds_id = roomy.compare("a blue torus", "", ["sds"], "nerf", "shapes", "1", "seconds", 2.5)
    [job] = roomy.store.many([roomy.compare_status(seconds_id)["record"]["runs"][0]["job"]])
    assert job.params["overrides"] == [*TINY, "max_seconds=2.5"] and job.max_steps == job.params["steps"] == 250
    assert roomy.compare_status(seconds_id)["record"]["budget"] == {"seconds": 2.5, "steps": 250}
    roomy.close()
    listed = svc.comparisons()
    assert [c["id"] for c in listed] in ([seconds_id, compare_id], [compare_id, seconds_id])  # same second: by id
    assert {c["id"]: c["methods"] for c in listed} == {compare_id: ["sds", "vsd"], seconds_id: ["sds"]}
    assert all(c["state"] == "queued" and c["created"] for c in listed)


def test_comparison_ids_are_checked_before_any_path(svc):
    for bad in ("../../state", "ABCDEF12", "", None, "1234567", "123456789", "0123abcd\n", "0123abc/", 12345678,
                "\uff10123abcd"):
        with pytest.raises(UserError, match=r"^unknown comparison id \(a comparison id is 8 hexadecimal characters\)$"):
            svc.compare_status(bad)
    with pytest.raises(UserError, match="^no comparison 0123abcd$"):
        svc.compare_status("0123abcd")
    # Only folders named by an id and holding a record of this version are listed.
    root = svc.settings.outputs / COMPARISONS
    (root / "0123abcd").mkdir(parents=True)
    (root / "0123abcd" / "compare.json").write_text("{not json")
    (root / "notanid").mkdir()
    assert svc.comparisons() == []


def test_a_finished_comparison_has_its_sheet_and_report_and_is_listed_after_a_restart(tmp_path):
    """Two methods x one seed, five steps each, run for real by the local backend on the CPU: the
    record follows the jobs, and once both are final the views are rendered (once each) and the sheet
    and report written, all in the served outputs folder; a new server lists and reopens it."""
    svc = _service(tmp_path)
    compare_id = svc.compare(*GOOD)
    folder = svc.settings.outputs / COMPARISONS / compare_id
    svc.pool.start()
    try:
        seen = []

        def finished():
            st = svc.compare_status(compare_id)  # polled as the page's timer does
            seen.append(st["progress"])
            return st if st["state"] == "finished" else None

        st = wait_for(finished, 300, every=0.5)
    finally:
        svc.close()
    runs = st["record"]["runs"]
    assert [(r["method"], r["status"], r["step"]) for r in runs] == [("sds", "succeeded", 5),
                                                                    ("vsd", "succeeded", 5)], runs
    assert st["progress"] == "2 succeeded" and st["sheet"] == str(folder / "sheet.png")
    assert st["report"] == str(folder / "report.html")
    for run in runs:  # rendered, although the first run was read while the second still ran
        assert run["views"] == f"views/{run['method']}-seed0.png" and (folder / run["views"]).stat().st_size > 500
        assert run["values"]["steps_per_second"] > 0 and run["glb"].endswith("mesh.glb")
        assert Path(run["run_dir"]).is_relative_to(svc.settings.state)  # the runs stay in the state folder
    assert (folder / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sds" in (folder / "report.html").read_text() and "vsd" in (folder / "report.html").read_text()
    assert json.loads((folder / "compare.json").read_text())["state"] == "finished"
    written = (folder / "compare.json").stat().st_mtime_ns
    # A new server over the same folders: the comparison is listed and reopens as it was, unchanged.
    again = _service(tmp_path)
    try:
        [listed] = again.comparisons()
        assert listed == {"id": compare_id, "prompt": "a red cube", "methods": ["sds", "vsd"], "state": "finished",
                          "created": st["record"]["created"]}
        reopened = again.compare_status(compare_id)
        assert reopened["sheet"] == st["sheet"] and reopened["record"]["runs"] == runs
        assert (folder / "compare.json").stat().st_mtime_ns == written
    finally:
        again.close()
    print(f"progress seen: {sorted(set(seen))}")


def test_the_page_has_a_compare_tab_and_the_api(tmp_path):
    import gradio as gr

    from threedgen.guidance.config import GUIDANCE
    from threedgen.webui.app import COMPARE_IDLE, WebUI, guard

    ui = WebUI(Settings(outputs=tmp_path / "outputs", state=tmp_path / "state", overrides=TINY))
    try:
        demo = ui.blocks()
        config = demo.config
        components, apis = config["components"], {d.get("api_name") for d in config["dependencies"]}
        assert {"Per-prompt job", "Instant (amortised model)", "Compare"} <= {
            str(c["props"].get("label")) for c in components if c["type"] == "tabitem"}
        [methods] = [c for c in components if c["type"] == "checkboxgroup"]
        assert methods["props"]["value"] == GUIDANCE.names()  # every method, ticked
        assert "Start comparison" in [c["props"].get("value") for c in components if c["type"] == "button"]
        assert {"compare", "compare_status", "comparisons", "submit", "status"} <= apis
        # The API's handlers: bad input is a gr.Error of one line, as for the other endpoints.
        with pytest.raises(gr.Error, match="unknown method 'nope'"):
            guard(ui.compare)("a red cube", "", "sds,nope", "nerf", "shapes", "0", "steps", "5")
        with pytest.raises(gr.Error, match="unknown comparison id"):
            guard(ui.compare_status)("../x")
        assert ui.compare_view("")[0] == COMPARE_IDLE
        compare_id = ui.compare(*GOOD)
        line, rows, sheet, files, menu, timer, shown = ui.compare_view(compare_id)
        assert line.startswith("**queued** · 2 queued") and compare_id in line
        assert [r[:4] for r in rows] == [["sds", "0", "queued", "0/5"], ["vsd", "0", "queued", "0/5"]]
        assert sheet is None and files is None and timer.active
        assert menu["value"] == compare_id and menu["choices"][0][1] == compare_id
        assert ui.compare_view(compare_id, shown)[2:5] == (gr.update(), gr.update(), gr.update())
        import shutil

        shutil.rmtree(ui.settings.outputs / COMPARISONS / compare_id)  # gone: the timer stops with one line
        line, rows, *_, timer, shown = ui.compare_tick(compare_id, shown)
        assert line == f"no comparison {compare_id}" and rows == [] and not timer.active
    finally:
        ui.close()


def test_the_job_form_takes_janus_retries(tmp_path):
    """The per-prompt form's Janus retries box becomes janus.retries on the job (the gate of
    `threedgen run --janus-retry`); empty or 0 adds nothing; anything else is one line."""
    from threedgen.webui.service import validate

    settings = Settings(outputs=tmp_path / "w", state=tmp_path / "s", overrides=["export.video_frames=4"])
    [(request, _)] = validate(settings, "a red cube", "", "sds", "nerf", "shapes", 12, "0", "", 2)
    assert request.overrides == ("export.video_frames=4", "janus.retries=2")
    assert request.to_config("cpu").janus.retries == 2
    for none in (None, "", 0, "0", 0.0):
        [(request, _)] = validate(settings, "a red cube", "", "sds", "nerf", "shapes", 12, "0", "", none)
        assert request.overrides == ("export.video_frames=4",)
    for bad in (11, -1, "x", "\u00b2", 1.5, True):
        with pytest.raises(UserError, match="Janus retries must be an integer from 0 to 10"):
            validate(settings, "a red cube", "", "sds", "nerf", "shapes", 12, "0", "", bad)
