"""LoopbackSshd: a private OpenSSH server on 127.0.0.1 for tests, benchmarks and fake TPU workers.

Everything lives in one folder: config, ed25519 host key, client key, authorized_keys, pid file, log
and a known_hosts line for the client. The server runs as the current user, is killed by PID, and can
be restarted on the same port with the same host key (to test reconnects).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from orchestrator.transport.ssh import sha256_fingerprint

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path
SSH_KEYGEN = "ssh-keygen"

_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
{host_keys}
PidFile {root}/sshd.pid
AuthorizedKeysFile {authorized_keys}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin {permit_root_login}
UseDNS no
PrintMotd no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
LogLevel ERROR
# bash sources ~/.bashrc for commands run by sshd unless it is a nested shell: this machine's
# .bashrc (pyenv init) costs ~0.3 s per command and is not what a worker runs.
SetEnv SHLVL=1{session_env}
"""


def sshd_available() -> bool:
    return os.access(SSHD, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_key(path: Path, kind: str = "ed25519") -> Path:
    """A fresh unencrypted key pair (`ssh-keygen -t kind`) at `path` and `path.pub`."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", "grpoctl-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(_children(child))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class LoopbackSshd:
    """`with LoopbackSshd() as s:` ... `s.port`, `s.client_key`, `s.host_key_sha256`, `s.restart()`."""

    host = "127.0.0.1"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        client_key: str | os.PathLike[str] | None = None,
        session_env: dict[str, str] | None = None,
        extra_host_key_types: tuple[str, ...] = (),
        authorized_keys_file: str | None = None,
        permit_root_login: str = "prohibit-password",
    ) -> None:
        """`client_key`: a private key (with `.pub` beside it) to authorize instead of a generated one,
        so that several servers accept the same client (a multi-worker target has one `ssh_key`).
        `session_env`: more variables for every session (sshd takes only its first SetEnv line); the
        fake TPU API gives each VM its own HOME and a tag that finds the processes it started.
        `extra_host_key_types`: e.g. ("rsa",): host keys beside the ed25519 one (`host_key_sha256`).
        `authorized_keys_file`: sshd's AuthorizedKeysFile (default `root/authorized_keys`; `%u` is the
        user: the fake TPU VMs keep one file per user, as the guest agent does). `permit_root_login`:
        sshd's PermitRootLogin (`no`: an image that refuses root)."""
        self.session_env = dict(session_env or {})
        self._authorized_keys_file = authorized_keys_file
        self._permit_root_login = permit_root_login
        if any('"' in f"{k}{v}" or "\n" in f"{k}{v}" for k, v in self.session_env.items()):
            raise ValueError("session_env names and values cannot contain double quotes or newlines")
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="grpoctl-sshd-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.user = (
            os.environ.get("USER")
            or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self.host_keys = [self.root / f"host_{kind}" for kind in ("ed25519", *extra_host_key_types)]
        for key, kind in zip(self.host_keys, ("ed25519", *extra_host_key_types), strict=True):
            if not key.exists():
                generate_key(key, kind)
        self.client_key = Path(client_key) if client_key is not None else self.root / "client_ed25519"
        if not self.client_key.exists():
            generate_key(self.client_key)
        (self.root / "authorized_keys").write_bytes(Path(f"{self.client_key}.pub").read_bytes())
        kind, blob_b64 = (self.root / "host_ed25519.pub").read_text().split()[:2]
        self.host_key_line = f"{kind} {blob_b64}"
        self.host_key_sha256 = sha256_fingerprint(base64.b64decode(blob_b64))

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> LoopbackSshd:
        """Start on a free port (or on the same port as before, after `stop`)."""
        if self._proc is not None:
            raise RuntimeError(f"sshd already running on port {self.port}")
        if os.geteuid() == 0:  # sshd run as root insists on its privilege-separation folder
            os.makedirs("/run/sshd", exist_ok=True)
        keep_port = self.port != 0
        config = self.root / "sshd_config"
        env = "".join(f' "{k}={v}"' for k, v in self.session_env.items())  # quoted: spaces survive
        host_keys = "\n".join(f"HostKey {key}" for key in self.host_keys)
        for _ in range(5):  # a picked port can be taken before sshd binds it: pick again
            port = self.port if keep_port else free_port()
            config.write_text(
                _CONFIG.format(
                    port=port,
                    root=self.root,
                    session_env=env,
                    host_keys=host_keys,
                    authorized_keys=self._authorized_keys_file or f"{self.root}/authorized_keys",
                    permit_root_login=self._permit_root_login,
                )
            )
            log = (self.root / "sshd.log").open("ab")
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
            log.close()
            if self._wait_listening(port, timeout_s):
                atexit.register(self._cleanup)  # a forgotten server must not outlive its owner
                self.port = port
                (self.root / "known_hosts").write_text(f"[{self.host}]:{port} {self.host_key_line}\n")
                return self
            self._proc.wait()
            self._proc = None
            if keep_port:
                break
        tail = (self.root / "sshd.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"sshd did not start (log {self.root / 'sshd.log'}):\n{tail}")

    def _wait_listening(self, port: int, timeout_s: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.02)
        self._proc.kill()
        return False

    def stop(self) -> None:
        """Kill the server and every connection it serves, by PID (clients see the connection drop)."""
        if self._proc is None:
            return
        master = self._proc.pid
        # Per-connection sshd processes live in their own sessions: find them before they get orphaned.
        sessions = [pid for pid in _descendants(master) if _comm(pid).startswith("sshd")]
        for pid in [master, *sessions]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._proc.wait()
        self._proc = None
        atexit.unregister(self._cleanup)

    def _cleanup(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Same port, same host key: what a rebooted worker looks like to a client."""
        self.stop()
        self.start()

    @property
    def address(self) -> str:
        """The `host:port` string a target's `hosts` list takes."""
        return f"{self.host}:{self.port}"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file that trusts exactly this server's host key on its port."""
        return self.root / "known_hosts"

    def __enter__(self) -> LoopbackSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._cleanup()
