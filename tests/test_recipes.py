"""Recipes: the shell text they build is quoted, and it does what it says when bash runs it."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from standin import git

from grpoctl_contract import envfile
from orchestrator import recipes
from orchestrator.errors import UsageError
from orchestrator.lifecycle.states import combine


def bash(script: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, timeout=60)


# ------------------------------------------------------------------------------------------ quoting


def test_qpath_keeps_home_meaning_and_quotes_the_rest():
    assert recipes.qpath("~") == '"$HOME"'
    assert recipes.qpath("~/a b/c") == "\"$HOME\"/'a b/c'"
    assert recipes.qpath("/x/$(reboot)") == "'/x/$(reboot)'"
    out = bash(f"HOME=/h; echo {recipes.qpath('~/w $x')}").stdout.strip()
    assert out == "/h/w $x"


def test_launch_rejects_bad_env_names():
    paths = recipes.RunPaths.for_run("c", "20260101_000000", "c-1")
    with pytest.raises(UsageError, match="not a valid environment variable name"):
        recipes.launch("/w", "py", "c.yaml", paths, config_stem="c", env={"A;rm -rf /": "1"})


# ------------------------------------------------------------------------------------------- parsers


def test_parse_status_reads_quiet_seconds_and_only_an_info_event_as_info():
    info = json.dumps({"event": "info", "info": {"run_id": "r1", "git_commit": "abc"}})
    running = recipes.parse_status(f"PIDV=12\nALIVE=1\nQUIET=42\nINFO={info}\nPROGRESS=\n")
    assert (running.state, running.quiet_s) == ("RUNNING", 42)
    assert running.info == {"run_id": "r1", "git_commit": "abc"}
    lost = recipes.parse_status("PIDV=12\nALIVE=0\nQUIET=-3\nPROGRESS=\n")
    assert (lost.state, lost.quiet_s, lost.info) == ("LOST", 0, None)  # never negative
    # A progress event where the info line should be is not info.
    other = json.dumps({"event": "progress", "phase": "train", "step": 1, "total": 2, "elapsed_s": 1.0})
    assert recipes.parse_status(f"PIDV=12\nALIVE=1\nINFO={other}\n").info is None


def test_parse_status_precedence():
    done = json.dumps({"event": "done", "step": 5, "total": 5, "elapsed_s": 1.0})
    ok = recipes.parse_status(f"PIDV=12\nEXIT=0\nALIVE=1\nPROGRESS={done}\n")
    assert (ok.state, ok.exit_code, ok.pid) == ("SUCCEEDED", 0, 12)  # the exit file decides
    assert ok.progress is not None and ok.progress.done
    failed = recipes.parse_status("PIDV=12\nEXIT=3\nALIVE=0\nPROGRESS=\n")
    assert failed.label == "FAILED(3)" and failed.progress is None
    running = recipes.parse_status(
        'PIDV=12\nALIVE=1\nPROGRESS={"event": "progress", "step": 2, "total": 8, "elapsed_s": 4.0}\n'
    )
    assert running.state == "RUNNING"
    # a line without the trainer's eta_s: no ETA made up from elapsed/step or the step time
    assert (running.progress.step, running.progress.total, running.progress.eta_s) == (2, 8, None)
    slow_start = json.dumps(
        {"event": "progress", "step": 4, "total": 8, "elapsed_s": 40.0, "metrics": {"time/train/step_s": 0.5},
         "eta_s": 2.0}
    )
    timed = recipes.parse_status(f"PIDV=12\nALIVE=1\nPROGRESS={slow_start}\n")
    assert timed.progress.eta_s == pytest.approx(2.0)  # the trainer's own, as it reported it
    assert recipes.parse_status("PIDV=12\nALIVE=0\nPROGRESS=\n").state == "LOST"
    assert recipes.parse_status("CHECKOUT=missing\n").state == "LOST"


def test_combine_states():
    assert combine(["SUCCEEDED", "SUCCEEDED"]) == "SUCCEEDED"
    assert combine(["SUCCEEDED", "RUNNING"]) == "RUNNING"
    assert combine(["RUNNING", "LOST"]) == "LOST"
    assert combine(["LOST", "FAILED"]) == "FAILED"
    assert combine([]) == "LOST"


def test_progress_line_garbage_is_ignored():
    assert recipes.parse_progress_line('{"event": broken') is None
    assert recipes.parse_progress_line("step 3") is None


# ---------------------------------------------------------------------------------- executed by bash


def test_env_verify_reports_lengths_never_values(tmp_path: Path):
    env = tmp_path / ".env"
    secret = "s3cr3t-value-xyz"
    env.write_text(f'WANDB_API_KEY={secret}\nexport QUOTED="a b c"\r\n# COMMENT=zzz\nEMPTY=\n')
    env.chmod(0o600)
    checker = envfile.__file__  # on a worker: a copy of this very file (recipes.ENVFILE_SOURCE)
    out = bash(recipes.env_verify(str(env), checker))
    assert out.returncode == 0, out.stderr
    mode, lengths = recipes.parse_env_verify(out.stdout)
    assert mode == "600"
    assert lengths == {"WANDB_API_KEY": len(secret), "QUOTED": 5, "EMPTY": 0}
    assert secret not in out.stdout + out.stderr
    assert secret not in recipes.env_verify(str(env), checker)


def test_sync_clones_resets_and_never_deletes_untracked_files(tmp_path: Path, standin_repo):
    url, work = standin_repo
    checkout = tmp_path / "ck"
    first = bash(recipes.sync(str(checkout), url, "main"))
    assert first.returncode == 0, first.stderr
    head = recipes.parse_head(first.stdout)
    assert head == git(work, "rev-parse", "HEAD")
    assert (checkout / recipes.CHECKOUT_MARKER).is_file()
    # A local edit to a tracked file goes (workers run origin's code); untracked files and logs/, runs/,
    # .env stay.
    (checkout / "stray.txt").write_text("x")
    (checkout / "configs" / "ok.yaml").write_text("steps: 999\n")
    for keep in ("logs/a.log", "runs/r/summary.json", ".env", "wandb/w.txt"):
        (checkout / keep).parent.mkdir(parents=True, exist_ok=True)
        (checkout / keep).write_text("keep")
    again = bash(recipes.sync(str(checkout), url, "main"))
    assert again.returncode == 0, again.stderr
    assert recipes.parse_head(again.stdout) == head
    assert (checkout / "stray.txt").read_text() == "x"
    assert "999" not in (checkout / "configs" / "ok.yaml").read_text()
    for keep in ("logs/a.log", "runs/r/summary.json", ".env", "wandb/w.txt"):
        assert (checkout / keep).read_text() == "keep"


def test_sync_adopts_a_folder_with_only_env_and_refuses_any_other(tmp_path: Path, standin_repo):
    url, _ = standin_repo
    adopt = tmp_path / "adopt"
    adopt.mkdir()
    (adopt / ".env").write_text("K=v\n")
    out = bash(recipes.sync(str(adopt), url, "main"))
    assert out.returncode == 0, out.stderr
    assert (adopt / ".env").read_text() == "K=v\n" and (adopt / "trainer").is_dir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("mine")
    refused = bash(recipes.sync(str(home), url, "main"))
    assert refused.returncode == recipes.EXIT_NOT_CHECKOUT
    assert sorted(p.name for p in home.iterdir()) == ["precious.txt"]


def test_sync_quotes_hostile_values(tmp_path: Path):
    marker = tmp_path / "pwned"
    script = recipes.sync(str(tmp_path / "ck"), f"file:///nonexistent/$(touch {marker})", f"x;touch {marker}")
    out = bash(script)
    assert out.returncode != 0
    assert not marker.exists()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, standin_repo) -> Path:
    url, _ = standin_repo
    ck = tmp_path_factory.mktemp("launch") / "checkout dir"
    out = bash(recipes.sync(str(ck), url, "main"))
    assert out.returncode == 0, out.stderr
    return ck


def _launch(ck: Path, config: str, *, env=None, force=False, args=()) -> tuple[recipes.RunPaths, str]:
    stem = Path(config).stem
    ts = f"{time.time_ns()}"
    paths = recipes.RunPaths.for_run(stem, ts, f"{stem}-{ts}")
    out = bash(
        recipes.launch(
            str(ck), sys.executable, config, paths, config_stem=stem, env=env, force=force, trainer_args=args
        )
    )
    return paths, out


def _wait_state(ck: Path, paths: recipes.RunPaths, timeout: float = 20) -> recipes.WorkerStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = recipes.parse_status(bash(recipes.status(str(ck), paths)).stdout)
        if status.finished or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_launch_runs_detached_writes_exit_file_and_latest_links(checkout: Path):
    marker = checkout / "pwned"
    paths, out = _launch(
        checkout, "configs/ok.yaml", env={"EVAL_FULL_SWEEP": "1", "ODD": f"$(touch {marker})"}
    )
    assert out.returncode == 0, out.stderr
    assert recipes.parse_pid(out.stdout) is not None
    status = _wait_state(checkout, paths)
    assert (status.state, status.exit_code) == ("SUCCEEDED", 0)
    assert status.progress is not None and status.progress.done and status.progress.step == 3
    assert not marker.exists()
    assert (checkout / paths.exit).read_text().strip() == "0"
    latest = checkout / "logs" / "nohup_ok_latest.log"
    assert latest.is_symlink() and latest.resolve() == (checkout / paths.log).resolve()
    config = json.loads((checkout / paths.run_dir / "config.json").read_text())
    assert config["eval_full_sweep"] is True
    assert (checkout / paths.run_dir / "eval_full.jsonl").is_file()


def test_launch_expands_a_home_relative_python(checkout: Path, tmp_path: Path):
    """Found by the rehearsal: the bootstrapped interpreter is `~/grpoctl-work/.venv/bin/python` (from the
    default remote_dir); quoted whole, the tilde stayed literal and every job exited 127."""
    home = tmp_path / "home"
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "python").symlink_to(sys.executable)
    stem, ts = "ok", f"{time.time_ns()}"
    paths = recipes.RunPaths.for_run(stem, ts, f"{stem}-{ts}")
    script = recipes.launch(str(checkout), "~/venv/bin/python", "configs/ok.yaml", paths, config_stem=stem)
    out = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home)},
    )
    assert out.returncode == 0, out.stderr
    status = _wait_state(checkout, paths)
    assert (status.state, status.exit_code) == ("SUCCEEDED", 0), (checkout / paths.log).read_text()


def test_launch_failure_exit_code_is_recorded(checkout: Path):
    paths, out = _launch(checkout, "configs/fail3.yaml")
    assert out.returncode == 0, out.stderr
    status = _wait_state(checkout, paths)
    assert status.label == "FAILED(3)"
    assert "failing on purpose" in (checkout / paths.log).read_text()


def test_busy_worker_refused_unless_forced_then_term_writes_exit_and_kill_loses(checkout: Path):
    paths, out = _launch(checkout, "configs/slow.yaml")
    assert out.returncode == 0, out.stderr
    pid = recipes.parse_pid(out.stdout)
    try:
        busy_paths, busy = _launch(checkout, "configs/ok.yaml")
        assert busy.returncode == recipes.EXIT_BUSY
        assert paths.pid in (recipes.parse_busy(busy.stdout) or "")
        assert not (checkout / busy_paths.log).exists()  # nothing started
        forced_paths, forced = _launch(checkout, "configs/ok.yaml", force=True)
        assert forced.returncode == 0
        assert _wait_state(checkout, forced_paths).state == "SUCCEEDED"
        assert recipes.parse_status(bash(recipes.status(str(checkout), paths)).stdout).state == "RUNNING"
        # TERM through the kill recipe: the trap writes the exit file.
        killed = bash(recipes.kill(str(checkout), paths, grace_s=5))
        assert "KILL=terminated" in killed.stdout, killed.stdout + killed.stderr
        assert _wait_state(checkout, paths).label == "FAILED(143)"
    finally:
        if pid:  # never /usr/bin/kill -KILL -PID: procps-ng 4.0.2 reads that as "kill every process"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    # SIGKILL leaves no exit file: LOST, never RUNNING forever.
    lost_paths, out = _launch(checkout, "configs/slow.yaml")
    lost_pid = recipes.parse_pid(out.stdout)
    assert lost_pid
    os.killpg(lost_pid, signal.SIGKILL)
    assert _wait_state(checkout, lost_paths).state == "LOST"


def test_log_reading_recipes(checkout: Path):
    paths, _ = _launch(checkout, "configs/ok.yaml", force=True)
    _wait_state(checkout, paths)
    tail = bash(recipes.tail_log(str(checkout), paths.log, 1)).stdout
    assert json.loads(tail)["event"] == "done"
    whole = (checkout / paths.log).read_bytes()
    rest = bash(recipes.read_log_from(str(checkout), paths.log, 10)).stdout
    assert rest.encode() == whole[10:]
    files = bash(recipes.existing_files(str(checkout), [f"{paths.run_dir}/summary.json", "nope.json"])).stdout
    assert recipes.parse_files(files) == [f"{paths.run_dir}/summary.json"]


def test_wandb_summary_is_the_run_specific_file(checkout: Path):
    paths, _ = _launch(checkout, "configs/ok_b.yaml", force=True)
    _wait_state(checkout, paths)
    found = recipes.parse_wandb_paths(bash(recipes.find_wandb_summary(str(checkout), paths.run_dir)).stdout)
    assert found == [f"{paths.run_dir}/wandb/run-20260101_000000-abcd1234/files/wandb-summary.json"]
    assert shlex.quote(paths.run_dir) in recipes.find_wandb_summary(str(checkout), paths.run_dir)


def test_status_reads_liveness_before_the_exit_file():
    # The wrapper writes the exit file and then exits: reading the file first could see neither the file
    # nor the process for a job that ends between the two reads, and call a finished run LOST.
    script = recipes.status("/repo", recipes.RunPaths.for_run("c", "20260101_000000", "c-1"))
    assert script.index("ALIVE=1") < script.index("EXIT=")


def test_kill_ignores_a_pid_file_that_would_mean_every_process(tmp_path: Path):
    paths = recipes.RunPaths.for_run("c", "20260101_000000", "c-1")
    (tmp_path / "logs").mkdir()
    for bogus in ("1", "0", "-1", "12 13"):
        (tmp_path / paths.pid).write_text(bogus + "\n")
        assert "KILL=not-running" in bash(recipes.kill(str(tmp_path), paths, grace_s=0.1)).stdout


def test_bootstrap_creates_the_venv_logs_pip_and_shows_the_log_tail_on_failure(tmp_path: Path):
    """The bootstrap keeps pip's output in logs/bootstrap.log on the worker: the rehearsal shows from it
    that the venv was created and the trainer installed; a failed install names the log and shows its end.
    Offline (PIP_NO_INDEX): the folder is no Python project, so `pip install -e .` fails at once."""
    work = tmp_path / "checkout"
    work.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PIP_NO_INDEX": "1"}
    script = recipes.bootstrap(str(work), ["trainer"])
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "PYTHON=" not in result.stdout
    log = (work / recipes.BOOTSTRAP_LOG).read_text()
    assert "venv created: " in log and (work / ".venv" / "bin" / "python").exists()
    assert "+ .venv/bin/python -m pip install --no-deps -e ." in log
    said = f"bootstrap failed (exit {result.returncode}); the end of {work}/logs/bootstrap.log:"
    assert said in result.stderr
    assert log.strip().splitlines()[-1] in result.stderr  # the log's tail, where pip says why


# ------------------------------------------------------------------------------ hostile values, no spaces
# Markers live under pytest's tmp_path, which has no space in it: a dropped quote then runs the injected
# `touch` on exactly the marker path (a path with a space only makes a stray file and the check passes).


def _hostile(marker: Path) -> list[str]:
    """Values that run `touch marker` if they ever reach the shell unquoted, and every metacharacter."""
    m = str(marker)
    assert " " not in m
    return [
        f"$(touch {m})",
        f"`touch {m}`",
        f";touch {m}",
        f"x|touch {m}",
        f"x&touch {m}",
        f"x&&touch {m}",
        f"x||touch {m}",
        f"x\ntouch {m}",
        f"'$(touch {m})'",
        f'"$(touch {m})"',
        f"x';touch {m};'",
        f"x>{m}",
        f"x${{IFS}}>{m}",
        "* ? [a] {b,c} ~ # ! \\ \t % ^ = + , . : @",
        "ALL:" + "".join(sorted(set("$`;|&<>()'\"\\*?[]{}~#!\n\t =%^,.:@"))),
    ]


def _fake_python(folder: Path, dump: Path) -> Path:
    """An executable that records the argv and HOSTILE_* env it was started with, as the trainer would."""
    exe = folder / "python"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(dump)!r}, 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:],\n"
        "               'env': {k: v for k, v in os.environ.items() if k.startswith('HOSTILE_')}}, f)\n"
    )
    exe.chmod(0o755)
    return exe


def test_launch_passes_hostile_env_values_and_args_through_byte_for_byte(tmp_path: Path):
    marker = tmp_path / "pwned"
    values = _hostile(marker)
    ck = tmp_path / "ck"
    ck.mkdir()
    dump = tmp_path / "dump.json"
    python = _fake_python(tmp_path, dump)
    env = {f"HOSTILE_{i}": v for i, v in enumerate(values)}
    config = values[0] + ".yaml"
    (ck / ".git").mkdir()  # a checkout holding the config: launch refuses anything else before starting
    (ck / config).parent.mkdir(parents=True)
    (ck / config).write_text("")
    paths = recipes.RunPaths.for_run("cfg", "1", "cfg-1")
    out = bash(recipes.launch(str(ck), str(python), config, paths, config_stem="cfg", env=env,
                              trainer_args=values))
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 20
    while not (ck / paths.exit).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (ck / paths.exit).read_text().strip() == "0", (ck / paths.log).read_text()
    got = json.loads(dump.read_text())
    assert got["env"] == env
    assert got["argv"] == ["-u", "-m", "trainer", "--config", config, "--run-dir", paths.run_dir, *values]
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "dump.json", "python"]  # no stray files


def test_sync_refuses_hostile_url_and_branch_without_running_them(tmp_path: Path, standin_repo):
    url, _ = standin_repo
    marker = tmp_path / "pwned"
    for i, value in enumerate(_hostile(marker)):
        ck = tmp_path / f"ck{i}"
        for bad_url, branch in ((f"file:///nonexistent/{value}", "main"), (url, value)):
            out = bash(recipes.sync(str(ck), bad_url, branch))
            assert out.returncode != 0, (value, out.stdout)
            assert not marker.exists(), value
    # Nothing but the checkout folders: no stray file made by half of an unquoted value.
    assert all(p.name.startswith("ck") and p.is_dir() for p in tmp_path.iterdir())


def test_sync_into_a_folder_named_with_every_metacharacter(tmp_path: Path, standin_repo):
    url, work = standin_repo
    name = "ck$(id)`id`;x|y&z<a>b'c\"d*?[e]{f,g}~#!%^=+,.:@\\h"
    out = bash(recipes.sync(str(tmp_path / name), url, "main"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert recipes.parse_head(out.stdout) == git(work, "rev-parse", "HEAD")
    listed = bash(recipes.existing_files(str(tmp_path / name), ["configs/ok.yaml", "nope"]))
    assert recipes.parse_files(listed.stdout) == ["configs/ok.yaml"]


# ------------------------------------------------------------------------------------ more edges


def test_env_names_may_start_with_an_underscore():
    paths = recipes.RunPaths.for_run("c", "1", "c-1")
    script = recipes.launch("/w", "py", "c.yaml", paths, config_stem="c", env={"_PRIVATE_1": "v", "A_2": "w"})
    assert "export _PRIVATE_1=v\n" in script and "export A_2=w\n" in script
    for bad in ("1A", "", "A-B", "A B"):
        with pytest.raises(UsageError, match="not a valid environment variable name"):
            recipes.launch("/w", "py", "c.yaml", paths, config_stem="c", env={bad: "1"})


def test_kill_of_a_pid_that_already_died_touches_nothing(tmp_path: Path):
    paths = recipes.RunPaths.for_run("c", "1", "c-1")
    (tmp_path / "logs").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / paths.pid).write_text(f"{dead.pid}\n")
    out = bash(recipes.kill(str(tmp_path), paths, grace_s=0.1))
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "KILL=not-running"


def _fake_interpreters(folder: Path, log: Path, version_ok: bool = True) -> Path:
    """A PATH folder whose python3.12 creates a venv whose python logs each argv line to `log`."""
    folder.mkdir()
    venv_python = f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(log))}\n"
    py = folder / "python3.12"
    py.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -c ]; then exit {0 if version_ok else 1}; fi\n'
        'if [ "$1 $2" = "-m venv" ]; then\n'
        '  /bin/mkdir -p "$3/bin"\n'
        f"  /bin/cat > \"$3/bin/python\" <<'X'\n{venv_python}X\n"
        '  /bin/chmod +x "$3/bin/python"; echo created >> ' + shlex.quote(str(log)) + "\n"
        "fi\n"
    )
    py.chmod(0o755)
    return folder


def test_bootstrap_makes_the_venv_once_and_installs_the_extras(tmp_path: Path):
    ck = tmp_path / "ck"
    ck.mkdir()
    log = tmp_path / "log"
    fake_bin = _fake_interpreters(tmp_path / "bin", log)
    tools = tmp_path / "tools"  # what the bootstrap's log lines need, without a real python beside them
    tools.mkdir()
    for tool in ("mkdir", "date", "hostname", "tail"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {"PATH": f"{fake_bin}:{tools}", "HOME": str(tmp_path)}  # only the fake: no real python is found
    for _ in range(2):
        out = subprocess.run(["/bin/bash", "-c", recipes.bootstrap(str(ck), ["trainer", "dev"])],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert recipes.parse_python(out.stdout) == f"{ck}/.venv/bin/python"
    install = [  # the checkout without the laptop stack, then only the extras' requirements
        "-m pip install --no-deps -e .",
        "-m grpoctl_contract.requirements trainer,dev --out logs/requirements.txt",
        "-m pip install -r logs/requirements.txt",
    ]
    assert log.read_text().splitlines() == [
        "created",
        "-m pip install --upgrade pip",
        *install,
        "-m pip install --upgrade pip",  # the second run keeps the venv
        *install,
    ]
    log.unlink()
    out = subprocess.run(["/bin/bash", "-c", recipes.bootstrap(str(ck), [])], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0 and log.read_text().splitlines()[-1] == "-m pip install -e ."
    assert recipes.venv_python("/w/ck/") == "/w/ck/.venv/bin/python"


def test_bootstrap_without_python_311_says_so(tmp_path: Path):
    ck = tmp_path / "ck"
    ck.mkdir()
    fake_bin = _fake_interpreters(tmp_path / "bin", tmp_path / "log", version_ok=False)
    out = subprocess.run(["/bin/bash", "-c", recipes.bootstrap(str(ck), ["trainer"])], capture_output=True,
                         text=True, env={"PATH": str(fake_bin)}, timeout=60)
    assert out.returncode == recipes.EXIT_NO_PYTHON
    assert "no python >= 3.11 on this worker" in out.stderr
    assert not (ck / ".venv").exists()


def test_progress_line_of_a_model_download_keeps_both_byte_counts():
    from grpoctl_contract.progress import Event, encode

    line = encode(Event("phase", "model_load", bytes_done=1_200, bytes_total=6_170, detail="Qwen"))
    progress = recipes.parse_progress_line(line)
    assert progress is not None and (progress.bytes_done, progress.bytes_total) == (1_200, 6_170)


# --------------------------------------------------------------------------- pids that are not jobs


@pytest.mark.parametrize("pid", ["-1", "0", "1", "abc"])
def test_a_pid_file_of_minus_one_zero_or_one_is_never_a_live_job(tmp_path: Path, pid: str):
    """`kill -0 -1` succeeds whenever any process of the user lives: a job group killed with its pid file
    saying -1 would be RUNNING for ever."""
    paths = recipes.RunPaths.for_run("c", "ts", "c-1")
    (tmp_path / "logs").mkdir()
    (tmp_path / paths.pid).write_text(pid + "\n")
    status = recipes.parse_status(bash(recipes.status(str(tmp_path), paths)).stdout)
    assert (status.state, status.pid) == ("LOST", None)
    assert "KILL=not-running" in bash(recipes.kill(str(tmp_path), paths, grace_s=0.1)).stdout


def test_a_zombie_job_is_not_alive(tmp_path: Path):
    """A killed job whose parent never reaps it stays a zombie (state Z): `kill -0` still succeeds on it.
    Only the /proc state check says it is gone; without it `stop` would call it someone else's process."""
    zombie = subprocess.Popen(["true"])  # our child, never waited for until the end: a zombie
    try:
        for _ in range(200):
            if Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1].startswith("Z"):
                break
            time.sleep(0.01)
        alive = bash(recipes._ALIVE_FN + f'\nif alive {zombie.pid}; then echo alive; else echo dead; fi\n')
        assert alive.stdout.strip() == "dead"
        paths = recipes.RunPaths.for_run("c", "ts", "c-1")
        (tmp_path / "logs").mkdir()
        (tmp_path / paths.pid).write_text(f"{zombie.pid}\n")
        assert recipes.parse_status(bash(recipes.status(str(tmp_path), paths)).stdout).state == "LOST"
        assert "KILL=not-running" in bash(recipes.kill(str(tmp_path), paths, grace_s=0.1)).stdout
    finally:
        zombie.wait()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_status_and_kill_read_pid_and_exit_files_bounded(tmp_path: Path, kind: str):
    """Worker files are untrusted: a pid or exit file that is a FIFO (a `cat` blocks for ever) or a link to
    /dev/zero (endless) reads as nothing, at once: no live job, no exit code, nothing signalled."""
    paths = recipes.RunPaths.for_run("c", "20260101_000000", "c-1")
    (tmp_path / "logs").mkdir()
    for name in (paths.pid, paths.exit):
        if kind == "fifo":
            os.mkfifo(tmp_path / name)
        else:
            (tmp_path / name).symlink_to("/dev/zero")
    script = recipes.status(str(tmp_path), paths)  # a blocked read ends at the timeout, not the suite
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=20)
    status = recipes.parse_status(done.stdout)
    assert done.returncode == 0 and status.pid is None and status.exit_code is None
    assert "KILL=not-running" in bash(recipes.kill(str(tmp_path), paths, grace_s=0.1)).stdout
