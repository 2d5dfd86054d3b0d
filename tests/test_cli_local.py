"""The CLI end to end on the local target, with the stand-in trainer from a `file://` origin."""

from __future__ import annotations

import importlib.util
import json
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from standin import git
from typer.testing import CliRunner

from orchestrator import compare as cmp
from orchestrator.cli import app
from orchestrator.config import RepoConfig
from orchestrator.ops.sync import resolve_repo

SECRET = "sk-local-0123456789abcdef"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, standin_repo):
    """A clean clone as the current folder, a config outside it, a .env with a secret."""
    url, _ = standin_repo
    root = tmp_path_factory.mktemp("cli_local")
    work = root / "clone"
    subprocess.run(["git", "clone", "-q", url, str(work)], check=True)
    config = root / "grpoctl.yaml"
    config.write_text(f"targets:\n  local: {{kind: local, workdir: {root / 'wd'}}}\n")
    (work / ".env").write_text(f"STANDIN_SECRET={SECRET}\nWANDB_MODE=offline\n")
    state = root / "state"
    with pytest.MonkeyPatch.context() as mp:  # every test starts from a synced checkout with the .env
        mp.chdir(work)
        mp.setenv("GRPOCTL_STATE_DIR", str(state))
        for args in (["sync"], ["env", "push"]):
            result = CliRunner().invoke(app, ["--config-file", str(config), *args])
            assert result.exit_code == 0, result.output
    return {
        "root": root,
        "work": work,
        "config": str(config),
        "checkout": root / "wd" / "grpoctl-work",
        "state": state,
    }


@pytest.fixture
def cli(env, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(env["work"])
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(env["state"]))  # one run store for the module's tests
    runner = CliRunner()

    def invoke(*args: str, code: int | None = 0):
        result = runner.invoke(app, ["--config-file", env["config"], *args])
        if code is not None:
            assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
        assert SECRET not in result.output
        return result

    return invoke


def test_sync_and_env_push(cli, env):
    result = cli("sync")
    head = git(env["work"], "rev-parse", "HEAD")
    assert f"HEAD {head[:12]}" in result.stdout
    assert "warning" not in result.stderr  # .env is ignored, the clone is clean and pushed
    pushed = cli("env", "push")
    assert "STANDIN_SECRET_len=25" in pushed.stdout and "WANDB_MODE_len=7" in pushed.stdout
    remote_env = env["checkout"] / ".env"
    assert stat.S_IMODE(remote_env.stat().st_mode) == 0o600
    assert remote_env.read_text() == (env["work"] / ".env").read_text()
    as_json = json.loads(cli("--json", "env", "push").stdout)
    assert as_json["lengths"] == {"STANDIN_SECRET": 25, "WANDB_MODE": 7} and as_json["mode"] == "600"


def test_run_wait_status_logs_fetch_compare(cli, env, tmp_path: Path):
    waited = cli("run", "configs/ok.yaml", "--env", "EVAL_FULL_SWEEP=1", "--wait")
    assert "step 3/3" in waited.stderr  # the progress bar's last state
    a = waited.stdout.split()[0]
    b = cli("run", "configs/ok_b.yaml", "-e", "EVAL_FULL_SWEEP=1", "--wait", "--interval", "0.2")
    b = b.stdout.split()[0]
    assert a.startswith("ok-") and b.startswith("ok_b-")
    status = json.loads(cli("status", a, "--json").stdout)
    assert status["state"] == "SUCCEEDED" and status["last_progress"]["step"] == 3
    assert status["workers"][0]["exit_code"] == 0 and status["workers"][0]["pid"] > 0
    listing = cli("status").stdout
    assert a in listing and b in listing and "SUCCEEDED" in listing
    assert '"event": "done"' in cli("logs", a, "-n", "1", "--events").stdout
    assert '"event"' not in cli("logs", a).stdout  # the human lines only
    fetched = cli("fetch", a, b).stdout
    assert "eval_full/accuracy = " in fetched
    folder_b = env["work"] / "runs" / b
    assert sorted(p.name for p in folder_b.iterdir()) == sorted(
        ["summary.json", "eval_full.jsonl", "metrics.jsonl", "config.json", "wandb-summary.json"]
    )
    summary = json.loads((env["work"] / "runs" / a / "summary.json").read_text())
    assert summary["secret_len"] == len(SECRET)  # the trainer loaded the pushed .env
    png = tmp_path / "curves.png"
    plots = importlib.util.find_spec("matplotlib") is not None  # the plot extra
    if not plots:  # the laptop-only install: refused in one line before anything is fetched
        refused = cli("compare", a, b, "--plot", str(png), code=2).stderr
        assert "pip install 'grpoctl[plot]'" in refused and not png.exists()
    compared = cli("compare", a, b, *(["--plot", str(png)] if plots else [])).stdout
    assert "eval_full/accuracy" in compared and "McNemar exact test on 200 paired questions" in compared
    assert (cmp.NO_DETECTABLE_DIFFERENCE in compared) != (cmp.POLICIES_DIFFER in compared)
    assert "method verdict: inconclusive: one run per arm" in compared  # one run per arm, never more
    assert not plots or png.stat().st_size > 5000
    as_json = json.loads(cli("--json", "compare", a, b).stdout)
    assert as_json["mcnemar"]["n"] == 200 and as_json["keys"][0]["key"] == "eval_full/accuracy"
    assert (as_json["method_verdict"], as_json["margin"]) == ("inconclusive", 0.03)
    assert (as_json["runs_a"], as_json["runs_b"]) == ([a], [b])
    shutil.rmtree(folder_b)  # a run id not fetched yet: compare fetches it first
    assert "McNemar exact test on 200" in cli("compare", a, b).stdout
    assert (folder_b / "summary.json").is_file()


