"""Issue 10 (part B): every error a user can cause is one line with exit 2 or 3, global options anywhere,
fetch never mixes or loses copies. All on the local target or none at all: ~10 s in total."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import cli_error
from typer.testing import CliRunner

from orchestrator.cli import app, hoist_global_options
from orchestrator.runs import RunRecord, RunStore, state_dir


def ok(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


# ----------------------------------------------------------------------- global options, default target


def test_global_options_after_the_command_with_a_single_target(folder: Path):
    # Only one target, no default_target: it is the default, and --target may follow the command.
    (folder / "grpoctl.yaml").write_text(f"targets:\n  lab: {{kind: local, workdir: {folder / 'wd'}}}\n")
    assert ok("up", "--target", "lab").strip() == "lab: READY (1 worker(s))"
    assert ok("up").strip() == "lab: READY (1 worker(s))"
    assert json.loads(ok("up", "--json", "--target=lab"))["target"] == "lab"
    assert json.loads(ok("status", "--config-file", "grpoctl.yaml", "-v", "--json")) == []
    assert "unknown target 'nope'" in cli_error("up", "--target", "nope", code=2)


def test_target_makes_a_stale_default_target_irrelevant(folder: Path):
    cfg = {"targets": {"a": {"kind": "local"}, "b": {"kind": "local"}}, "default_target": "gone"}
    (folder / "grpoctl.yaml").write_text(yaml.safe_dump(cfg))
    assert ok("up", "--target", "b").startswith("b: READY")
    assert "default_target 'gone' is not one of the targets" in cli_error("up", code=2)
    del cfg["default_target"]  # two targets, no default, no `local`: say what to do
    (folder / "grpoctl.yaml").write_text(yaml.safe_dump(cfg))
    assert "pass --target NAME" in cli_error("status", code=2)


def test_hoisting_keeps_values_of_the_commands_own_options():
    root = __import__("typer").main.get_command(app)
    args = ["run", "c.yaml", "-e", "--json", "--set", "x=1", "--target", "lab", "--dry-run", "--", "-v"]
    assert hoist_global_options(root, args) == [
        "--target",
        "lab",
        "--dry-run",
        *["run", "c.yaml", "-e", "--json", "--set", "x=1", "--", "-v"],
    ]
    nested = ["--json", "env", "push", "-f", "x.env", "--config-file=c.yaml"]
    assert hoist_global_options(root, nested) == [
        "--config-file=c.yaml",
        "--json",
        "env",
        "push",
        "-f",
        "x.env",
    ]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["up", "--bogus"], "No such option: --bogus"),
        (["run"], "Missing argument 'config'"),
        (["status", "--interval", "-1"], "'--interval'"),
        (["run", "c.yaml", "--wait", "--stall-after", "0"], "'--stall-after'"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_command_line_mistakes_are_one_line(folder: Path, args: list[str], words: str):
    line = cli_error(*args, code=2)
    assert words in line and "--help" in line


@pytest.mark.parametrize("args", [[], ["env"], ["sop"]])
def test_a_group_alone_shows_its_help_not_an_error(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (args, result.output)  # click's code for "help instead of a command"
    assert "Usage:" in result.output and "Commands" in result.output
    assert "grpoctl: error" not in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------- config and files


@pytest.mark.parametrize(
    ("target", "key"),
    [
        ({"kind": "ssh", "hosts": ["h"], "connect_timeout_s": -5}, "connect_timeout_s"),
        ({"kind": "ssh", "hosts": ["h:70000"]}, "hosts"),
        ({"kind": "ssh", "hosts": ["h:0"]}, "hosts"),
        ({"kind": "tpu", "project": "p", "zone": "us-east1-d", "name": "n", "poll_s": 0}, "poll_s"),
        ({"kind": "tpu", "project": "p", "zone": "us-east1-d", "name": "n", "ssh_port": 65536}, "ssh_port"),
        (
            {"kind": "tpu", "project": "p", "zone": "us-east1-d", "name": "n", "up_timeout_s": -1},
            "up_timeout",
        ),
    ],
)
def test_out_of_range_values_are_config_errors(folder: Path, target: dict, key: str):
    (folder / "grpoctl.yaml").write_text(yaml.safe_dump({"targets": {"lab": target}}))
    line = cli_error("status", code=2)
    assert "grpoctl.yaml" in line and key in line
    assert "stall_after_s" in cli_error(
        "--config-file", _write(folder, {"stall_after_s": 0}), "status", code=2
    )


def _write(folder: Path, cfg: dict) -> str:
    path = folder / "other.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_config_and_sop_files_that_are_not_utf8(folder: Path):
    (folder / "grpoctl.yaml").write_bytes(b"targets:\n  lab: {kind: local, workdir: caf\xe9}\n")
    line = cli_error("status", code=2)
    assert "grpoctl.yaml: line 2: not UTF-8" in line and "0xe9" in line
    (folder / "grpoctl.yaml").unlink()
    (folder / "s.yaml").write_bytes(b"name: s\n# \xff\xfe\nsteps: [up]\n")
    assert "s.yaml: line 2: not UTF-8" in cli_error("sop", "replay", "s.yaml", code=2)


def test_result_files_that_are_not_utf8(folder: Path):
    a, b = _run_folder(folder, "A", [True, False]), _run_folder(folder, "B", [True, True])
    (b / "eval_full.jsonl").write_bytes(b'{"id": "q0", "correct": true, "answer": "\xff"}\n')
    line = cli_error("compare", str(a), str(b), code=2)
    assert "eval_full.jsonl: line 1: not UTF-8" in line


def test_corrupt_state_database_is_moved_aside_and_said_where(folder: Path):
    db = state_dir() / "runs.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"this is not an sqlite file at all, just junk " * 50)
    line = cli_error("status", code=3)
    aside = [p for p in db.parent.iterdir() if p.name.startswith("runs.sqlite.corrupt-")]
    assert len(aside) == 1 and str(aside[0]) in line and "unreadable" in line
    assert aside[0].read_bytes().startswith(b"this is not an sqlite file")  # kept, not deleted
    assert "run id" in ok("status")  # the next command starts a fresh store


def test_must_show_errors_through_the_real_entry_point(folder: Path):
    """The three errors of the issue's list, through `python -m orchestrator` (not CliRunner): ~4 s."""
    env = {**os.environ, "GRPOCTL_STATE_DIR": str(folder / "state")}

    def real(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
        return done

    (folder / "state").mkdir()
    (folder / "state" / "runs.sqlite").write_bytes(b"\x00garbage" * 100)
    assert real("status").returncode == 3
    (folder / "grpoctl.yaml").write_bytes(b"targets: {lab: {kind: local, workdir: \xff}}\n")
    assert real("status").returncode == 2
    (folder / "grpoctl.yaml").write_text("targets: {lab: {kind: ssh, hosts: [h], connect_timeout_s: -5}}\n")
    assert "connect_timeout_s" in real("up", "--target", "lab").stderr


def test_state_database_deleted_between_commands(tmp_path: Path):
    store = RunStore(tmp_path / "state" / "runs.sqlite")
    record = RunRecord("r-1", "c.yaml", "local", "local", "/w", "l", "p", "e", "runs/r-1", "ts")
    store.save(record)
    (tmp_path / "state" / "runs.sqlite").unlink()  # e.g. a cleanup script, while grpoctl runs
    assert store.list() == []
    store.save(record)
    assert store.get("r-1").run_id == "r-1"
    (tmp_path / "state" / "runs.sqlite").unlink()
    (tmp_path / "state").rmdir()
    assert store.list() == []


def test_unwritable_state_folder_is_one_line(folder: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(folder / "state"))
    (folder / "state").mkdir()
    (folder / "state" / "runs.sqlite").mkdir()  # a folder where the database file should be
    assert "state database" in cli_error("status", code=3)


# ------------------------------------------------------------------------------------- confined paths


def _run_folder(root: Path, name: str, correct: list[bool]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"eval_full/accuracy": sum(correct) / len(correct)}))
    (run / "eval_full.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "correct": c}) + "\n" for i, c in enumerate(correct))
    )
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    return run


