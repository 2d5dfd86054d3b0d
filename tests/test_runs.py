"""Run records: ids, SQLite round trips, prefixes, the state folder."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from grpoctl_contract.progress import Event
from orchestrator.errors import UsageError
from orchestrator.runs import RunRecord, RunStore, WorkerRun, new_run_id, state_dir, utc_stamp


def _record(run_id: str, **kw) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        config="configs/tiny_cpu.yaml",
        target="local",
        target_kind="local",
        remote_dir="/w",
        log_path="logs/a.log",
        pid_path="logs/a.pid",
        exit_path="logs/a.exit",
        run_dir=f"runs/{run_id}",
        ts="20260101_000000",
        workers=[WorkerRun("w0", "localhost", pid=42)],
        **kw,
    )


def test_run_id_shape():
    ts = utc_stamp()
    assert re.fullmatch(r"\d{8}_\d{6}", ts)
    run_id = new_run_id("grpo_gsm8k_qwen25_3b_bs128_steps100_pallas", ts)
    assert re.fullmatch(rf"grpo_gsm8k_qwen25_3b_bs128_steps100_pallas-{ts}-[0-9a-f]{{4}}", run_id)
    assert len({new_run_id("a", ts) for _ in range(20)}) > 1  # the random suffix tells same-second runs apart


def test_store_lives_in_the_state_dir_and_survives_reopening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state"
    store = RunStore()
    rec = _record("tiny_cpu-20260101_000000-abcd", env={"EVAL_FULL_SWEEP": "1"})
    rec.recoveries.append({"at": "t", "reason": "PREEMPTED", "action": "recreate"})
    store.save(rec)
    again = RunStore().get("tiny_cpu-20260101_000000-abcd")  # a new process after the laptop slept
    assert again == rec
    assert (tmp_path / "state" / "runs.sqlite").is_file()


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("GRPOCTL_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state_dir() == tmp_path / "grpoctl"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir() == tmp_path / ".local" / "state" / "grpoctl"


def test_get_by_unique_prefix_and_errors(tmp_path: Path):
    store = RunStore(tmp_path / "r.sqlite")
    store.save(_record("ok-20260101_000000-aaaa"))
    store.save(_record("ok-20260101_000001-bbbb"))
    store.save(_record("o_k-1"))
    assert store.get("ok-20260101_000001").run_id == "ok-20260101_000001-bbbb"
    with pytest.raises(UsageError, match="ambiguous"):
        store.get("ok-")
    with pytest.raises(UsageError, match="no run"):
        store.get("nope")
    assert store.get("o_k").run_id == "o_k-1"  # '_' is not a LIKE wildcard here
    with pytest.raises(UsageError):
        store.get("o%")


def test_list_newest_first_filter_and_delete(tmp_path: Path):
    store = RunStore(tmp_path / "r.sqlite")
    for i in range(3):
        rec = _record(f"r{i}")
        rec.created_at = f"2026-01-0{i + 1}T00:00:00+00:00"
        rec.target = "lab" if i == 1 else "local"
        store.save(rec)
    assert [r.run_id for r in store.list()] == ["r2", "r1", "r0"]
    assert [r.run_id for r in store.list(target="lab")] == ["r1"]
    store.delete("r1")
    assert [r.run_id for r in store.list()] == ["r2", "r0"]
    with sqlite3.connect(tmp_path / "r.sqlite") as db:  # plain SQLite, inspectable by hand
        assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 2


def test_unknown_fields_from_a_newer_version_are_ignored():
    data = _record("x").to_json() | {"added_later": 1}
    assert RunRecord.from_json(data).run_id == "x"


def test_the_last_event_is_stored_whole_and_records_stored_before_read_back():
    """The record keeps the contract's Event; `status --json` shows it with the keys it always had."""
    ev = Event("phase", "final_sweep", k=2, n=11, step=100, total=100, eta_s=45.0,
               ledger={"t0": 1.0, "phase_s": {"train": 2.0}, "resumed_from": 0})
    stored = _record("x", last_progress=ev).to_json()["last_progress"]
    old_keys = {"step", "total", "elapsed_s", "eta_s", "phase_eta_s", "metrics", "phase", "k", "n", "detail",
                "bytes_done", "bytes_total", "text", "ledger"}
    assert old_keys <= set(stored) and stored["text"] == "final sweep batch 2/11"
    assert RunRecord.from_json(_record("x", last_progress=ev).to_json()).last_progress == ev
    # written by an older grpoctl: no `event`; before phases, not even `phase` (a train step then)
    before = RunRecord.from_json({**_record("x").to_json(), "last_progress": {"step": 3, "total": 10}})
    assert before.last_progress is not None
    assert (before.last_progress.phase, before.last_progress.k, before.last_progress.n) == ("train", 3, 10)
    done = _record("x", last_progress={"phase": "done", "step": 10, "total": 10, "eta_s": 0.0}).last_progress
    assert done is not None and done.done


