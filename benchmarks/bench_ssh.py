"""grpoctl's kept SSH connection vs the hand SOP's one `ssh` process per command, on loopback sshd.

    .venv/bin/python benchmarks/bench_ssh.py [--commands 30] [--rounds 10]

1. Per-command latency of `true`: grpoctl's SshTransport (one kept paramiko connection), a new paramiko
   connection per command, and `/usr/bin/ssh` per command (BatchMode, pinned known_hosts, no
   ControlMaster: what a hand-typed SOP line does, minus gcloud's own start-up).
2. A status poll (`test -f X.exit && cat X.exit; cat X.pid`) of 4 workers (4 sshd): one thread per
   worker vs one worker after the other on kept connections, and `ssh` per worker one after the other.

Loopback hides network round trips, so it understates the gap: over a WAN each new connection pays
several extra round trips for TCP + key exchange + auth, which a kept connection pays once.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grpoctl_testing.sshd import LoopbackSshd
from orchestrator.transport.ssh import SshTransport

SSH = "/usr/bin/ssh"


def kept_transport(server: LoopbackSshd) -> SshTransport:
    return SshTransport(
        server.host,
        server.port,
        user=server.user,
        key_file=server.client_key,
        host_key_sha256=[server.host_key_sha256],
        name=server.address,
    )


def ssh_cli(server: LoopbackSshd, command: str) -> Callable[[], None]:
    argv = [
        SSH, "-F", "/dev/null", "-i", str(server.client_key), "-p", str(server.port),
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "ControlMaster=no", "-o", "ControlPath=none",
        "-o", "LogLevel=ERROR", f"{server.user}@{server.host}", command,
    ]  # fmt: skip

    def call() -> None:
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    return call


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: page cache, sshd's first fork
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def ms(xs: list[float], q: float) -> float:
    return 1000 * (statistics.median(xs) if q == 0.5 else statistics.quantiles(xs, n=10)[int(q * 10) - 1])


def table(title: str, rows: list[tuple[str, list[float]]]) -> None:
    """Markdown table; `x first row` is each method's median over the first row's median."""
    base = statistics.median(rows[0][1])
    print(f"\n{title}\n")
    print(f"| {'method':<50} | median ms | p90 ms | x first row |")
    print(f"|{'-' * 52}|----------:|-------:|------------:|")
    for name, xs in rows:
        ratio = statistics.median(xs) / base
        print(f"| {name:<50} | {ms(xs, 0.5):9.1f} | {ms(xs, 0.9):6.1f} | {ratio:11.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=30, help="commands timed per method")
    parser.add_argument("--rounds", type=int, default=10, help="status polls timed per method")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ssh-") as tmp:
        first = LoopbackSshd(Path(tmp) / "s0")
        others = [LoopbackSshd(Path(tmp) / f"s{i}", client_key=first.client_key) for i in (1, 2, 3)]
        servers = [first, *others]
        for s in servers:
            s.start()
        try:
            run_benchmarks(servers, Path(tmp), args.commands, args.rounds)
        finally:
            for s in servers:
                s.stop()


def run_benchmarks(servers: list[LoopbackSshd], tmp: Path, n_commands: int, rounds: int) -> None:
    one = servers[0]
    kept = kept_transport(one)

    def fresh_paramiko() -> None:
        t = kept_transport(one)
        t.run("true")
        t.close()

    table(
        f"Per-command latency of `true` ({n_commands} commands each, loopback sshd)",
        [
            ("grpoctl SshTransport (kept connection)", timed(lambda: kept.run("true"), n_commands)),
            ("paramiko, new connection per command", timed(fresh_paramiko, n_commands)),
            ("/usr/bin/ssh per command (hand SOP)", timed(ssh_cli(one, "true"), n_commands)),
        ],
    )

    # A finished run's files on each worker; the poll reads the exit code and the PID.
    logs = tmp / "logs"
    logs.mkdir()
    (logs / "job.exit").write_text("0\n")
    (logs / "job.pid").write_text("4242\n")
    poll = f"test -f {logs}/job.exit && cat {logs}/job.exit; cat {logs}/job.pid"
    transports = [kept_transport(s) for s in servers]
    for t in transports:
        assert t.run(poll).stdout.split() == ["0", "4242"]
    pool = ThreadPoolExecutor(len(transports))
    clis = [ssh_cli(s, poll) for s in servers]

    def parallel() -> None:
        for result in pool.map(lambda t: t.run(poll), transports):
            assert result.ok

    def serial() -> None:
        for t in transports:
            assert t.run(poll).ok

    def serial_cli() -> None:
        for call in clis:
            call()

    table(
        f"Status poll of {len(servers)} workers ({rounds} polls each)",
        [
            ("grpoctl: kept connections, one thread per worker", timed(parallel, rounds)),
            ("kept connections, one worker after the other", timed(serial, rounds)),
            ("/usr/bin/ssh per worker, one after the other", timed(serial_cli, rounds)),
        ],
    )
    pool.shutdown()
    for t in [kept, *transports]:
        t.close()


if __name__ == "__main__":
    main()
