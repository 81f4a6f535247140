"""The job table at its edges: what can be resumed and cancelled in each state, automatic restarts
running out, double submits against finished jobs, the queue limit exactly full, a table made
by an older server, and the order jobs are claimed and listed in."""

from __future__ import annotations

import json
import sqlite3

import pytest

from threedgen.errors import UserError
from threedgen.jobs import store as jobs_module
from threedgen.jobs.store import DOUBLE_SUBMIT_S, JobStore, wait_for


@pytest.fixture
def clock(monkeypatch):
    """The table's clock, moved by hand."""
    now = [1_000_000.0]
    monkeypatch.setattr(jobs_module.time, "time", lambda: now[0])
    return now


def _store(tmp_path, max_queued=10) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite", max_queued=max_queued)


def _job_in(store: JobStore, status: str, run_dir="/runs/x") -> str:
    """A job brought to ``status`` the way the workers bring it there."""
    job = store.submit({"prompt": f"a red cube {status}"}, 10)
    if status == "queued":
        return job
    assert store.claim(worker=0).id == job
    if run_dir:
        store.progress(job, 3, 10, run_dir=run_dir)
    if status in ("succeeded", "failed", "cancelled"):
        store.finish(job, status, error="boom" if status == "failed" else None)
    elif status == "interrupted":
        store.recover()
    return job


@pytest.mark.parametrize("status", ["queued", "running", "succeeded", "cancelled"])
def test_only_interrupted_or_failed_jobs_can_be_resumed(tmp_path, status):
    store = _store(tmp_path)
    job = _job_in(store, status)
    before = store.get(job)
    with pytest.raises(UserError, match=f"job {job} is {status}; only interrupted or failed jobs can be resumed"):
        store.resume(job)
    after = store.get(job)
    assert (after.status, after.history) == (before.status, before.history)


@pytest.mark.parametrize("status", ["interrupted", "failed"])
@pytest.mark.parametrize("run_dir", ["/runs/x", None])
def test_a_resumed_job_is_queued_again_and_continues_its_run_folder(tmp_path, clock, status, run_dir):
    store = _store(tmp_path)
    job = _job_in(store, status, run_dir=run_dir)
    clock[0] += 60
    store.resume(job)
    got = store.get(job)
    assert got.status == "queued" and got.resume is bool(run_dir) and got.error is None and not got.cancel
    assert got.created == clock[0]  # to the back of the queue
    assert got.history[-1]["event"] == "resumed"
    assert store.claim(worker=1).id == job


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_finished_jobs_cannot_be_cancelled(tmp_path, status):
    store = _store(tmp_path)
    job = _job_in(store, status)
    with pytest.raises(UserError, match=f"job {job} has already {status}; only queued or running jobs can be "
                                        "cancelled"):
        store.cancel(job)
    assert store.get(job).status == status


def test_an_interrupted_job_can_be_cancelled_and_a_running_one_is_asked_to_stop(tmp_path):
    store = _store(tmp_path)
    job = _job_in(store, "interrupted")
    assert store.cancel(job) == "cancelled" and store.get(job).status == "cancelled"
    job = _job_in(store, "running")
    assert store.progress(job, 4, 10) is False
    assert store.cancel(job) == "cancelling" and store.get(job).status == "running"
    assert store.progress(job, 5, 10) is True


def test_automatic_restarts_run_out(tmp_path):
    store = _store(tmp_path)
    job = _job_in(store, "running")
    for restart in (1, 2):
        assert store.interrupt(job, "node died", max_restarts=2) == "queued"
        got = store.get(job)
        assert got.restarts == restart and got.resume and got.pid is None
        assert got.history[-1] == {**got.history[-1], "event": "requeued", "restart": restart, "of": 2}
        assert store.claim(worker=0).id == job
    assert store.interrupt(job, "node died", max_restarts=2) == "interrupted"
    got = store.get(job)
    assert got.status == "interrupted" and got.restarts == 2
    assert got.error == "node died; no automatic restarts left (2); resume continues from the last checkpoint"
    assert store.interrupt(job, "again", max_restarts=2) == "interrupted"  # not running: nothing changes
    store.resume(job)  # a person may still resume it
    got = store.get(job)
    assert got.status == "queued"
    assert [e["event"] for e in got.history] == ["queued", "interrupted", "requeued", "interrupted", "requeued",
                                                  "interrupted", "resumed"]  # the whole story, in order


