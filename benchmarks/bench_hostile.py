"""What a hostile worker's files cost grpoctl now: wall time and peak Python memory of `untrusted.read` on a
symlink to /dev/zero, a FIFO, a 512 MB sparse file, and a legitimate 1 MB summary, over the local target
and over a loopback sshd (a real OpenSSH server on 127.0.0.1).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hostile.py

Before this change the same reads grew to 3.4 GB (/dev/zero, then MemoryError), 1.1 GB (512 MB file) or
hung for ever (FIFO): issue 22's measurements. Those are not re-run here: they would exhaust the machine.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
from pathlib import Path

from grpoctl_testing.sshd import LoopbackSshd
from orchestrator import untrusted
from orchestrator.errors import WorkerReadError
from orchestrator.transport.local import LocalTransport
from orchestrator.transport.ssh import SshTransport


def measure(t, path: Path) -> tuple[str, float, float]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        data = untrusted.read(t, str(path), untrusted.SUMMARY)
        outcome = f"read {len(data)} bytes"
    except WorkerReadError as err:
        outcome = str(err).split(str(path), 1)[-1].strip()
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return outcome, elapsed, peak / 2**20


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {
            "symlink to /dev/zero": root / "zero.json",
            "FIFO": root / "fifo.json",
            "512 MB sparse file": root / "big.json",
            "1 MB summary (ok)": root / "ok.json",
        }
        files["symlink to /dev/zero"].symlink_to("/dev/zero")
        os.mkfifo(files["FIFO"])
        with open(files["512 MB sparse file"], "wb") as f:
            f.truncate(512 << 20)
        files["1 MB summary (ok)"].write_bytes(b"{" + b" " * ((1 << 20) - 2) + b"}")
        with LoopbackSshd(root / "sshd") as server:
            ssh = SshTransport(server.host, server.port, user=server.user, key_file=server.client_key,
                               host_key_sha256=[server.host_key_sha256], name="w0 ssh")
            ssh.run("true", timeout=30)  # connect first: the rows time the reads only
            print(f"{'target':6} {'file':22} {'wall s':>8} {'peak MiB':>9}  outcome")
            for name, t in (("local", LocalTransport()), ("ssh", ssh)):
                for label, path in files.items():
                    outcome, elapsed, peak = measure(t, path)
                    print(f"{name:6} {label:22} {elapsed:8.3f} {peak:9.2f}  {outcome}")
            ssh.close()


if __name__ == "__main__":
    main()
