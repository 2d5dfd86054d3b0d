"""Nothing lost, nothing injected, no orphans (issue 10, part A), on a real OpenSSH server on 127.0.0.1.

The worker is this machine seen through a private sshd with its own HOME; the stand-in trainer comes from
a `file://` bare repo. A `setsid` shim first on the worker's PATH can slow the start of a job down (when a
flag file exists) so that races and interrupts hit the launch window every time, not by luck.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ps_during
from standin import git
from typer.testing import CliRunner

from grpoctl_contract.rundir import RunPaths
from orchestrator import recipes
from orchestrator.cli import app
from orchestrator.transport.local import LocalTransport
from orchestrator.transport.ssh import SshTransport

SECRET = "sk-e-flag-5b4a3c2d1e0f"  # given with -e: must show up nowhere


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, standin_repo):
    from conftest import _require_sshd

    from grpoctl_testing.sshd import LoopbackSshd

    _require_sshd()
    url, _ = standin_repo
    root = tmp_path_factory.mktemp("reliability")
    home, shims = root / "home", root / "shims"
    home.mkdir()
    shims.mkdir()
    slow_flag, entered = root / "slow-setsid", root / "setsid-entered"
    real_setsid = subprocess.run(["bash", "-c", "command -v setsid"], capture_output=True, text=True).stdout
    (shims / "setsid").write_text(
        "#!/bin/sh\n"
        f'if [ -e "{slow_flag}" ]; then touch "{entered}"; sleep 1.5; fi\n'
        f'exec {real_setsid.strip()} "$@"\n'
    )
    (shims / "setsid").chmod(0o755)
    # python3 fails while `broken_python` exists: the worker-side .env check cannot run.
    broken_python = root / "broken-python"
    real_python3 = subprocess.run(["bash", "-c", "command -v python3"], capture_output=True, text=True).stdout
    (shims / "python3").write_text(
        f'#!/bin/sh\nif [ -e "{broken_python}" ]; then echo "python3: broken" >&2; exit 1; fi\n'
        f'exec {real_python3.strip()} "$@"\n'
    )
    (shims / "python3").chmod(0o755)
    server = LoopbackSshd(
        root / "sshd", session_env={"HOME": str(home), "PATH": f"{shims}:{os.environ['PATH']}"}
    ).start()
    work = root / "clone"
    subprocess.run(["git", "clone", "-q", url, str(work)], check=True)
    yield {
        "url": url,
        "root": root,
        "home": home,
        "work": work,
        "server": server,
        "slow_flag": slow_flag,
        "entered": entered,
        "broken_python": broken_python,
    }
    server.stop()


def _config(lab: dict, remote_dir: str | Path, name: str) -> str:
    from conftest import ssh_target_fields

    path = lab["root"] / f"{name}.yaml"
    target = ssh_target_fields(lab["server"], python=sys.executable, connect_timeout_s=3.0)
    repo = {"url": lab["url"], "branch": "main", "remote_dir": str(remote_dir)}
    path.write_text(yaml.safe_dump({"repo": repo, "targets": {"w": target}, "default_target": "w"}))
    return str(path)


@pytest.fixture
def grpoctl(lab, monkeypatch: pytest.MonkeyPatch):
    """`grpoctl(config, *args, code=0)` in-process; the secret must be in no output of any command."""
    monkeypatch.chdir(lab["work"])
    runner = CliRunner()

    def invoke(config: str, *args: str, code: int | None = 0):
        result = runner.invoke(app, ["--config-file", config, *args])
        if code is not None:
            assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
        assert SECRET not in result.output
        return result

    return invoke


def _cli_process(config: str, *args: str, cwd: Path) -> subprocess.Popen[str]:
    """grpoctl as its own process (for true concurrency and for Ctrl-C)."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--config-file", config, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (`.git` included) -> hash of its bytes and its mode."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(folder))] = f"{digest} {oct(p.stat().st_mode)}"
    return out


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("grpoctl: error: "), stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- sync