def test_a_fault_that_is_not_the_job_s_uses_no_restart(tmp_path):
    store = _store(tmp_path)
    job = _job_in(store, "running", run_dir=None)
    for _ in range(3):
        assert store.interrupt(job, "dispatcher restarted", max_restarts=0, count=False) == "queued"
        got = store.get(job)
        assert got.restarts == 0 and got.resume is False  # no run folder yet: starts afresh
        store.claim(worker=0)
    assert store.interrupt(job, "node died", max_restarts=0) == "interrupted"


def test_an_interrupted_job_whose_cancel_was_asked_is_cancelled_not_requeued(tmp_path):
    store = _store(tmp_path)
    job = _job_in(store, "running")
    store.cancel(job)
    assert store.interrupt(job, "node died", max_restarts=3) == "cancelled"
    got = store.get(job)
    assert got.status == "cancelled" and got.restarts == 0 and got.history[-1]["event"] == "cancelled"
    assert store.interrupt("0" * 12, "x", max_restarts=3) == "unknown"


def test_a_double_submit_returns_the_same_job_only_while_it_is_waiting_or_running(tmp_path, clock):
    """The same request within 5 s (docs/reliability.md) while its job waits or runs is that job."""
    assert DOUBLE_SUBMIT_S == 5.0
    store = _store(tmp_path)
    params = {"prompt": "a red cube", "steps": 10}
    first = store.submit(params, 10)
    clock[0] += DOUBLE_SUBMIT_S - 0.5
    assert store.submit(dict(reversed(list(params.items()))), 10) == first  # same request, any key order
    store.claim(worker=0)
    assert store.submit(params, 10) == first  # running: still the same request
    store.finish(first, "succeeded")
    again = store.submit(params, 10)  # finished: a new job, though within the window
    assert again != first and store.get(again).status == "queued"
    clock[0] += DOUBLE_SUBMIT_S + 0.1
    third = store.submit(params, 10)  # later than the window: a new job
    assert third not in (first, again)
    assert store.submit({**params, "seed": 1}, 10) not in (first, again, third)


def test_the_queue_takes_exactly_its_limit_and_a_request_whole_or_not_at_all(tmp_path):
    store = _store(tmp_path, max_queued=3)
    store.submit_many([({"prompt": f"p{i}"}, 10) for i in range(2)])
    with pytest.raises(UserError, match=r"the queue is full \(2 jobs waiting, at most 3; this request adds 2\)"):
        store.submit_many([({"prompt": "p2"}, 10), ({"prompt": "p3"}, 10)])
    assert store.counts() == {"queued": 2}  # nothing of the refused request
    ids = store.submit_many([({"prompt": "p2"}, 10), ({"prompt": "p0"}, 10)])  # p0 is a double submit
    assert len(ids) == 2 and store.counts() == {"queued": 3}
    with pytest.raises(UserError, match="queue is full"):
        store.submit({"prompt": "p4"}, 10)
    assert store.submit({"prompt": "p1"}, 10)  # a double submit adds nothing: taken even when full
    store.claim(worker=0)  # running jobs do not count against the queue
    assert store.submit({"prompt": "p4"}, 10) and store.counts() == {"queued": 3, "running": 1}


def test_jobs_are_claimed_oldest_first_and_listed_newest_first(tmp_path, clock):
    store = _store(tmp_path)
    ids = []
    for i in range(3):
        ids.append(store.submit({"prompt": f"p{i}"}, 10 + i))
        clock[0] += 1
    assert [j.id for j in store.list()] == ids[::-1] and [j.id for j in store.list(limit=2)] == ids[:0:-1]
    assert [j.id for j in store.many([ids[2], "0" * 12, ids[0]])] == [ids[2], ids[0]]
    assert store.many([]) == []
    claimed = store.claim(worker=7)
    assert claimed.id == ids[0] and claimed.worker == 7 and claimed.started == clock[0] and claimed.max_steps == 10
    assert [j.id for j in store.running()] == [ids[0]]
    store.claim(worker=1), store.claim(worker=2)
    assert store.claim(worker=3) is None


