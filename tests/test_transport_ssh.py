"""SshTransport and SshTarget against real OpenSSH servers on 127.0.0.1 (fixtures in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import modes_during, ps_during

from grpoctl_testing.sshd import LoopbackSshd, free_port, generate_key
from orchestrator.config import RepoConfig
from orchestrator.errors import HostKeyError, InfraError, UsageError
from orchestrator.targets import build_target
from orchestrator.targets.ssh import SshTarget
from orchestrator.transport.ssh import SshTransport, sha256_fingerprint


def transport_for(server: LoopbackSshd, **overrides) -> SshTransport:  # type: ignore[no-untyped-def]
    options = {
        "user": server.user,
        "key_file": server.client_key,
        "host_key_sha256": [server.host_key_sha256],
        "known_hosts": server.root / "client_known_hosts",
        "connect_timeout": 5.0,
        "name": f"w0 {server.address}",
    }
    return SshTransport(server.host, server.port, **{**options, **overrides})


@pytest.fixture(scope="module")
def ssh(sshd: LoopbackSshd):  # type: ignore[no-untyped-def]
    t = transport_for(sshd)
    yield t
    t.close()


# -- commands ------------------------------------------------------------------------------------


def test_cwd_tilde_is_the_remote_users_home(ssh: SshTransport) -> None:
    # (env and cwd as such: test_transport_contract.py)
    assert ssh.run("pwd", cwd="~").stdout.strip() == str(Path("~").expanduser())


# -- files ---------------------------------------------------------------------------------------


def test_put_failure_raises_and_leaves_no_temp_file(ssh: SshTransport, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("non-empty directory")
    with pytest.raises(InfraError, match=r"put .*taken failed"):
        ssh.put(b"data", str(tmp_path / "taken"), mode=0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(InfraError, match="put .* failed: mkdir: .*Not a directory"):
        ssh.put(b"x" * 4_000_000, str(tmp_path / "file" / "sub" / ".env"), mode=0o600)


def test_get_missing_file(ssh: SshTransport, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        ssh.get(str(tmp_path / "absent"))


def test_planted_secret_never_in_ps_nor_output(ssh: SshTransport, tmp_path: Path) -> None:
    secret = f"sk-PLANTED-{time.monotonic_ns()}-do-not-leak"
    payload = f"WANDB_API_KEY={secret}\n".encode() * 200_000  # ~10 MB: the put lasts a while
    seen = ps_during(lambda: ssh.put(payload, str(tmp_path / ".env"), mode=0o600))
    assert ".env.grpoctl-tmp" in seen  # ps did see the put in flight
    assert secret not in seen
    lines: list[str] = []
    result = ssh.run(f"wc -c < {tmp_path / '.env'}; stat -c %a {tmp_path / '.env'}", on_output=lines.append)
    assert result.stdout.split() == [str(len(payload)), "600"]
    assert secret not in result.stdout + result.stderr + "".join(lines)


def test_put_temp_file_is_0600_while_the_data_streams(ssh: SshTransport, tmp_path: Path) -> None:
    # Sampled from another thread while a multi-MB put is in flight: mode 0600 must hold from the first
    # byte, not only once the data has arrived (a 0644 temp file is readable by others meanwhile).
    folder = tmp_path / "dest"
    folder.mkdir()
    payload = b"WANDB_API_KEY=x\n" * 1_000_000  # 16 MB
    seen = modes_during(folder, lambda: ssh.put(payload, str(folder / ".env"), mode=0o600))
    temps = {name: modes for name, modes in seen.items() if name != ".env"}
    assert temps, f"the temp file was never seen in flight: {seen}"
    assert all(modes == {0o600} for modes in temps.values()), temps
    assert seen.get(".env", {0o600}) == {0o600}
    assert ssh.run(f"stat -c %a {folder / '.env'}").stdout.strip() == "600"


# -- host keys -----------------------------------------------------------------------------------


def test_wrong_pinned_fingerprint_is_refused_and_runs_nothing(sshd: LoopbackSshd, tmp_path: Path) -> None:
    wrong = sha256_fingerprint(b"not the key")
    t = transport_for(sshd, host_key_sha256=[wrong])
    with pytest.raises(HostKeyError) as err:
        t.run(f"touch {tmp_path}/ran")
    message = str(err.value)
    assert "\n" not in message and sshd.address in message
    assert wrong in message and sshd.host_key_sha256 in message
    assert not (tmp_path / "ran").exists()


def test_unknown_key_refused_unless_accepted_then_remembered(sshd: LoopbackSshd, tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"
    with pytest.raises(HostKeyError, match="unknown host key .*--accept-new-host-key"):
        transport_for(sshd, host_key_sha256=[], known_hosts=known).run("true")
    assert not known.exists()
    accepted = transport_for(sshd, host_key_sha256=[], known_hosts=known, accept_new_host_key=True)
    assert accepted.run("echo ok").stdout == "ok\n"
    assert known.stat().st_mode & 0o777 == 0o600
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519 " in known.read_text()
    entry = f"[127.0.0.1]:{sshd.port}"
    assert subprocess.run(["ssh-keygen", "-F", entry, "-f", str(known)], capture_output=True).returncode == 0
    # Now known: a transport that does not accept new keys gets in through known_hosts,
    # also once OpenSSH has hashed the host names (Debian's default HashKnownHosts yes).
    assert transport_for(sshd, host_key_sha256=[], known_hosts=known).run("echo again").stdout == "again\n"
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert entry not in known.read_text()
    assert transport_for(sshd, host_key_sha256=[], known_hosts=known).run("echo hashed").stdout == "hashed\n"


def test_known_hosts_mismatch_is_refused(sshd: LoopbackSshd, tmp_path: Path) -> None:
    other = generate_key(tmp_path / "other")
    kind, blob = Path(f"{other}.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    t = transport_for(sshd, host_key_sha256=[], known_hosts=known, accept_new_host_key=True)
    with pytest.raises(HostKeyError, match="host key mismatch") as err:
        t.run("true")
    assert sshd.host_key_sha256 in str(err.value)
    assert known.read_text().count("\n") == 1  # never "fixed" silently


def test_known_hosts_key_of_another_type_is_the_one_checked(sshd_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # The server offers ed25519 and ecdsa; known_hosts has only its ecdsa key (common for older entries).
    # The client must negotiate ecdsa and match it, not call the host unknown.
    server = sshd_factory(extra_host_key_types=("ecdsa",))
    kind, blob = (server.root / "host_ecdsa.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {kind} {blob}\n")
    t = transport_for(server, host_key_sha256=[], known_hosts=known)
    assert t.run("echo matched").stdout == "matched\n"
    t.close()
    server.stop()


# -- failures and reconnects ---------------------------------------------------------------------


def test_connection_refused_is_an_infra_error_within_seconds() -> None:
    port = free_port()  # nobody listens here
    slept: list[float] = []
    t = SshTransport(
        "127.0.0.1", port, key_file=None, connect_timeout=2.0, name="w0 nowhere", sleep=slept.append
    )
    # Bounded by the attempt count (the message names it), not by a clock.
    with pytest.raises(InfraError, match=rf"127.0.0.1:{port}: connection refused \(3 attempts\)") as err:
        t.run("true")
    assert "\n" not in str(err.value) and err.value.exit_code == 3
    assert slept == [0.5, 1.0]  # the default backoff, doubling, no jitter; nothing connected
    assert t.connects == 0


def test_auth_failure_is_an_infra_error(sshd: LoopbackSshd, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path / "stranger")
    with pytest.raises(InfraError, match="authentication failed"):
        transport_for(sshd, key_file=stranger).run("true")


def test_missing_key_file_is_a_usage_error(sshd: LoopbackSshd, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        transport_for(sshd, key_file=tmp_path / "nope").run("true")


def test_silent_server_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts TCP, never speaks SSH
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        t = SshTransport("127.0.0.1", port, connect_timeout=0.5, connect_attempts=1, name="w0 mute")
        with pytest.raises(InfraError, match="handshake failed within 0.5 s"):  # one attempt, then out
            t.run("true")


def test_reconnects_after_sshd_restart(sshd_factory) -> None:  # type: ignore[no-untyped-def]
    server = sshd_factory()
    t = transport_for(server)
    first = t.run("echo $SSH_CONNECTION").stdout.split()
    server.restart()  # kills the server and its connections by PID; same port, same host key
    assert t.run("echo back").stdout == "back\n"  # the same SshTransport object
    second = t.run("echo $SSH_CONNECTION").stdout.split()
    assert t.connects == 2 and first[1] != second[1]  # a new client port: a new connection
    server.stop()
    with pytest.raises(InfraError, match="connection refused"):
        t.run("true")
    server.start()
    assert t.run("echo up").stdout == "up\n"


def test_connection_lost_mid_command_is_an_infra_error(sshd_factory) -> None:  # type: ignore[no-untyped-def]
    server = sshd_factory()
    t = transport_for(server)
    t.run("true")
    dropper = threading.Timer(0.5, server.stop)
    dropper.start()
    with pytest.raises(InfraError, match="lost|failed"):
        t.run("sleep 5")
    dropper.join()
    server.start()
    assert t.run("echo recovered").stdout == "recovered\n"


# -- the SSH target ------------------------------------------------------------------------------


def test_two_worker_target_runs_in_parallel_on_both(sshd_pair, ssh_target_config) -> None:  # type: ignore[no-untyped-def]
    a, b = sshd_pair
    target = build_target("lab", ssh_target_config(a, b), RepoConfig(remote_dir="/srv/work"))
    assert isinstance(target, SshTarget)
    assert [t.name for t in target.transports()] == [f"w0 {a.address}", f"w1 {b.address}"]
    assert target.remote_dir == "/srv/work"
    target.up()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda t: t.run("sleep 0.5; echo $SSH_CONNECTION"), target.transports()))
    assert [r.stdout.split()[3] for r in results] == [str(a.port), str(b.port)]
    assert target.state().state == "REACHABLE"
    target.close()


def test_target_with_one_wrong_pin_names_the_worker(sshd_pair, ssh_target_config) -> None:  # type: ignore[no-untyped-def]
    a, b = sshd_pair
    cfg = ssh_target_config(a, b, host_key_sha256=[a.host_key_sha256, a.host_key_sha256])
    target = build_target("lab", cfg, RepoConfig())
    with pytest.raises(HostKeyError, match=f"w1 {b.address}"):
        target.up()
    state = target.state()
    assert not state.healthy and list(state.details["unreachable"]) == [f"w1 {b.address}"]


def test_exit_codes_of_commands_killed_by_signals(ssh: SshTransport) -> None:
    assert ssh.run("sh -c 'kill -9 $$'").exit_code == 137  # a child killed: the shell reports 128+9
    killed = ssh.run("kill -9 $$")  # the remote shell itself: SSH sends no exit status at all
    assert killed.exit_code == 255 and "killed by a signal" in killed.stderr
    assert ssh.run("echo fine").ok