def _foreign_repo(folder: Path, origin: str) -> None:
    folder.mkdir(parents=True)
    git(folder, "init", "-q", "-b", "main")
    (folder / "thesis.tex").write_text("chapter 1\n")
    git(folder, "add", "thesis.tex")
    git(folder, "-c", "user.email=u@example.com", "-c", "user.name=u", "commit", "-q", "-m", "mine")
    git(folder, "remote", "add", "origin", origin)
    (folder / "thesis.tex").write_text("chapter 1\nchapter 2, not committed yet\n")
    (folder / "notes.txt").write_text("untracked and precious\n")


def test_sync_leaves_a_foreign_repo_byte_identical(lab, grpoctl):
    """A user's own repo at remote_dir (origin, a commit, an uncommitted edit, an untracked file), and a
    clone of the very repo.url holding the user's edits: both refused with one line, exit 2, untouched."""
    for name, origin in (("foreign", "https://example.com/someone/else.git"), ("same-url", lab["url"])):
        folder = lab["home"] / name
        _foreign_repo(folder, origin)
        before = _snapshot(folder)
        result = grpoctl(_config(lab, folder, name), "sync", "--no-bootstrap", code=2)
        assert "refusing to touch it" in _one_error_line(result.stderr)
        assert _snapshot(folder) == before, name


def test_sync_keeps_untracked_files_and_refuses_while_a_job_runs(lab, grpoctl):
    folder = lab["home"] / "ours"
    config = _config(lab, folder, "ours")
    grpoctl(config, "sync", "--no-bootstrap")
    (folder / "my-notes.txt").write_text("keep me\n")
    (folder / "configs" / "ok.yaml").write_text("steps: 999\n")  # a tracked edit: workers run origin's code
    grpoctl(config, "sync", "--no-bootstrap")
    assert (folder / "my-notes.txt").read_text() == "keep me\n"
    assert "999" not in (folder / "configs" / "ok.yaml").read_text()
    run_id = grpoctl(config, "run", "configs/slow.yaml").stdout.strip()
    try:
        (folder / "my-notes.txt").unlink()
        (folder / "stray.txt").write_text("x")
        refused = grpoctl(config, "sync", "--no-bootstrap", code=2)
        assert "a job runs in the checkout" in _one_error_line(refused.stderr)
        assert (folder / "stray.txt").exists()
    finally:
        grpoctl(config, "stop", run_id)
    # An untracked file where origin has a tracked one: refused, the file kept.
    (folder / "stray.txt").unlink()
    git(folder, "reset", "-q", "--hard", "HEAD")
    git(folder, "rm", "-q", "--cached", "configs/ok.yaml")
    git(folder, "-c", "user.email=u@example.com", "-c", "user.name=u", "commit", "-q", "-m", "local")
    (folder / "configs" / "ok.yaml").write_text("mine now\n")
    refused = grpoctl(config, "sync", "--no-bootstrap", code=2)
    assert "would be overwritten" in _one_error_line(refused.stderr)
    assert (folder / "configs" / "ok.yaml").read_text() == "mine now\n"


# ---------------------------------------------------------------------------------------- quoting


def _hostile_dir(lab: dict, markers: Path, parent: str = "hostile") -> Path:
    """A folder name with spaces, both quotes, `$()`, backticks, `;`, a newline and `EXIT`; each
    embedded command would create a marker (absolute paths without spaces, so an injection really does)."""
    name = (
        f"a b'c\"d $(touch {markers}/m1) `touch {markers}/m2`;touch {markers}/m3;"
        f"\n' EXIT;touch {markers}/m4;'$IFS"
    )
    return lab["root"] / parent / name