def test_progress_finish_and_eta(tmp_path):
    store = _store(tmp_path)
    job = _job_in(store, "running", run_dir=None)
    got = store.get(job)
    assert got.eta_seconds is None and got.progress == 0.0  # no step timed yet
    store.progress(job, 4, 10, step_time=0.5, run_dir="/runs/a")
    store.progress(job, 6, 10)  # keeps the measured step time and the folder
    got = store.get(job)
    assert (got.step, got.step_time, got.run_dir, got.progress, got.eta_seconds) == (6, 0.5, "/runs/a", 0.6, 2.0)
    store.progress(job, 12, 10)
    assert store.get(job).eta_seconds == 0.0  # never negative
    store.finish(job, "failed", error="disk full writing x")
    got = store.get(job)
    assert got.status == "failed" and got.error == "disk full writing x" and got.run_dir == "/runs/a"
    assert got.eta_seconds is None and got.finished is not None and got.pid is None
    assert got.history[-1] == {**got.history[-1], "event": "failed", "error": "disk full writing x"}
    with pytest.raises(AssertionError):
        store.finish(job, "running")
    empty = store.submit({"prompt": "no steps"}, 0)
    assert store.get(empty).progress == 0.0


def test_recover_interrupts_only_running_jobs(tmp_path):
    store = _store(tmp_path)
    running, done = _job_in(store, "running"), _job_in(store, "succeeded")
    queued = _job_in(store, "queued")
    assert store.recover() == [running]
    assert [store.get(j).status for j in (queued, running, done)] == ["queued", "interrupted", "succeeded"]
    got = store.get(running)
    assert got.history[-1] == {**got.history[-1], "event": "interrupted", "reason": "the server stopped"}
    assert store.recover() == []


def test_a_table_made_by_an_older_server_gains_the_new_columns(tmp_path):
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, params TEXT NOT NULL, status TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0, max_steps INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
            started REAL, finished REAL, step_time REAL, error TEXT, run_dir TEXT,
            resume INTEGER NOT NULL DEFAULT 0, cancel INTEGER NOT NULL DEFAULT 0, worker INTEGER, pid INTEGER);
        INSERT INTO jobs (id, params, status, max_steps, created) VALUES ('0123456789ab', '{"prompt": "old"}',
            'interrupted', 10, 1.0);
    """)
    db.commit()
    db.close()
    store = JobStore(path)
    old = store.get("0123456789ab")
    assert old.params == {"prompt": "old"} and old.restarts == 0 and old.history == [] and old.node is None
    store.resume(old.id)
    assert [e["event"] for e in store.get(old.id).history] == ["resumed"]
    assert json.loads(json.dumps(store.counts())) == {"queued": 1}


def test_wait_for_returns_the_first_true_value_or_times_out():
    import time

    values = iter([None, 0, "done"])
    assert wait_for(lambda: next(values), timeout=5, every=0.01) == "done"
    values = iter([None, "ready"])
    started = time.monotonic()
    assert wait_for(lambda: next(values), timeout=5) == "ready"
    assert time.monotonic() - started < 1.0  # it looks again within a second by default
    with pytest.raises(TimeoutError, match="timed out after 0.05 s"):
        wait_for(lambda: False, timeout=0.05, every=0.01)


def test_outputs_and_state_may_not_hold_each_other(tmp_path):
    from threedgen.webui.app import Settings, WebUI

    for outputs, state in ((tmp_path / "a", tmp_path / "a"), (tmp_path / "b" / "out", tmp_path / "b"),
                           (tmp_path / "c", tmp_path / "c" / "state")):
        with pytest.raises(UserError, match="separate folders"):
            WebUI(Settings(outputs=outputs, state=state))
