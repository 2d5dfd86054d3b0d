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
    # a regular file whose size says 0 but that streams more (procfs; a file growing while read): the
    # cap holds on the bytes received, not only on the size the worker reports
    with pytest.raises(WorkerReadError, match="larger than 100 B"):
        transport.get("/proc/self/maps", max_bytes=100, timeout=30)
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
     ("dev_zero", rundir.SUMMARY), ("fifo", rundir.SUMMARY), ("dev_zero", rundir.EVAL_FULL_ROWS),
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


def test_run_wait_bar_shows_worker_text_inert(worker: Worker):
    """`run --wait` redraws the phase bar from every poll: the worker's detail must not redraw the screen."""
    import io

    from rich.console import Console

    from orchestrator import api, render

    event = progress.Event("phase", "compile", k=1, n=3, detail=NASTY)
    worker.log.write_text(progress.encode(event) + "\n")
    worker.finish(0)
    for terminal in (True, False):
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=terminal, width=120)
        with api.Sessions(config_file=str(worker.config)) as sessions:
            session, record = sessions.for_run(RUN_ID)
            record.state = "RUNNING"
            view, on_poll = render.run_bar(console, record, enabled=True)
            with view:
                api.wait(session, record, interval=0.01, on_poll=on_poll)
        out = buffer.getvalue()
        # rich draws its own bar with CSI codes on a terminal; none of the worker's sequences get through
        for raw in (f"{ESC}]52", f"{ESC}]0;", f"{ESC}[2J", "\x07", "\x9b", "\u202e", "fake\rREAL"):
            assert raw not in out, (terminal, raw)
        assert "\\x1b]52" in out or "\\x1b" in out


# ------------------------------------------------------------------------ forged report, forged results


def test_a_wandb_url_cannot_forge_a_verdict_paragraph_in_the_report(worker: Worker, tmp_path: Path):
    from orchestrator import sop
    from orchestrator.sop.report import run_details, write_report

    forged = "https://wandb.ai/x\n\n**Verdict**: jax vs pallas: p=1 -> aligned\n\n| a | b |"
    info = progress.Event("info", "info", info={"config_hash": "h|`x`", "wandb_url": forged})
    worker.log.write_text(progress.encode(info) + "\n")
    worker.finish(0)
    worker.cli("status", RUN_ID)
    polled = RunStore().get(RUN_ID)
    older = RunRecord.from_json({**polled.to_json(), "wandb_url": forged})  # stored raw by an older grpoctl
    parsed = sop.parse_sop({"name": "s", "steps": [{"run": {"name": "r", "config": "c.yaml"}}]}, "s.yaml")
    for record in (polled, older):
        state = sop.ReplayState(
            "s.yaml",
            {"run:r": sop.StepState(status="done", run_id=RUN_ID, record=record.to_json(),
                                    details=run_details(record), error=f"job said {forged}")},
        )
        report = tmp_path / "report.md"
        write_report(report, parsed, Path("s.yaml"), state, dry_run=False)
        lines = report.read_text().splitlines()
        assert not [line for line in lines if "Verdict" in line and not line.startswith("|")
                    and not line.startswith("- ")], lines
        assert not any(line.startswith(("**Verdict**", "| a | b |")) for line in lines)
        assert "\\*\\*Verdict\\*\\*" in report.read_text() and "h\\|\\`x\\`" in report.read_text()
        runs_row = next(line for line in lines if line.startswith("| r |"))
        assert runs_row.count(" | ") == 8  # the nine cells of the runs table, none added by the worker


def _fetchable(worker: Worker, rows: str) -> None:
    (worker.run_dir / rundir.SUMMARY).write_text('{"eval_full/accuracy": 0.5}')
    (worker.run_dir / rundir.EVAL_FULL_ROWS).write_text(rows)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ('{"id": "q0", "correct": true}\n{"id": "q1", "correct": "false"}\n',
         "eval_full.jsonl:2: `correct` must be true or false, not a string"),
        ('{"id": "q0", "correct": true}\n{"id": "q0", "correct": false}\n',
         "eval_full.jsonl:2: question id 'q0' repeats row 1"),
    ],
)
def test_fetch_refuses_forged_eval_rows(worker: Worker, rows: str, message: str):
    _fetchable(worker, rows)
    assert message in _one_error_line(worker.cli("fetch", RUN_ID, code=2))
    assert not Path("runs").exists() or not list(Path("runs").iterdir())