def test_hostile_remote_dir_sync_env_push_run_logs_stop(lab, grpoctl):
    markers = lab["root"] / "markers-cli"
    markers.mkdir()
    folder = _hostile_dir(lab, markers)
    config = _config(lab, folder, "hostile")
    grpoctl(config, "sync", "--no-bootstrap")
    assert (folder / "trainer" / "__main__.py").is_file()
    env = lab["root"] / "hostile.env"
    env.write_text(f"STANDIN_SECRET={SECRET}x\nUNI=pässwörd\n")
    pushed = grpoctl(config, "env", "push", "--file", str(env)).stdout
    assert f"STANDIN_SECRET_len={len(SECRET) + 1}" in pushed
    assert "UNI_len=10" in pushed  # bytes on both ends (a non-ASCII value once read as a mismatch)
    assert not list(folder.glob(".env.grpoctl-*"))  # nothing left beside the live file
    assert stat.S_IMODE((folder / ".env").stat().st_mode) == 0o600
    assert (folder / ".env").read_bytes() == env.read_bytes()
    args = ("configs/ok.yaml", "-e", "EVAL_FULL_SWEEP=1", "--wait", "--interval", "0.2")
    waited = grpoctl(config, "run", *args)
    run_id = waited.stdout.split()[0]
    summary = json.loads((folder / "runs" / run_id / "summary.json").read_text())
    assert summary["secret_len"] == len(SECRET) + 1  # the .env reached the job
    assert (folder / "runs" / run_id / "eval_full.jsonl").is_file()  # and so did the -e value
    grpoctl(config, "logs", run_id)
    slow = grpoctl(config, "run", "configs/slow.yaml").stdout.strip()
    grpoctl(config, "stop", slow)
    assert json.loads(grpoctl(config, "status", slow, "--json").stdout)["state"] == "FAILED"
    assert sorted(p.name for p in markers.iterdir()) == []


def test_every_recipe_and_transport_method_quotes_hostile_paths(lab, standin_repo):
    """Each recipe's shell text and each transport call, on the real sshd and on the local transport."""
    url, _ = standin_repo
    server = lab["server"]
    ssh = SshTransport(
        server.host, server.port, user=server.user, key_file=server.client_key,
        host_key_sha256=[server.host_key_sha256], name="w0",
    )
    markers = lab["root"] / "markers-recipes"
    markers.mkdir()
    for transport in (ssh, LocalTransport()):
        kind = type(transport).__name__
        folder = _hostile_dir(lab, markers, f"hostile-{kind}")
        ck = str(folder)
        hostile = folder.name  # the last path component: `m4;'$IFS`
        assert transport.run(recipes.sync(ck, url, "main"), timeout=60).ok
        # transport methods: run with a hostile cwd and env value, put/get at a hostile path
        run = transport.run('printf "%s" "$V"', env={"V": hostile}, cwd=ck, timeout=30)
        assert run.ok and run.stdout == hostile
        transport.put(b"payload", f"{ck}/{hostile}.bin", mode=0o600)
        assert transport.get(f"{ck}/{hostile}.bin") == b"payload"
        assert stat.S_IMODE(Path(f"{ck}/{hostile}.bin").stat().st_mode) == 0o600
        # bootstrap, with an interpreter already in place (no pip download in tests)
        venv = folder / ".venv" / "bin"
        venv.mkdir(parents=True)
        (venv / "python").write_text("#!/bin/sh\nexit 0\n")
        (venv / "python").chmod(0o755)
        booted = transport.run(recipes.bootstrap(ck, ["trainer"]), timeout=60)
        assert booted.ok and f"PYTHON={ck}/.venv/bin/python" in booted.stdout
        transport.put(b"K=v\n", f"{ck}/.env.pending", mode=0o600)
        transport.put(recipes.ENVFILE_SOURCE, f"{ck}/{hostile}.py")
        verified = transport.run(recipes.env_verify(f"{ck}/.env.pending", f"{ck}/{hostile}.py")).stdout
        assert recipes.parse_env_verify(verified) == ("600", {"K": 1})
        assert transport.run(recipes.env_install(f"{ck}/.env.pending", f"{ck}/.env")).ok
        assert transport.run(recipes.remove_file(f"{ck}/.env")).ok
        paths = RunPaths.for_run("ok", f"{time.time_ns()}", f"ok-{time.time_ns()}")
        transport.put(b"EVAL_FULL_SWEEP=1\n", f"{ck}/{paths.env}", mode=0o600)
        transport.put(recipes.ENVFILE_SOURCE, f"{ck}/{paths.env_loader}", mode=0o600)
        started = transport.run(
            recipes.launch(ck, sys.executable, "configs/ok.yaml", paths, config_stem="ok", env_file=True),
            timeout=60,
        )
        assert started.ok and recipes.parse_pid(started.stdout), started.stderr
        for _ in range(200):
            status = recipes.parse_status(transport.run(recipes.status(ck, paths), timeout=30).stdout)
            if status.state != "RUNNING":
                break
            time.sleep(0.05)
        assert status.state == "SUCCEEDED"
        assert transport.run(recipes.kill(ck, paths, 1), timeout=30).stdout.strip() == "KILL=not-running"
        assert "done" in transport.run(recipes.tail_log(ck, paths.log, 5)).stdout
        assert "progress" in transport.run(recipes.read_log_from(ck, paths.log, 0)).stdout
        found = transport.run(recipes.existing_files(ck, [f"{paths.run_dir}/summary.json", "nope"])).stdout
        assert recipes.parse_files(found) == [f"{paths.run_dir}/summary.json"]
        assert transport.run(recipes.find_wandb_summary(ck, paths.run_dir)).ok
        assert (folder / paths.run_dir / "eval_full.jsonl").is_file()  # the -e file reached the job
    ssh.close()
    assert sorted(p.name for p in markers.iterdir()) == []