def test_in_memory_store_for_dry_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(tmp_path / "s"))
    store = RunStore.in_memory()
    store.save(_record("dry"))
    assert store.get("dry").run_id == "dry"
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------ concurrent writers


def test_two_writers_of_one_run_never_lose_each_others_fields(tmp_path: Path):
    """`status --watch` polls (and saves) a run while `fetch` saves `fetched_to` and `down` asks it to
    stop: each save writes the fields its process changed, never a stale copy of the others'."""
    path = tmp_path / "runs.sqlite"
    RunStore(path).save(_record("r-1", state="RUNNING"))
    watcher, fetcher, downer = (RunStore(path).get("r-1") for _ in range(3))
    fetcher.fetched_to = "runs/r-1"
    RunStore(path).save(fetcher)
    downer.stop_requested = "down"
    RunStore(path).save(downer)
    step3 = Event("progress", "train", k=3, step=3)
    watcher.state, watcher.last_progress = "STALLED", step3
    RunStore(path).save(watcher)  # loaded before both writes above
    stored = RunStore(path).get("r-1")
    assert (stored.fetched_to, stored.stop_requested) == ("runs/r-1", "down")
    assert (stored.state, stored.last_progress) == ("STALLED", step3)
    assert (watcher.fetched_to, watcher.stop_requested) == ("runs/r-1", "down")  # it sees them now
    watcher.workers[0].pid = 7  # its next save still writes only what it changed
    fetcher.fetched_to = "runs/again"
    RunStore(path).save(fetcher)
    RunStore(path).save(watcher)
    stored = RunStore(path).get("r-1")
    assert (stored.fetched_to, stored.workers[0].pid, stored.state) == ("runs/again", 7, "STALLED")


def test_a_run_still_launching_shows_starting_never_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`status` while `run` is between saving the record and writing the pids: nothing to poll yet."""
    from orchestrator import api
    from orchestrator.lifecycle import monitor

    config = tmp_path / "g.yaml"
    config.write_text(f"targets:\n  local: {{kind: local, workdir: {tmp_path / 'wd'}}}\n")
    with api.Sessions(config_file=str(config)) as sessions:
        record = _record("r-launching", state="LAUNCHING")  # what today's launch saves first
        record.workers[0].pid = None
        sessions.store.save(record)
        for _ in range(2):
            api.watch_status(sessions, sessions.runs(None), watch=False, interval=0, on_round=lambda _: None)
            assert sessions.store.get("r-launching").state == "STARTING"
        # a launch that never finished (its process died) is judged after a grace period
        monkeypatch.setattr(monitor, "LAUNCH_GRACE_S", -1.0)
        api.watch_status(sessions, sessions.runs(None), watch=False, interval=0, on_round=lambda _: None)
        assert sessions.store.get("r-launching").state == "LOST"