def test_compare_plot_never_creates_folders(folder: Path):
    a, b = _run_folder(folder, "A", [True, False] * 5), _run_folder(folder, "B", [True] * 10)
    top = Path("/") / f"grpoctl-test-{uuid.uuid4().hex[:8]}"  # at the filesystem root, like the report
    try:
        line = cli_error("compare", str(a), str(b), "--plot", str(top / "such" / "p.png"), code=2)
        assert "does not exist" in line
        assert not top.exists()
    finally:
        if top.exists():  # today's main made it: leave the machine clean
            import shutil

            shutil.rmtree(top)
    assert ".png" in cli_error("compare", str(a), str(b), "--plot", "p.txt", code=2)
    assert "plot: p.png" in ok("compare", str(a), str(b), "--plot", "p.png")
    assert (folder / "p.png").stat().st_size > 1000


def test_sop_run_names_cannot_escape_the_report_folder(folder: Path):
    sop = folder / "sub" / "s.yaml"
    sop.parent.mkdir()
    steps = [{"run": {"name": "../../x", "config": "c.yaml"}}, {"run": {"name": "b", "config": "c.yaml"}}]
    sop.write_text(yaml.safe_dump({"name": "s", "steps": [*steps, {"compare": {"a": "../../x", "b": "b"}}]}))
    line = cli_error("sop", "replay", str(sop), code=2)
    assert "steps.0.run.name" in line and "'../../x'" in line
    assert sorted(p.name for p in folder.iterdir()) == ["sub"]  # nothing written anywhere