def test_env_push_replaces_the_remote_file_only_after_it_checked_out(lab, grpoctl, tmp_path: Path):
    folder = lab["home"] / "envcheck"
    config = _config(lab, folder, "envcheck")
    old, new = tmp_path / "old.env", tmp_path / "new.env"
    old.write_text("TOKEN=old-value\n")
    new.write_text("TOKEN=new-value\n")
    grpoctl(config, "env", "push", "--file", str(old))
    lab["broken_python"].touch()
    try:
        failed = grpoctl(config, "env", "push", "--file", str(new), code=3)
    finally:
        lab["broken_python"].unlink()
    assert "could not verify" in _one_error_line(failed.stderr)
    assert (folder / ".env").read_text() == "TOKEN=old-value\n"  # the live file never changed
    assert sorted(p.name for p in folder.iterdir()) == [".env"]  # no upload left behind


# ---------------------------------------------------------------------------------------- secrets


def test_secrets_are_in_no_output_state_file_or_process_table(lab, grpoctl, tmp_path: Path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(state))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # --secret NAME: the value from the environment
    monkeypatch.setenv("STANDIN_SECRET", SECRET)
    folder = lab["home"] / "secrets"
    config = _config(lab, folder, "secrets")
    grpoctl(config, "sync", "--no-bootstrap")
    outputs: list[str] = []

    def launch_and_look() -> None:
        run_id = grpoctl(config, "run", "configs/slow.yaml", "--secret", "WANDB_API_KEY").stdout.strip()
        time.sleep(0.5)  # the job is up and has read its -e file
        for args in (("status", run_id, "--json"), ("status",), ("logs", run_id), ("--dry-run", "sync")):
            outputs.append(grpoctl(config, *args).output)
        outputs.append(grpoctl(config, "stop", run_id).output)

    seen = ps_during(launch_and_look)
    assert "configs/slow.yaml" in seen  # the sampler did see the job
    assert SECRET not in seen
    assert all(SECRET not in o for o in outputs)
    record = json.loads(outputs[0])
    assert record["env_names"] == ["WANDB_API_KEY"] and "env" not in record
    for f in state.rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f
    # A job that prints the -e value: `logs` redacts it (the value comes from the worker's 0600 file).
    leaky = grpoctl(
        config, "run", "configs/leaky.yaml", "--secret", "STANDIN_SECRET", "--wait", "--interval", "0.2"
    ).stdout.split()[0]
    assert "leaked: ***" in grpoctl(config, "logs", leaky).stdout
    env_file = folder / "logs" / f"{leaky}.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


