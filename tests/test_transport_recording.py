"""RecordingTransport and dry-run targets: every call recorded, scripted answers, no secret kept."""

from __future__ import annotations

import socket

import pytest

from orchestrator.config import LocalTargetConfig, RepoConfig, SshTargetConfig, TpuTargetConfig
from orchestrator.errors import UsageError
from orchestrator.targets import build_target
from orchestrator.targets.dry_run import DryRunTarget
from orchestrator.targets.topology import hosts_for_accelerator, parse_host, pins_per_host
from orchestrator.transport.base import Transport
from orchestrator.transport.recording import RecordedCall, RecordingScript, RecordingTransport


def test_records_runs_and_answers_from_rules_in_order() -> None:
    printed: list[str] = []
    script = RecordingScript(
        rules=[(r"rev-parse HEAD", "abc123\n", 0), (r"^cat .*\.exit$", "3\n", 0), (r"false", "", 1)],
        printer=printed.append,
    )
    t = script.transport("w0 host")
    assert isinstance(t, Transport)
    lines: list[str] = []
    head = t.run(
        "git rev-parse HEAD", env={"EVAL_FULL_SWEEP": "1"}, cwd="/r", timeout=5, on_output=lines.append
    )
    assert (head.exit_code, head.stdout, lines) == (0, "abc123\n", ["abc123"])
    assert t.run("cat logs/x.exit").stdout == "3\n"
    assert t.run("false").exit_code == 1
    assert t.run("anything else").exit_code == 0  # unmatched: succeeds silently
    assert script.commands() == ["git rev-parse HEAD", "cat logs/x.exit", "false", "anything else"]
    assert t.calls[0] == RecordedCall("w0 host", "run", "git rev-parse HEAD", ("EVAL_FULL_SWEEP",), "/r", 5)
    assert printed[0] == "[w0 host] $ git rev-parse HEAD  # cwd=/r env=EVAL_FULL_SWEEP"


def test_responder_comes_first_and_can_fall_through() -> None:
    def responder(command: str, worker: str) -> tuple[str, int] | None:
        return (f"{worker}\n", 7) if command == "whoami" else None

    t = RecordingScript(rules=[(".", "rule\n", 0)], responder=responder).transport("w1 b")
    assert (t.run("whoami").stdout, t.run("whoami").exit_code) == ("w1 b\n", 7)
    assert t.run("other").stdout == "rule\n"


def test_put_records_path_mode_size_but_never_contents() -> None:
    printed: list[str] = []
    secret = "sk-PLANTED-recording-1234567890"
    script = RecordingScript(printer=printed.append)
    t = script.transport("w0 h")
    t.put(f"WANDB_API_KEY={secret}\n".encode(), "/r/.env", mode=0o600)
    (call,) = t.calls
    assert (call.kind, call.path, call.mode, call.size) == ("put", "/r/.env", 0o600, len(secret) + 15)
    assert printed == [f"[w0 h] put /r/.env (mode 0600, {len(secret) + 15} bytes)"]
    assert secret not in repr(script.journal) + repr(script) + "".join(printed)


def test_get_serves_scripted_files_and_records_the_read() -> None:
    t = RecordingScript(files={"/r/summary.json": b"{}"}).transport("w0 h")
    assert t.get("/r/summary.json") == b"{}"
    with pytest.raises(FileNotFoundError, match="dry run"):
        t.get("/r/missing")
    assert [c.path for c in t.calls] == ["/r/summary.json", "/r/missing"]


def test_one_journal_shared_by_all_workers_keeps_the_global_order() -> None:
    script = RecordingScript()
    a, b = script.transport("w0 a"), script.transport("w1 b")
    a.run("one")
    b.run("two")
    a.run("three")
    assert script.commands() == ["one", "two", "three"]
    assert script.commands("w1 b") == ["two"]
    assert [c.command for c in a.calls] == ["one", "three"]


def test_default_transport_has_its_own_script() -> None:
    t = RecordingTransport()
    t.run("x")
    assert t.name == "w0 dry-run" and [c.command for c in t.calls] == ["x"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("cfg", "labels"),
    [
        (
            SshTargetConfig(kind="ssh", hosts=["10.0.0.5", "10.0.0.6:2222"]),
            ["w0 10.0.0.5:22", "w1 10.0.0.6:2222"],
        ),
        (
            TpuTargetConfig(kind="tpu", project="p", zone="us-east1-d", name="n", accelerator_type="v6e-16"),
            ["w0 n-w0", "w1 n-w1", "w2 n-w2", "w3 n-w3"],
        ),
    ],
)
def test_dry_run_target_has_the_real_shape_and_records(cfg, labels) -> None:  # type: ignore[no-untyped-def]
    printed: list[str] = []
    target = build_target(
        "t", cfg, RepoConfig(remote_dir="/w"), dry_run=True, script=RecordingScript(printer=printed.append)
    )
    assert isinstance(target, DryRunTarget)
    assert [t.name for t in target.transports()] == labels
    assert target.remote_dir == "/w" and target.state().state == "DRY_RUN"
    target.up()
    target.down()
    assert target.script.commands() == ["true"] * len(labels)
    assert len(printed) == len(labels)


def test_dry_run_local_target_touches_no_disk(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    target = build_target("local", LocalTargetConfig(workdir="wd"), RepoConfig(), dry_run=True)
    target.up()
    assert target.remote_dir == str(tmp_path / "wd" / "grpoctl-work")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("accel", "hosts"),
    [
        ("v6e-1", 1),
        ("v6e-4", 1),
        ("v6e-8", 1),
        ("v6e-16", 4),
        ("v6e-32", 8),
        ("v6e-256", 64),
        ("v5litepod-16", 4),
        ("v4-8", 1),
        ("v4-32", 4),
        ("v5p-16", 2),
    ],
)
def test_hosts_for_accelerator(accel: str, hosts: int) -> None:
    assert hosts_for_accelerator(accel) == hosts


# v2/v3: the trainer cannot compile for them (grpoctl_contract/accelerators.py decides for both halves).
@pytest.mark.parametrize("bad", ["v6e", "v9x-8", "tpu-v6e-8", "v6e-8x", "v3-8", "v2-8", "v6e-12"])
def test_bad_accelerator_type_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="accelerator_type"):
        hosts_for_accelerator(bad)


def test_parse_host_and_pins() -> None:
    assert parse_host("h") == ("h", 22)
    assert parse_host("h:2222") == ("h", 2222)
    assert parse_host("[::1]:2200") == ("::1", 2200)
    assert parse_host("fe80::1") == ("fe80::1", 22)
    for bad in ["h:x", "h:0", ":22", "[::1"]:
        with pytest.raises(UsageError, match="host"):
            parse_host(bad)
    assert pins_per_host([], 2) == [(), ()]
    assert pins_per_host(["SHA256:a"], 2) == [("SHA256:a",), ("SHA256:a",)]
    assert pins_per_host(["SHA256:a", "SHA256:b"], 2) == [("SHA256:a",), ("SHA256:b",)]
    with pytest.raises(UsageError, match="3 entries for 2 hosts"):
        pins_per_host(["SHA256:a"] * 3, 2)
    with pytest.raises(UsageError, match="SHA256:"):
        pins_per_host(["MD5:aa"], 1)
