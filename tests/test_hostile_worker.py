"""A worker cannot hurt the laptop (issue 22): every case a hostile worker tried, on the local target and on
a real sshd on 127.0.0.1 (the "worker" is a folder this test fills with whatever a hostile VM would leave:
symlinks to /dev/zero, FIFOs, sparse files, escape sequences, forged rows). Each case asserts bounded
memory (tracemalloc peak), a one-line error or a safely escaped display, and no traceback.

Adding a case: write the hostile file into `worker.checkout` (or `worker.log`), run the command with
`worker.cli(...)`, and assert on the exit code and the one line (see TESTING.md, "Hostile workers").
"""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ssh_target_fields
from typer.testing import CliRunner

from grpoctl_contract import progress, rundir
from orchestrator import recipes
from orchestrator.cli import app
from orchestrator.errors import WorkerReadError
from orchestrator.runs import RunRecord, RunStore, WorkerRun
from orchestrator.transport.local import LocalTransport
from orchestrator.transport.ssh import SshTransport

RUN_ID = "hostile-20260101_000000-abcd"
TS = "20260101_000000"
ESC = "\x1b"
# What a hostile job prints: a clipboard write (OSC 52), a title change (OSC 0), a screen clear (CSI 2J),
# a bare CR that would overwrite the line before it, a C1 CSI, a bidi override.
NASTY = f"{ESC}]52;c;ZWNobyBwd25lZA=={ESC}\\ {ESC}]0;owned\x07 {ESC}[2J fake\rREAL \x9b31m \u202eevil"
MEMORY_BOUND = 64 << 20  # bytes a refused read may allocate at most (the files are 512 MB or endless)


@dataclass
class Worker:
    """A run record pointing at a checkout folder this test controls, on one target kind."""

    kind: str
    checkout: Path
    paths: recipes.RunPaths
    config: Path

    @property
    def log(self) -> Path:
        return self.checkout / self.paths.log

    @property
    def run_dir(self) -> Path:
        return self.checkout / self.paths.run_dir

    def finish(self, code: int = 0) -> None:
        (self.checkout / self.paths.exit).write_text(f"{code}\n")

    def cli(self, *args: str, code: int | None = 0):  # type: ignore[no-untyped-def]
        result = CliRunner().invoke(app, ["--config-file", str(self.config), *args])
        if code is not None:
            assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
        assert "Traceback" not in result.output, result.output
        return result


def _one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grpoctl: error: "), result.stderr
    return lines[0]