# -------------------------------------------------------------------------------- races and orphans


@pytest.fixture
def slow_launches(lab):
    """Every job start on the worker takes 1.5 s more (the setsid shim): the launch window is wide open."""
    lab["entered"].unlink(missing_ok=True)
    lab["slow_flag"].touch()
    yield lab["entered"]
    lab["slow_flag"].unlink()


def test_two_simultaneous_runs_one_starts(lab, grpoctl, slow_launches, monkeypatch):
    state = lab["root"] / "state-race"
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(state))
    folder = lab["home"] / "race"
    config = _config(lab, folder, "race")
    grpoctl(config, "sync", "--no-bootstrap")
    procs = [_cli_process(config, "run", "configs/slow.yaml", cwd=lab["work"]) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    try:
        assert codes == [0, 2], results
        refused = next(err for code, _, err in results if code)
        assert "busy" in _one_error_line(refused)
        live = [p for p in (folder / "logs").glob("nohup_slow_2*.pid")]
        assert len(live) == 1
    finally:
        for code, out, _ in results:
            if code == 0:
                grpoctl(config, "stop", out.strip())


def test_ctrl_c_during_launch_leaves_the_job_recorded(lab, grpoctl, slow_launches, monkeypatch):
    state = lab["root"] / "state-sigint"
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(state))
    folder = lab["home"] / "sigint"
    config = _config(lab, folder, "sigint")
    grpoctl(config, "sync", "--no-bootstrap")
    proc = _cli_process(config, "run", "configs/slow.yaml", cwd=lab["work"])
    deadline = time.monotonic() + 60
    while not slow_launches.exists():  # the worker is starting the job right now
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    assert code == 130, proc.communicate()
    pid_files = list((folder / "logs").glob("nohup_slow_2*.pid"))
    assert len(pid_files) == 1  # the job did start
    records = json.loads(grpoctl(config, "status", "--json").stdout)
    assert [r["workers"][0]["pid"] for r in records] == [int(pid_files[0].read_text())]
    assert records[0]["state"] == "RUNNING"
    grpoctl(config, "stop", records[0]["run_id"])


def test_stop_never_signals_a_reused_pid(lab, grpoctl, monkeypatch):
    state = lab["root"] / "state-reuse"
    monkeypatch.setenv("GRPOCTL_STATE_DIR", str(state))
    folder = lab["home"] / "reuse"
    config = _config(lab, folder, "reuse")
    grpoctl(config, "sync", "--no-bootstrap")
    run_id = grpoctl(config, "run", "configs/slow.yaml").stdout.strip()
    pid_file = next((folder / "logs").glob("nohup_slow_2*.pid"))
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # no trap runs: the run is LOST
    # The pid goes to someone else's process: a session leader like the job was, not a grpoctl job.
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pid_file.write_text(f"{bystander.pid}\n")
        assert json.loads(grpoctl(config, "status", run_id, "--json").stdout)["state"] == "LOST"
        grpoctl(config, "stop", run_id)
        time.sleep(0.3)
        assert bystander.poll() is None  # still alive: it was never signalled
        # and the worker is not "busy" because of it
        again = grpoctl(config, "run", "configs/ok.yaml", "--wait", "--interval", "0.2")
        assert "SUCCEEDED" in again.stdout
    finally:
        bystander.kill()
        bystander.wait()
