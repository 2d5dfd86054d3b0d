"""Bad input: one line on stderr, exit 2 (usage/config) or 3 (infrastructure), nothing changed remotely."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_error


def test_missing_config_file(folder: Path):
    assert "not found" in cli_error("--config-file", "nope.yaml", "sync", code=2)


def test_malformed_yaml_names_the_line(folder: Path):
    (folder / "grpoctl.yaml").write_text("targets:\n  lab: {kind: ssh, hosts: [a\n")
    line = cli_error("sync", code=2)
    assert "grpoctl.yaml" in line and "malformed YAML" in line and "line" in line
    assert not (folder / ".grpoctl").exists()


def test_unknown_key_and_wrong_type_name_key_and_file(folder: Path):
    (folder / "grpoctl.yaml").write_text("repo: {url: x, brnch: main}\n")
    assert "unknown key 'repo.brnch'" in cli_error("status", code=2)
    (folder / "grpoctl.yaml").write_text("targets:\n  lab: {kind: ssh, hosts: [], user: root}\n")
    line = cli_error("sync", code=2)
    assert "grpoctl.yaml" in line and "hosts" in line


def test_unknown_target(folder: Path):
    line = cli_error("--target", "nowhere", "sync", code=2)
    assert "unknown target 'nowhere'" in line and "local" in line
    assert not (folder / ".grpoctl").exists()


def test_bad_flags_and_unknown_run(folder: Path):
    assert "expected KEY=VALUE" in cli_error("run", "configs/x.yaml", "--env", "NOEQUALS", code=2)
    assert "no run 'missing'" in cli_error("status", "missing", code=2)
    assert "no summary.json" in cli_error("compare", str(folder), str(folder), code=2)
    assert not (folder / ".grpoctl").exists()


def _ssh_config(folder: Path, target: dict) -> None:
    cfg = {
        "repo": {"url": "file:///nonexistent.git", "branch": "main", "remote_dir": str(folder / "remote")},
        "targets": {"lab": {"kind": "ssh", "python": sys.executable, "connect_timeout_s": 2.0, **target}},
        "default_target": "lab",
    }
    (folder / "grpoctl.yaml").write_text(yaml.safe_dump(cfg))


def test_connection_refused_is_answered_within_seconds(folder: Path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _ssh_config(folder, {"hosts": [f"127.0.0.1:{port}"], "host_key_sha256": ["SHA256:" + "A" * 43]})
    line = cli_error("sync", code=3)
    assert "refused" in line and str(port) in line
    assert not (folder / "remote").exists()


def test_wrong_host_key_is_refused_and_nothing_changes(folder: Path, sshd, sshd_factory):
    other = sshd_factory()  # its key is a valid pin, just not this server's
    base = {
        "hosts": [sshd.address],
        "user": sshd.user,
        "ssh_key": str(sshd.client_key),
        "known_hosts": str(folder / "known_hosts"),
    }
    _ssh_config(folder, {**base, "host_key_sha256": [other.host_key_sha256]})
    line = cli_error("sync", code=3)
    assert "host key" in line.lower()
    # Unknown key, nothing pinned: refused too, unless the user says to trust it on first use.
    _ssh_config(folder, base)
    (folder / ".env").write_text("K=v\n")
    assert "host key" in cli_error("env", "push", code=3).lower()
    assert not (folder / "remote").exists()  # no command ever ran on the server
    assert (
        not (folder / "known_hosts").exists()
        or sshd.host_key_sha256 not in (folder / "known_hosts").read_text()
    )


def test_sop_file_errors(folder: Path):
    assert "not found" in cli_error("sop", "replay", "nope.yaml", code=2)
    sop = folder / "s.yaml"
    sop.write_text("name: s\nsteps: [up, {run: {name: a, config: c.yaml, colour: red}}]\n")
    assert "unknown key 'steps.1.run.colour'" in cli_error("sop", "replay", str(sop), code=2)
    sop.write_text("name: s\nsteps: [up, launch_rockets]\n")
    assert "unknown step kind" in cli_error("sop", "replay", str(sop), code=2)
    sop.write_text("name: s\nsteps: [{compare: {a: x, b: y}}]\n")
    assert "unknown run(s)" in cli_error("sop", "replay", str(sop), code=2)
    sop.write_text("name: s\nsteps: [up, down]\n")
    assert "--from 'sync'" in cli_error("sop", "replay", str(sop), "--from", "sync", code=2)
    assert not (folder / ".grpoctl").exists() and not (folder / "runs").exists()


def test_sync_refuses_when_workers_disagree_on_head(folder: Path):
    from orchestrator.config import parse_config
    from orchestrator.errors import InfraError
    from orchestrator.ops import sync as sync_ops
    from orchestrator.ops.session import open_session

    cfg = parse_config(
        {
            "repo": {"url": "file:///r.git", "branch": "main"},
            "targets": {"two": {"kind": "ssh", "hosts": ["10.0.0.5", "10.0.0.6"]}},
            "default_target": "two",
        },
        "test",
    )
    session = open_session(config=cfg, dry_run=True)
    assert session.script is not None
    session.script.responder = lambda command, worker: (
        (f"HEAD={'a' * 40 if worker.startswith('w0') else 'b' * 40}\n", 0) if "git fetch" in command else None
    )
    with pytest.raises(InfraError, match=r"disagree on HEAD after sync \(w0 a{12}, w1 b{12}\)"):
        sync_ops.sync(session)