# ------------------------------------------------------------------------------------------------ fetch


def test_fetch_keeps_the_earlier_copy_and_never_mixes_two_fetches(tmp_path: Path):
    from orchestrator.config import LocalTargetConfig, RepoConfig
    from orchestrator.ops import fetch as fetch_ops
    from orchestrator.targets import build_target

    work = tmp_path / "wd"
    target = build_target("local", LocalTargetConfig(workdir=str(work)), RepoConfig())
    checkout = work / "grpoctl-work"
    run_dir = _run_folder(checkout / "runs", "r-1", [True, False])
    record = RunRecord("r-1", "c.yaml", "local", "local", str(checkout), "l", "p", "e", "runs/r-1", "ts")
    dest = tmp_path / "runs"

    first = fetch_ops.fetch(target, record, dest)
    assert first.previous is None and sorted(first.files) == [
        "eval_full.jsonl",
        "metrics.jsonl",
        "summary.json",
    ]
    again = fetch_ops.fetch(target, record, dest)  # identical: nothing moves
    assert again.previous is None and not (dest / "r-1.prev").exists()

    (run_dir / "eval_full.jsonl").unlink()  # the run changed: a file is gone, the summary differs
    (run_dir / "summary.json").write_text(json.dumps({"eval_full/accuracy": 0.9}))
    second = fetch_ops.fetch(target, record, dest)
    assert second.previous == dest / "r-1.prev"
    assert sorted(p.name for p in (dest / "r-1").iterdir()) == [
        "metrics.jsonl",
        "summary.json",
    ]  # no stale file
    assert json.loads((dest / "r-1" / "summary.json").read_text()) == {"eval_full/accuracy": 0.9}
    assert sorted(p.name for p in (dest / "r-1.prev").iterdir()) == sorted(first.files)
    assert json.loads((dest / "r-1.prev" / "summary.json").read_text()) == {"eval_full/accuracy": 0.5}
    assert sorted(p.name for p in dest.iterdir()) == ["r-1", "r-1.prev"]  # no half-written staging folders

    (run_dir / "summary.json").write_text("{}")
    (run_dir / "metrics.jsonl").unlink()
    fetch_ops.fetch(target, record, dest)  # the .prev is always the copy just before this one
    assert json.loads((dest / "r-1.prev" / "summary.json").read_text()) == {"eval_full/accuracy": 0.9}