def test_a_failed_runs_last_words_hide_a_value_of_the_workers_own_env(cli, env):
    """The failure hint quotes the job's last log line: a value only the worker's .env holds (pushed once,
    since changed on the laptop) is hidden there as `logs` hides it."""
    cli("sync")
    remote_env = env["checkout"] / ".env"
    kept = remote_env.read_text() if remote_env.exists() else None
    remote_env.write_text("WORKER_ONLY=on purpose\n")
    try:
        line = cli("run", "configs/fail3.yaml", "--wait", code=1).stderr.strip().splitlines()[-1]
    finally:
        remote_env.unlink()
        if kept is not None:
            remote_env.write_text(kept)
            remote_env.chmod(0o600)
    assert line.endswith("exit code 3; w0 log: failing *** with 3"), line


def test_failed_run_exit_code_and_one_line_error(cli):
    result = cli("-v", "run", "configs/fail3.yaml", "--wait", code=1)
    assert "w0 localhost: pid " in result.stderr  # -v says where things are
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("grpoctl: error: run fail3-") and "w0" in lines[-1]
    assert lines[-1].endswith("exit code 3; w0 log: failing on purpose with 3")  # the job's last words
    assert "Traceback" not in result.output


def test_run_returns_at_once_busy_refusal_force_and_stop(cli, env):
    slow = cli("run", "configs/slow.yaml").stdout.strip()
    try:  # a 60 s job: the id came back while it still runs
        assert json.loads(cli("status", slow, "--json").stdout)["state"] == "RUNNING"
        refused = cli("run", "configs/ok.yaml", code=2)
        assert "busy" in refused.stderr and "--force" in refused.stderr
        forced = cli("run", "configs/ok.yaml", "--force", "--wait").stdout
        assert "SUCCEEDED" in forced
    finally:
        stopped = cli("stop", slow).stdout
    assert "STOPPED" in stopped  # stopped by the user, not failed (the trap wrote 143 for the TERM)
    status = json.loads(cli("status", slow, "--json").stdout)
    assert status["workers"][0]["exit_code"] == 143


def test_logs_redact_local_env_values_and_follow(cli):
    run_id = cli("run", "configs/leaky.yaml").stdout.strip()
    followed = cli("logs", run_id, "--follow")
    assert "leaked: ***" in followed.stdout
    assert "SUCCEEDED" in followed.stderr
    assert "leaked: ***" in cli("logs", run_id).stdout


def test_sync_warns_on_dirty_tree_and_local_target_takes_local_commits(cli, env):
    work = env["work"]
    (work / "scratch.txt").write_text("x")
    git(
        work, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "local only"
    )
    try:
        synced = cli("sync")
        assert "uncommitted changes" in synced.stderr
        # The local target clones this repo itself: it gets the local commit, nothing to push first.
        assert f"HEAD {git(work, 'rev-parse', 'HEAD')[:12]}" in synced.stdout
        assert "not pushed" not in synced.stderr
        # A remote target gets origin's tip: the same commit is reported as not pushed.
        remote = SimpleNamespace(kind="ssh", dry_run=False, repo=RepoConfig())
        assert any("1 local commit(s)" in w for w in resolve_repo(remote, work).warnings)
    finally:
        (work / "scratch.txt").unlink()
        git(work, "reset", "-q", "--hard", "origin/main")


def test_local_target_syncs_a_repo_without_remote_from_its_own_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standin_repo,
):
    _, work = standin_repo
    lonely = tmp_path / "lonely"
    subprocess.run(["git", "clone", "-q", str(work), str(lonely)], check=True)
    git(lonely, "remote", "remove", "origin")
    monkeypatch.chdir(lonely)
    (tmp_path / "g.yaml").write_text(f"targets:\n  local: {{kind: local, workdir: {tmp_path / 'wd'}}}\n")
    result = CliRunner().invoke(app, ["--config-file", str(tmp_path / "g.yaml"), "--json", "sync"])
    assert result.exit_code == 0, result.output
    synced = json.loads(result.stdout)
    assert synced["url"] == str(lonely) and synced["branch"] == "main"
    assert list(synced["heads"].values()) == [git(lonely, "rev-parse", "HEAD")]


def test_two_launches_of_one_config_in_the_same_second_get_distinct_logs(cli, env, monkeypatch):
    from orchestrator import runs

    monkeypatch.setattr(runs, "utc_stamp", lambda now=None: "20260101_000000")
    monkeypatch.setattr("orchestrator.ops.launch.utc_stamp", lambda now=None: "20260101_000000")
    first = cli("run", "configs/ok.yaml", "--wait", "--interval", "0.2").stdout.split()[0]
    stamps = iter(["20260101_000000", "20260101_000001"])  # the retry waits for the clock to move
    monkeypatch.setattr("orchestrator.ops.launch.utc_stamp", lambda now=None: next(stamps, "20260101_000001"))
    second = cli("run", "configs/ok.yaml", "--wait", "--interval", "0.2").stdout.split()[0]
    logs = sorted(p.name for p in (env["checkout"] / "logs").glob("nohup_ok_20260101_*.log"))
    assert first != second and logs == ["nohup_ok_20260101_000000.log", "nohup_ok_20260101_000001.log"]
