"""The api layer called directly (no CLI): whole user actions return typed results, one session per target,
fetch-if-missing fetches once, dry-run results land in their own folder, progress only through callbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator import api
from orchestrator.errors import UsageError
from orchestrator.runs import RunRecord, WorkerRun
from orchestrator.targets.base import TargetState


def test_a_whole_dry_run_through_the_api(folder: Path, capsys: pytest.CaptureFixture[str]):
    said: list[str] = []
    with api.Sessions(dry_run=True, say=said.append) as sessions:
        s = sessions.get()
        # one session per target, whichever name asked for it
        assert sessions.get(s.target_name) is s and sessions.get() is s
        up = TargetState("DRY_RUN", True, {"kind": "local"}, target="local", kind="local", workers=1)
        assert api.up(s) == up
        synced = api.sync(s)
        assert set(synced.pythons) == set(synced.heads) and len(synced.heads) == 1
        record = api.launch(s, "configs/tiny_cpu.yaml", env={"A": "secret-a"}, overrides={"train.steps": "3"})
        assert record.trainer_args == ["--set", "train.steps=3"] and record.state == "RUNNING"
        polls: list[str] = []
        api.wait(s, record, interval=0.01, on_poll=lambda rec, _poll: polls.append(rec.state))
        assert record.state == "SUCCEEDED" and polls[-1] == "SUCCEEDED"
        again, same = sessions.for_run(record.run_id)
        assert again is s and same.run_id == record.run_id  # the shared store knows the run

        first = api.fetch_if_missing(s, record, "runs")
        assert first.fetched is not None and first.fetched.summary["dry_run"] is True
        assert first.folder == Path("runs") / "dry-run" / record.run_id  # never beside real results
        assert sessions.store.get(record.run_id).fetched_to == str(first.folder)
        calls = len(s.script.journal)
        second = api.fetch_if_missing(s, record, "runs")
        assert second == api.LocalRun(first.folder, None) and len(s.script.journal) == calls  # no remote call

        with pytest.raises(UsageError, match="a run appears twice"):  # a run against itself says nothing
            api.compare_folders(first.folder, first.folder, ["eval_full/accuracy"])
        other = shutil.copytree(first.folder, first.folder.parent / "other-run")
        done = api.compare_folders(first.folder, other, ["eval_full/accuracy"])
        assert [row.key for row in done.result.rows] == ["eval_full/accuracy"] and done.plot is None
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # the api prints nothing: progress went to `say`
    assert any("setsid nohup" in line for line in said)
    assert not any("secret-a" in line for line in said)  # -e values travel in a 0600 file, never argv


def test_reattach_refuses_a_run_whose_env_values_are_missing():
    record = RunRecord(
        run_id="r1", config="c.yaml", target="local", target_kind="local", remote_dir="/x",
        log_path="l", pid_path="p", exit_path="e", run_dir="d", ts="t",
        env={"WANDB_API_KEY": "k", "B": "b"}, workers=[WorkerRun("w0", "localhost")],
    )  # fmt: skip
    stored = RunRecord.from_json(record.to_json())  # what the store gives back: names, no values
    with pytest.raises(UsageError, match="launched with --secret B: pass them again"):
        api.reattach(stored, {"WANDB_API_KEY": "k"})
    assert stored.env == {}
    api.reattach(stored, {"WANDB_API_KEY": "k", "B": "b"})
    assert stored.env == {"WANDB_API_KEY": "k", "B": "b"}


def test_status_round_reports_a_run_on_an_unknown_target_once_and_stops(folder: Path):
    rounds: list[api.StatusRound] = []
    record = RunRecord(
        run_id="r2", config="c.yaml", target="gone-target", target_kind="ssh", remote_dir="/x",
        log_path="l", pid_path="p", exit_path="e", run_dir="d", ts="t", state="RUNNING",
        workers=[WorkerRun("w0", "h")],
    )  # fmt: skip
    with api.Sessions(dry_run=True) as sessions:
        # --watch would poll forever if the unpollable run kept the loop going
        api.watch_status(sessions, [record], watch=True, interval=0.01, on_round=rounds.append)
    assert len(rounds) == 1 and rounds[0].machine is None
    assert rounds[0].unreachable[0].startswith("r2: ") and "gone-target" in rounds[0].unreachable[0]
