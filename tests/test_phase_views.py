"""How phases reach people on the laptop side, without a trainer: the plain (non-terminal) phase view,
bootstrap stages streamed from a real bash run of the bootstrap recipe (stub python), the commit a launch
records, the identity a poll picks up from the trainer's info line, and the SOP report showing them."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from grpoctl_contract.progress import Event, encode
from orchestrator import recipes
from orchestrator.lifecycle.monitor import probe
from orchestrator.ops import sync as sync_ops
from orchestrator.ops import watch as watch_ops
from orchestrator.phaseview import PhaseView
from orchestrator.runs import RunRecord, WorkerRun
from orchestrator.transport.base import CommandResult
from orchestrator.transport.local import LocalTransport


def _progress(ev: Event) -> Event:
    parsed = recipes.parse_progress_line(encode(ev))
    assert parsed is not None
    return parsed


def test_plain_view_prints_phase_changes_not_every_unit_and_the_last_state():
    out = io.StringIO()
    with PhaseView(Console(file=out, width=200), "run-1", plain_every_s=3600) as view:
        for k in range(31):
            view.show("RUNNING", _progress(Event("phase", "warm_start", k=k, n=30, step=0, total=4)))
        for k in range(1, 5):
            view.show("RUNNING", _progress(Event("progress", "train", k=k, n=4, step=k, total=4, eta_s=9.0)))
        view.show("RUNNING", _progress(Event("phase", "final_sweep", k=1, n=2, step=4, total=4, eta_s=3)))
    lines = out.getvalue().splitlines()
    assert lines == [
        "run-1: warm start step 0/30, eta ?",
        "run-1: train step 1/4, eta 0:09",
        "run-1: final sweep batch 1/2, eta 0:03",
    ]


def test_terminal_view_draws_one_bar_per_phase():
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True)
    with PhaseView(console, "run-1") as view:
        view.show("RUNNING", _progress(Event("phase", "eval", k=1, n=2, step=2, total=4, eta_s=5)))
    assert "eval batch 1/2, eta 0:05" in out.getvalue()


def _stub_python(folder: Path) -> None:
    """`python3.1x` / `python3` that say they are >= 3.11, make a venv of themselves, install nothing
    (first on PATH, so the recipe never finds the real interpreters)."""
    make_venv = 'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi'
    text = f"#!/bin/sh\n{make_venv}\n"
    for name in ("python3.13", "python3.12", "python3.11", "python3"):
        stub = folder / name
        stub.write_text(text + "exit 0\n")
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)


def test_bootstrap_streams_its_stages(tmp_path: Path, monkeypatch):
    _stub_python(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    target = SimpleNamespace(python=None, transports=lambda: [LocalTransport("w0 stub")])
    session = SimpleNamespace(target=target, kind="ssh", remote_dir=str(checkout))
    stages: list[tuple[str, int, int, str]] = []
    pythons = sync_ops.bootstrap(session, extras=("trainer",), on_stage=lambda *s: stages.append(s))
    assert [s[1:3] for s in stages] == [(1, 3), (2, 3), (3, 3)] and stages[2][3] == "install the trainer"
    assert pythons == {"w0 stub": f"{checkout}/.venv/bin/python"}


class _Worker:
    """A transport that answers a status probe with a given log tail."""

    name = "w0 fake"

    def __init__(self, stdout: str) -> None:
        self.stdout = stdout

    def run(self, script: str, **_: object) -> CommandResult:
        return CommandResult(self.name, 0, self.stdout, "", 0.0)


def _record() -> RunRecord:
    return RunRecord(run_id="r-1", config="configs/x.yaml", target="t", target_kind="ssh", remote_dir="/x",
                     log_path="logs/a.log", pid_path="logs/a.pid", exit_path="logs/a.exit",
                     run_dir="runs/r-1", ts="t", workers=[WorkerRun("w0", "h")])


def test_launch_records_the_checkouts_commit_and_poll_the_trainers_identity():
    head = "0123456789abcdef0123456789abcdef01234567"
    assert recipes.parse_launch_head(f"HEAD={head}\nPID=42\n") == head
    assert recipes.parse_launch_head("HEAD=\nPID=42\n") is None  # not a git checkout: unknown, not ""
    assert 'echo "HEAD=$(git rev-parse HEAD' in recipes.launch(
        "/x", "py", "c.yaml", recipes.RunPaths.for_run("c", "ts", "c-1"), config_stem="c"
    )
    info = encode(Event("info", "setup", info={"config_hash": "c0ffee", "wandb_url": "https://wandb.ai/e/p/runs/x"}))
    line = encode(Event("phase", "final_sweep", k=3, n=11, step=100, total=100, eta_s=40.0))
    record = _record()
    probe(SimpleNamespace(transports=lambda: [_Worker(f"ALIVE=1\nPROGRESS={line}\nINFO={info}\n")]),
                   record)
    assert (record.config_hash, record.wandb_url) == ("c0ffee", "https://wandb.ai/e/p/runs/x")
    phase = watch_ops.phase_json(record)
    assert phase == {"name": "final_sweep", "k": 3, "n": 11, "eta_s": 40.0, "phase_eta_s": None,
                     "detail": None, "text": "final sweep batch 3/11"}


def test_sop_report_shows_commit_config_hash_and_wandb_url(tmp_path: Path):
    from orchestrator import sop

    record = _record()
    record.state, record.git_commit, record.config_hash = "SUCCEEDED", "ab" * 20, "c0ffee"
    record.wandb_url = "https://wandb.ai/e/p/runs/x"
    parsed = sop.parse_sop({"name": "s", "steps": [{"run": {"name": "a", "config": "c.yaml"}}]}, "s.yaml")
    state = sop.ReplayState("s.yaml", {"run:a": sop.StepState(status="done", record=record.to_json())})
    report = tmp_path / "report.md"
    sop.write_report(report, parsed, Path("s.yaml"), state, dry_run=False)
    text = report.read_text()
    assert f"`{'ab' * 6}`" in text and "`c0ffee`" in text and "https://wandb.ai/e/p/runs/x" in text
