"""One tiny real-trainer run (configs/tiny_cpu.yaml, shortened) launched through the CLI on the local
target and polled with `grpoctl --json status RUN` about once a second, as a person would watch it.

Shared by every test here (module fixture): the phases it showed with their own k/N, the ETA it gave at
step 1 against the time the run then took (both from the trainer's own timeline in the log, so the check
does not depend on this machine's speed), the human lines of `grpoctl logs`, and the commit it reports.
Takes ~1-4 min (compilation on 2 busy cores); marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from same_run import TINY_SETTINGS, assert_same_run
from typer.testing import CliRunner

from grpoctl_contract.progress import decode
from orchestrator.cli import app

pytest.importorskip("jax", reason="runs the real trainer (tiny model on CPU): needs the trainer extra")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# 4 GRPO steps with an eval after steps 2 and 4, a 30-step warm start, a 2-batch final sweep.
SETTINGS = list(TINY_SETTINGS)


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("phases")
    repo = root / "repo"
    # A repo holding this working tree's trainer as it is now (committed or not): the code under test.
    for name in ("trainer", "grpoctl_contract", "configs"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text(".env\nruns/\nlogs/\nwandb/\n")
    _git(root, "init", "-q", "-b", "main", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "-m", "trainer")
    config = root / "grpoctl.yaml"
    config.write_text(f"targets:\n  local: {{kind: local, workdir: {root / 'wd'}}}\n")
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, ["--config-file", str(config), *args])
        assert result.exit_code == 0, (args, result.output)
        return result.stdout

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)  # the local target clones the current repo by its path
        mp.setenv("GRPOCTL_STATE_DIR", str(root / "state"))
        cli("sync")
        sets = [a for s in SETTINGS for a in ("--set", s)]
        run_id = cli("run", "configs/tiny_cpu.yaml", *sets).strip()
        polls, deadline = [], time.monotonic() + 900
        while time.monotonic() < deadline:
            polls.append(json.loads(cli("--json", "status", run_id)))
            if polls[-1]["state"] in ("SUCCEEDED", "FAILED", "LOST"):
                break
            time.sleep(1.0)
        checkout = root / "wd" / "grpoctl-work"
        yield {
            "run_id": run_id,
            "head": _git(repo, "rev-parse", "HEAD"),
            "polls": polls,
            "logs": cli("logs", run_id, "--lines", "100000"),  # the human lines
            "events": cli("logs", run_id, "--lines", "100000", "--events"),
            "table": cli("status", run_id),
            "summary": json.loads((checkout / "runs" / run_id / "summary.json").read_text()),
            "run_dir": checkout / "runs" / run_id,
        }


def test_status_polled_each_second_shows_phases_each_with_its_own_k_of_n(tiny_run):
    polls = tiny_run["polls"]
    assert polls[-1]["state"] == "SUCCEEDED", tiny_run["logs"][-2000:]
    seen = {(p["phase"]["name"], p["phase"]["n"]) for p in polls if p["phase"] and p["phase"]["n"]}
    names = {name for name, _ in seen}
    assert ("warm_start", 30) in seen and ("train", 4) in seen, seen
    assert names & {"eval", "final_sweep", "start_sweep"}, seen  # a sweep, batch k of M
    for p in polls:
        phase = p["phase"]
        if phase and phase["n"]:
            assert 0 <= phase["k"] <= phase["n"] and phase["text"]
    assert polls[-1]["phase"]["name"] == "done" and polls[-1]["phase"]["eta_s"] == 0


def test_every_event_from_step_1_on_carries_an_eta(tiny_run):
    # How good the ETA is is wall-clock arithmetic, checked with a fake clock in
    # tests/test_progress_contract.py (a timed assertion here failed under load, not for a bug).
    events = [e for e in map(decode, tiny_run["events"].splitlines()) if e is not None]
    step1 = next(i for i, e in enumerate(events) if e.event == "progress" and e.step == 1)
    later = [e for e in events[step1:] if e.event in ("progress", "phase") and e.phase != "compile"]
    assert later and all(e.eta_s is not None and e.eta_s >= 0 for e in later)
    assert events[step1].eta_s > 0


def test_logs_hold_a_human_line_for_each_phase(tiny_run):
    human = [line for line in tiny_run["logs"].splitlines() if line.startswith("[trainer +")]
    for phrase in (
        "] setup: mesh",
        "] model load: ",
        "] data load: ",
        "] compile ",
        "] warm start step 30/30",
        "] train step 4/4",
        "] eval batch 1/1",
        "] checkpoint: saving step 4",
        "] final sweep batch 3/3",  # 16 questions: 2 greedy batches of 8, 1 sampled batch of 16 x n
        "] done (step 4/4)",
    ):
        assert any(phrase in line for line in human), (phrase, human)
    assert not any(decode(line) is not None for line in human)  # people's lines never read as events


def test_status_reports_the_commit_it_was_launched_from_and_the_config_hash(tiny_run):
    last = tiny_run["polls"][-1]
    assert last["git_commit"] == tiny_run["head"]
    assert last["config_hash"] == tiny_run["summary"]["config_hash"] and last["wandb_url"] is None
    assert f"commit: {tiny_run['head']}" in tiny_run["table"]
    assert f"config hash: {last['config_hash']}" in tiny_run["table"]


def test_status_holds_the_runs_time_ledger_adding_up_to_its_wall_time(tiny_run):
    from datetime import datetime

    last = tiny_run["polls"][-1]
    ledger = last["ledger"]
    seconds = ledger["seconds"]
    wall = datetime.fromisoformat(last["finished_at"]) - datetime.fromisoformat(last["created_at"])
    assert sum(seconds.values()) == pytest.approx(wall.total_seconds(), rel=0.10), seconds
    assert sum(seconds.values()) == pytest.approx(last["ended_at_s"] - last["launched_at_s"], rel=0.01)
    assert seconds["compile"] > 0 and seconds["train"] > 0 and seconds["warm_start"] > 0, seconds
    assert seconds["eval"] > 0 and seconds["bootstrap"] > 0, seconds  # sweeps; setup, loads, start-up
    assert seconds["lost_progress"] == seconds["recovery"] == 0
    assert 0 < ledger["goodput"] < 1 and ledger["devices"] == 1  # the local target: one host, one device
    assert ledger["chip_hours"] == pytest.approx(sum(seconds.values()) / 3600, rel=0.01)
    assert ledger["cost_estimate_usd"] is None and "set prices.host" in ledger["price"]
    assert "ledger: " in tiny_run["table"] and "goodput" in tiny_run["table"]
    # the trainer's share of it, in its summary (and W&B)
    summary = tiny_run["summary"]
    assert summary["time/phase/train_s"] > 0 and summary["time/phase/compile_s"] > 0
    assert 0 < summary["time/phase/goodput"] < 1


def test_the_run_through_grpoctl_is_the_direct_trainer_run_to_the_bit(tiny_run, tmp_path):
    """Determinism through the CLI: the same config and seed run in this process by trainer.train.run give
    the same metrics.jsonl rows and every eval_full*.jsonl row as the run `grpoctl run` launched."""
    from trainer import config as C
    from trainer.train import run

    run(C.load(ROOT / "configs" / "tiny_cpu.yaml", SETTINGS, environ={}), tmp_path)
    assert_same_run(tiny_run["run_dir"], tmp_path)