@pytest.fixture(params=["local", "ssh"])
def worker(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Worker:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    checkout = tmp_path / "worker" / "grpoctl-work"
    paths = recipes.RunPaths.for_run("hostile", TS, RUN_ID)
    (checkout / "logs").mkdir(parents=True)
    (checkout / paths.run_dir).mkdir(parents=True)
    if request.param == "local":
        target: dict = {"kind": "local", "workdir": str(tmp_path / "worker")}
        host = "localhost"
    else:
        server = request.getfixturevalue("sshd")
        target = ssh_target_fields(server)
        host = server.address
    config = tmp_path / "grpoctl.yaml"
    config.write_text(json.dumps({"targets": {"lab": target}}))  # JSON is YAML
    record = RunRecord(
        RUN_ID, "configs/hostile.yaml", "lab", request.param, str(checkout), paths.log, paths.pid,
        paths.exit, paths.run_dir, TS, workers=[WorkerRun("w0", host, state="RUNNING")], state="RUNNING",
    )
    RunStore().save(record)
    (checkout / paths.log).write_text("starting\n")
    return Worker(request.param, checkout, paths, config)


def _bounded(action: Callable[[], object]) -> int:
    """Run `action`; return the peak bytes Python allocated meanwhile."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _sparse(path: Path, size: int = 512 << 20) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


# --------------------------------------------------------------------- unbounded get, FIFO (transports)


@pytest.fixture(params=["local", "ssh"])
def transport(request):  # type: ignore[no-untyped-def]
    if request.param == "local":
        yield LocalTransport()
        return
    server = request.getfixturevalue("sshd")
    t = SshTransport(
        server.host, server.port, user=server.user, key_file=server.client_key,
        host_key_sha256=[server.host_key_sha256], name="w0 ssh",
    )
    yield t
    t.close()


def test_get_refuses_a_symlink_to_dev_zero_a_sparse_512_mb_file_and_a_fifo(transport, tmp_path: Path):
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    _sparse(big)
    for path, message in ((zero, "not a regular file (character special file)"),
                          (fifo, "not a regular file (fifo)"), (big, "larger than 4 MiB")):
        def get(p: Path = path, m: str = message) -> None:
            with pytest.raises(WorkerReadError, match=re.escape(m)):
                transport.get(str(p), max_bytes=4 << 20, timeout=30)

        assert _bounded(get) < MEMORY_BOUND, path
    # a regular file (through a symlink too) under the cap reads as it is
    (tmp_path / "ok.json").write_bytes(b"{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "ok.json")
    assert transport.get(str(tmp_path / "link.json"), max_bytes=2, timeout=30) == b"{}"
    with pytest.raises(WorkerReadError, match="larger than 1 B"):
        transport.get(str(tmp_path / "ok.json"), max_bytes=1)
    with pytest.raises(FileNotFoundError):
        transport.get(str(tmp_path / "missing.json"))


def test_command_output_is_capped_in_the_transport(transport):
    seen: list[str] = []
    # 20 MiB of output without a newline: kept to the cap, callbacks get one cut line
    result = transport.run("head -c 20971520 /dev/zero | tr '\\0' x", timeout=60, on_output=seen.append)
    assert len(result.stdout) < (16 << 20) + 200 and "more bytes of output dropped" in result.stdout
    assert len(seen) == 1 and len(seen[0]) == 64 << 10


# ----------------------------------------------------------------------------- fetch from a hostile VM


@pytest.mark.parametrize(
    ("kind", "name"),
    [("dev_zero", rundir.WANDB_SUMMARY), ("fifo", rundir.WANDB_SUMMARY), ("sparse", rundir.WANDB_SUMMARY),
     ("sparse", rundir.SUMMARY), ("sparse", rundir.EVAL_FULL_ROWS)],
)
def test_fetch_refuses_an_endless_huge_or_blocking_file_in_one_line(worker: Worker, kind: str, name: str):
    (worker.run_dir / rundir.SUMMARY).write_text('{"eval_full/accuracy": 0.5}')
    folder = worker.run_dir / "wandb" / "run-20260101_000000-abcd1234" / "files"
    folder.mkdir(parents=True)
    target = (folder if name == rundir.WANDB_SUMMARY else worker.run_dir) / name
    target.unlink(missing_ok=True)
    if kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "sparse":
        _sparse(target)
    else:
        os.mkfifo(target)
    results = []
    peak = _bounded(lambda: results.append(worker.cli("fetch", RUN_ID, code=3)))
    line = _one_error_line(results[0])
    assert name in line and ("not a regular file" in line or "larger than" in line), line
    assert peak < MEMORY_BOUND
    assert not Path("runs").exists() or not list(Path("runs").iterdir())  # nothing (half-)fetched


# --------------------------------------------------------------------- logs, logs -f, the worker's .env


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_logs_and_follow_refuse_a_log_that_is_a_device_or_fifo(worker: Worker, kind: str):
    worker.log.unlink()
    worker.log.symlink_to("/dev/zero") if kind == "dev_zero" else os.mkfifo(worker.log)
    worker.finish(0)
    for args in (("logs", RUN_ID), ("logs", RUN_ID, "--follow")):
        results = []
        peak = _bounded(lambda a=args, r=results: r.append(worker.cli(*a, code=3)))
        assert "not a regular file" in _one_error_line(results[0])
        assert peak < MEMORY_BOUND


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "sparse"])
def test_a_hostile_worker_env_does_not_stop_logs(worker: Worker, kind: str):
    env = worker.checkout / ".env"
    if kind == "dev_zero":
        env.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(env)
    else:
        _sparse(env)
    worker.log.write_text("hello\n")
    results = []
    peak = _bounded(lambda: results.append(worker.cli("logs", RUN_ID)))
    assert results[0].stdout == "hello\n" and peak < MEMORY_BOUND


# ------------------------------------------------------------------------------- terminal escapes


def _assert_inert(text: str) -> None:
    assert ESC not in text and "\r" not in text and "\x07" not in text and "\x9b" not in text, repr(text)
    assert "\u202e" not in text


def test_logs_show_escape_sequences_visibly_and_cap_long_lines(worker: Worker):
    worker.log.write_text(f"before\n{NASTY}\n{'y' * 100_000}\nafter\n")
    worker.finish(0)
    for args in (("logs", RUN_ID), ("logs", RUN_ID, "--follow")):
        out = worker.cli(*args).stdout
        _assert_inert(out)
        assert "\\x1b]52;c;" in out and "\\x1b[2J" in out and "fake\\x0dREAL" in out and "\\u202e" in out
        assert "before\n" in out and "after\n" in out
        assert max(len(line) for line in out.splitlines()) < 4100
        assert "more characters]" in out


def test_status_fields_from_a_worker_are_escaped_everywhere(worker: Worker):
    info = progress.Event("info", "info", info={"config_hash": f"abc{ESC}[2J", "wandb_url": f"https://x/{NASTY}"})
    event = progress.Event("phase", f"comp{ESC}]0;t\x07ile", k=1, n=3, detail=NASTY + "z" * 5000)
    worker.log.write_text(progress.encode(info) + "\n" + progress.encode(event) + "\n")
    (worker.checkout / worker.paths.pid).write_text(f"{os.getpid()}\n")
    worker.finish(1)  # FAILED: status polls it once and the record keeps what it saw
    for args in (("status",), ("status", RUN_ID), ("status", RUN_ID, "--json")):
        out = worker.cli(*args).stdout
        _assert_inert(out)
    shown = json.loads(worker.cli("status", RUN_ID, "--json").stdout)
    assert shown["config_hash"] == "abc\\x1b[2J" and "\\x1b]52" in shown["wandb_url"]
    assert shown["phase"]["detail"].startswith("\\x1b]52") and len(shown["phase"]["detail"]) < 400
    identity = worker.cli("status", RUN_ID).stdout
    assert "config hash: abc\\x1b[2J" in identity


# ------------------------------------------------------------------------------------ NaN / Infinity


def test_nan_and_infinity_in_progress_lines_neither_crash_nor_leak_into_json(worker: Worker):
    worker.log.write_text(
        '{"event": "progress", "step": NaN, "total": Infinity, "elapsed_s": -Infinity, '
        '"metrics": {"loss": NaN, "ok": 1.5}, "phase": "train", "k": 1e999}\n'
    )
    worker.finish(0)
    for args in (("status",), ("status", RUN_ID, "--json"), ("logs", RUN_ID, "--follow")):
        worker.cli(*args)
    text = worker.cli("status", RUN_ID, "--json").stdout

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in --json output")

    shown = json.loads(text, parse_constant=refuse)
    assert shown["last_progress"]["metrics"] == {"ok": 1.5} and shown["last_progress"]["step"] == 0