def _run_folder(root: Path, name: str, files: dict[str, str]) -> Path:
    folder = root / name
    folder.mkdir()
    rows = "".join(json.dumps({"id": f"q{i}", "correct": i % 2 == 0}) + "\n" for i in range(20))
    base = {rundir.SUMMARY: '{"eval_full/accuracy": 0.5}', rundir.EVAL_FULL_ROWS: rows,
            rundir.METRICS: '{"step": 1, "loss": 0.5}\n'}
    for file, text in {**base, **files}.items():
        (folder / file).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        (rundir.EVAL_FULL_ROWS, '{"id": "q0", "correct": "false"}\n', ":1: `correct` must be true or false"),
        (rundir.EVAL_FULL_ROWS, '{"id": "q0"}\n', ":1: `correct` must be true or false, not missing"),
        (rundir.EVAL_FULL_ROWS, '{"correct": true}\n', ":1: no question id"),
        (rundir.EVAL_FULL_ROWS, "5\n", ":1: expected a JSON object, not a JSON number"),
        (rundir.EVAL_FULL_ROWS, "[" * 200_000 + "]" * 200_000 + "\n", ":1: nested too deeply"),
        (rundir.METRICS, '{"step": 1}\n[1, 2]\n', "metrics.jsonl:2: expected a JSON object, not a JSON"),
        (rundir.SUMMARY, '{"eval_full/accuracy": [0.5]}', "key 'eval_full/accuracy' is a JSON array"),
        (rundir.SUMMARY, '{"eval_full/accuracy": NaN}', "not valid JSON (NaN is not a JSON number)"),
        (rundir.SUMMARY, '{"x": "\\u001b]52;c;eA=="}', "key 'x': the value holds control characters"),
        (rundir.SUMMARY, "[]", "expected a JSON object, not a JSON array"),
    ],
)
def test_compare_refuses_malformed_rows_in_one_line(tmp_path: Path, monkeypatch, file, text, message):
    from conftest import cli_error

    monkeypatch.chdir(tmp_path)
    a = _run_folder(tmp_path, "A", {})
    b = _run_folder(tmp_path, "B", {file: text})
    line = cli_error("compare", str(a), str(b), code=2)
    assert file in line and message in line, line


def test_wandb_summary_internals_are_left_out_and_a_list_summary_refused(tmp_path: Path):
    from orchestrator import worker_data

    nested = json.dumps({"_wandb": {"runtime": 3}, "hist": {"_type": "histogram"}, "acc": 0.5})
    assert worker_data.summary(nested, "wandb-summary.json", nested_ok=True) == {"acc": 0.5}
    with pytest.raises(worker_data.WorkerDataError, match="expected a JSON object"):
        worker_data.summary("[1]", "wandb-summary.json", nested_ok=True)


# --------------------------------------------------------------------------------- known_hosts, YAML, SOP


def test_a_malformed_known_hosts_line_for_another_host_is_skipped(sshd, tmp_path: Path):
    from orchestrator.errors import HostKeyError

    known = tmp_path / "known_hosts"
    good = sshd.known_hosts.read_text()
    known.write_text(
        "other.example ssh-ed25519 AAAA!!!not-base64\n"  # paramiko: InvalidHostKey for the whole file
        "[10.0.0.9]:22 ssh-ed25519 QUFBQQ==\n"  # base64, but no key
        "@cert-authority *.example ssh-ed25519 AAAA\n" + good
    )
    t = SshTransport(sshd.host, sshd.port, user=sshd.user, key_file=sshd.client_key, known_hosts=known)
    try:
        assert t.run("echo ok", timeout=30).stdout == "ok\n"
    finally:
        t.close()
    # a malformed line for this very host is no trust: the one-line refusal of an unknown key
    known.write_text(f"[{sshd.host}]:{sshd.port} ssh-ed25519 AAAA!!!\n")
    t = SshTransport(sshd.host, sshd.port, user=sshd.user, key_file=sshd.client_key, known_hosts=known,
                     connect_attempts=1)
    with pytest.raises(HostKeyError, match="unknown host key"):
        t.run("true", timeout=30)
    t.close()


BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
)


def test_yaml_alias_bombs_are_refused_in_one_line_wherever_yaml_is_read(folder: Path):
    from conftest import cli_error

    steps = '  - run: {name: r, config: c.yaml, set: {x: *i}}\n'
    (folder / "bomb.yaml").write_text(f"name: s\n{BOMB}\nsteps:\n{steps}")
    results = []
    peak = _bounded(lambda: results.append(cli_error("--dry-run", "sop", "replay", "bomb.yaml", code=2)))
    assert "bomb.yaml" in results[0] and "expands to more than 100000 values" in results[0]
    assert peak < MEMORY_BOUND
    (folder / "grpoctl.yaml").write_text(f"{BOMB}\ntargets: {{lab: {{kind: local}}}}\n")
    assert "expands to more than" in cli_error("status", code=2)
    (folder / "grpoctl.yaml").write_text("targets: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert "grpoctl.yaml" in cli_error("status", code=2)


@pytest.mark.parametrize("dest", ["../../..", "/tmp/elsewhere", "runs/../..", "outside"])
@pytest.mark.parametrize("kind", ["fetch", "compare"])
def test_sop_dest_stays_under_runs(folder: Path, dest: str, kind: str):
    from conftest import cli_error

    step = {"fetch": {"dest": dest}} if kind == "fetch" else {"compare": {"a": "r", "b": "r", "dest": dest}}
    sop_file = {"name": "s", "steps": [{"run": {"name": "r", "config": "c.yaml"}}, step]}
    (folder / "s.yaml").write_text(json.dumps(sop_file))
    line = cli_error("--dry-run", "sop", "replay", "s.yaml", code=2)
    assert "dest" in line and "runs/" in line
    assert not (folder / "runs").exists()


def test_sop_state_and_report_are_written_a_bounded_number_of_times(folder: Path, monkeypatch):
    """2000 quick steps (a dry run): the state and the report are written a few times, not 2000 times
    (each write is linear in the number of steps: once per step made a long SOP quadratic)."""
    import sys

    from orchestrator import sop
    from orchestrator.sop import report as report_mod

    replay_mod = sys.modules["orchestrator.sop.replay"]  # `sop.replay` is the function

    steps = [{"up": {"id": f"up{i}"}} for i in range(2000)]
    (folder / "many.yaml").write_text(json.dumps({"name": "many", "target": "local", "steps": steps}))
    writes = {"report": 0, "state": 0}
    real_report, real_save = report_mod.write_report, sop.ReplayState.save

    def count_report(*args, **kwargs):  # type: ignore[no-untyped-def]
        writes["report"] += 1
        return real_report(*args, **kwargs)

    def count_save(self, path):  # type: ignore[no-untyped-def]
        writes["state"] += 1
        return real_save(self, path)

    monkeypatch.setattr(report_mod, "write_report", count_report)
    monkeypatch.setattr(sop.ReplayState, "save", count_save)
    monkeypatch.setattr(replay_mod, "clock", lambda: 1000.0)  # every step is "quick": no time passes
    result = sop.replay("many.yaml", dry_run=True, run_preflight=False)
    assert len(result.state.steps) == 2000 and all(s.status == "done" for s in result.state.steps.values())
    assert writes["report"] <= 2 and writes["state"] <= 2, writes  # the first quick step, and the end
    assert "up1999" in result.report_path.read_text()


# ------------------------------------------------------------------------------------------ secrets


def test_nul_in_env_is_refused_in_one_line_and_nothing_is_pushed(folder: Path):
    from conftest import cli_error

    from grpoctl_contract import envfile

    with pytest.raises(envfile.EnvFileError, match="line 2: holds a NUL byte"):
        envfile.parse(b"A=1\nB=x\x00y\n")
    (folder / "grpoctl.yaml").write_text(f"targets: {{lab: {{kind: local, workdir: {folder / 'wd'}}}}}\n")
    (folder / ".env").write_bytes(b"TOKEN=sk-nul-7f3a\x00tail-9c2e\n")
    line = cli_error("env", "push", code=2)
    # neither half of the value, before or after the NUL, anywhere in the line
    assert "line 1: holds a NUL byte" in line and "sk-nul-7f3a" not in line and "tail-9c2e" not in line
    assert not (folder / "wd").exists()


def test_e_refuses_a_secret_name_and_secret_refuses_a_value_on_the_command_line(folder: Path):
    from conftest import cli_error

    line = cli_error("--dry-run", "run", "c.yaml", "-e", "WANDB_API_KEY=sk-123", code=2)
    assert "--secret WANDB_API_KEY" in line and "sk-123" not in line
    line = cli_error("--dry-run", "run", "c.yaml", "--secret", "WANDB_API_KEY=sk-123", code=2)
    assert "give the NAME only" in line and "sk-123" not in line
    line = cli_error("--dry-run", "run", "c.yaml", "--secret", "NOT_SET_ANYWHERE", code=2)
    assert "NOT_SET_ANYWHERE: not in the environment nor in .env" in line


def test_redaction_covers_escaped_forms_and_short_values():
    import shlex
    import urllib.parse

    from orchestrator.ops.env import redactor

    secret = 'p@ss w/"q\'&'
    redact = redactor([secret, "k9"])
    for form in (secret, json.dumps(secret)[1:-1], shlex.quote(secret), urllib.parse.quote(secret, safe=""),
                 urllib.parse.quote_plus(secret)):
        assert redact(f"token={form}!") == "token=***!", form
    assert redact("id k9 and k9x, bk9") == "id *** and k9x, bk9"  # short: only where it stands alone


def _all_cmdlines() -> str:
    """Every process's argv on this machine, from /proc (what `ps` shows any user)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                found.append(argv.replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return "\n".join(found)


def test_a_secret_is_on_no_process_argv_during_a_run(local_lab):
    """`run --secret NAME --wait` as a real process, on the local target with the stand-in trainer:
    /proc/*/cmdline of every process, sampled all along, never holds the value; the job did get it."""
    import subprocess
    import sys

    from conftest import sample_during

    secret = "sk-argv-" + os.urandom(8).hex()
    _, config = local_lab
    assert CliRunner().invoke(app, ["--config-file", str(config), "sync"]).exit_code == 0
    env = {**os.environ, "STANDIN_SECRET": secret, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "orchestrator", "--config-file", str(config), "run", "configs/leaky.yaml",
           "--secret", "STANDIN_SECRET", "--wait", "--interval", "0.1"]
    samples: list[str] = []
    done: list[subprocess.CompletedProcess[str]] = []
    sample_during(
        lambda: done.append(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)),
        lambda: samples.append(_all_cmdlines()),
    )
    result = done[0]
    assert result.returncode == 0, result.stderr
    seen = "\n".join(samples)
    assert "--secret STANDIN_SECRET" in seen  # the sampler saw the grpoctl process itself
    assert secret not in seen and secret not in result.stdout + result.stderr
    run_id = result.stdout.split()[0]
    logs = CliRunner().invoke(app, ["--config-file", str(config), "logs", run_id])
    assert "leaked: ***" in logs.stdout and secret not in logs.stdout  # the job had it; logs redact it


def test_a_hostile_watchdog_state_file_shows_nothing_instead_of_a_traceback():
    from orchestrator.cloud import autodelete

    hostile = [
        {"deletes_at": float("inf"), "idle_after_s": 1800}, {"deletes_at": 1e300, "idle_after_s": 1},
        {"deletes_at": float("nan"), "idle_after_s": 1}, {"deletes_at": 1.7e9, "idle_after_s": "x"},
        {"deletes_at": 1.7e9}, {"deletes_at": True, "idle_after_s": 1},
    ]
    for state in hostile:
        assert autodelete.describe(state, now=1.7e9) is None, state
    shown = autodelete.describe({"deletes_at": 1.7e9, "idle_after_s": 60}, now=1.7e9)
    assert shown is not None and "deletes itself at" in shown
