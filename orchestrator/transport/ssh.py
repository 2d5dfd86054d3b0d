"""SshTransport: one kept paramiko connection per host, pinned host keys, reconnect on the next call.

Why paramiko's Transport and not SSHClient: the host-key decision (pins first, then known_hosts, then
trust-on-first-use only when asked) must happen before any authentication or command, in one place.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import os
import posixpath
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paramiko

from orchestrator.errors import AuthError, HostKeyError, InfraError, UsageError
from orchestrator.retry import Backoff, retry_call
from orchestrator.transport.base import Command, CommandResult, OutputCallback, Transport
from orchestrator.transport.shell import (
    EXIT_GRACE_S,
    GET_MISSING,
    GET_NOT_REGULAR,
    GET_TOO_LARGE,
    TIMEOUT_EXIT_CODE,
    LineSplitter,
    get_script,
    not_regular,
    quote,
    quote_path,
    read_timed_out,
    script,
    timed_out_note,
    too_large,
)
from orchestrator.untrusted import DEFAULT_GET_CAP

_READ_CHUNK = 65536
# The remote `timeout` kills the command; the client gives it this much longer before dropping the channel.
_CLIENT_TIMEOUT_SLACK_S = 10.0
# What OpenSSH's client reports when the server gave no exit status (the process died by a signal).
_NO_STATUS_EXIT_CODE = 255
# known_hosts key names -> the negotiation names that select them.
_NEGOTIATED_TYPES = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}

# paramiko logs dropped connections at ERROR level; without a handler Python would print them raw.
# Our errors say what happened in one line; `-v` (root logging config) still sees paramiko's records.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


def sha256_fingerprint(key_blob: bytes) -> str:
    """OpenSSH's `SHA256:...` fingerprint of a public key blob (base64 without padding)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


class _Retryable(Exception):
    """A connect attempt failed in a way that another attempt might not (refused, timed out, reset)."""


class _SessionLost(Exception):
    """The kept connection died under us (sshd restarted, a network blip) before a channel opened."""


# Nothing ran on a lost session, so one reconnect and one more try is safe. No wait between them: the
# reconnect is the remedy, and `_ensure_connected` backs off on its own while the host does not answer.
_REOPEN_ONCE = Backoff(attempts=2, first_s=0.0, jitter=False)


class SshTransport(Transport):
    """Runs commands on one host over one kept SSH connection (see `Transport`)."""

    def __init__(
        self,
        host: str,
        port: int = 22,
        *,
        user: str = "root",
        key_file: str | os.PathLike[str] | None = None,
        host_key_sha256: Sequence[str] = (),
        known_hosts: str | os.PathLike[str] | None = None,
        accept_new_host_key: bool = False,
        connect_timeout: float = 10.0,
        connect_attempts: int = 3,
        backoff_s: float = 0.5,
        keepalive_s: float = 15.0,
        name: str | None = None,
        sleep: Callable[[float], None] = time.sleep,  # between connect attempts; tests count the waits
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self.name = name or f"{host}:{port}"
        self.connects = 0  # connections opened so far: 1 + reconnects
        self._key_file = Path(key_file).expanduser() if key_file else None
        self._pins = tuple(host_key_sha256)
        self._known_hosts = Path(known_hosts or "~/.ssh/known_hosts").expanduser()
        self._accept_new = accept_new_host_key
        self._connect_timeout = connect_timeout
        self._attempts = max(1, connect_attempts)
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._keepalive_s = keepalive_s
        self._lock = threading.Lock()
        self._conn: paramiko.Transport | None = None
        self._keys: list[paramiko.PKey] | None = None

    @property
    def _where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def _known_hosts_entry(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    # -- the Transport interface ---------------------------------------------------------------

    def _run(self, cmd: Command) -> CommandResult:
        # The trailing `exit $?` stops bash from exec-ing the last command in its place: if that command
        # dies by a signal, bash reports 128+N (paramiko drops SSH's exit-signal message).
        text = quote(script(cmd.text, env=cmd.env, cwd=cmd.cwd) + "\nexit $?")
        # The remote `timeout` kills the command's whole process group; closing a channel would not.
        # (`timeout 0` would mean "no limit": the smallest limit it takes is 1 ms.)
        timeout = cmd.timeout
        limit = None if timeout is None else max(timeout, 0.001)
        line = f"bash -c {text}" if limit is None else f"timeout -k 5 {limit:.3f} bash -c {text}"
        code, out, err = self._exec(line, None, cmd.deadline(_CLIENT_TIMEOUT_SLACK_S), cmd.on_output)
        stdout, stderr = out.close(), err.close()
        elapsed = cmd.elapsed()
        if code == TIMEOUT_EXIT_CODE and timeout is not None and elapsed >= timeout:
            stderr += timed_out_note(self.name, timeout)
        return CommandResult(self.name, code, stdout, stderr, elapsed, len(out.data))

    def put(self, data: bytes, remote_path: str, *, mode: int = 0o644) -> None:
        """Stream `data` through the channel's stdin into a 0600 temp file, chmod, rename over `remote_path`.

        The contents never appear on a command line; only paths and the mode do.
        """
        folder = posixpath.dirname(remote_path) or "."
        tmp = f"{remote_path}.grpoctl-tmp.{secrets.token_hex(6)}"
        # Each path is quoted once, into a variable; the trap names the variable, so no quoted text is
        # ever nested inside other quotes (which is what let a `'` in a path run commands).
        text = (
            f"set -e; dest={quote_path(remote_path)}; tmp={quote_path(tmp)}; dir={quote_path(folder)}; "
            'mkdir -p -- "$dir"; umask 077; trap \'rm -f -- "$tmp"\' EXIT; '
            f'cat > "$tmp"; chmod {mode:o} -- "$tmp"; mv -f -T -- "$tmp" "$dest"'
        )
        code, _, err = self._exec(f"bash -c {quote(text)}", data, None, None)
        if code != 0:
            raise InfraError(f"{self.name}: put {remote_path} failed: {_last_line(err.close())}")

    def get(self, remote_path: str, *, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
        """A regular file only (`test -f` on the worker, before it is opened), at most `max_bytes` (the
        worker's `head` stops there, and so does this end, whatever the worker sends), within `timeout`."""
        cap = DEFAULT_GET_CAP if max_bytes is None else max_bytes
        line = f"bash -c {quote(get_script(remote_path, cap))}"
        deadline = None
        if timeout is not None:
            line = f"timeout -k 2 {max(timeout, 0.001):.3f} {line}"
            deadline = time.monotonic() + timeout + _CLIENT_TIMEOUT_SLACK_S
        code, out, err = self._exec(line, None, deadline, None, max_out=cap)
        message = _last_line(err.close())
        if out.dropped or code == GET_TOO_LARGE:
            raise too_large(self.name, remote_path, cap)
        if code == GET_MISSING:
            raise FileNotFoundError(f"{self.name}: no such file {remote_path}")
        if code == GET_NOT_REGULAR:
            raise not_regular(self.name, remote_path, message if message != "no error output" else "")
        if code == TIMEOUT_EXIT_CODE and timeout is not None:
            raise read_timed_out(self.name, remote_path, timeout)
        if code != 0:
            if "No such file" in message:
                raise FileNotFoundError(f"{self.name}: no such file {remote_path}")
            raise InfraError(f"{self.name}: get {remote_path} failed: {message}")
        return out.data

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def connect(self) -> None:
        """Open the connection now (it is otherwise opened by the first call)."""
        with self._lock:
            self._ensure_connected()

    # -- one command on one channel ------------------------------------------------------------

    def _exec(
        self,
        line: str,
        stdin: bytes | None,
        deadline: float | None,
        on_output: OutputCallback | None,
        *,
        max_out: int | None = None,
    ) -> tuple[int, LineSplitter, LineSplitter]:
        """Run `line`; with `max_out`, stop reading (and drop the channel) once stdout passed that many
        bytes (the caller sees `out.dropped`)."""
        chan = self._open_channel()
        try:
            chan.exec_command(line)
            if stdin is not None:
                # If the remote side stops reading, it failed: its stderr (read below) says why.
                with contextlib.suppress(OSError):
                    chan.sendall(stdin)
            chan.shutdown_write()
            if max_out is None:
                out, err = LineSplitter(on_output), LineSplitter(on_output)
            else:
                out, err = LineSplitter(on_output, max_bytes=max_out), LineSplitter(on_output)
            timed_out = self._drain(chan, out, err, deadline, max_out is not None)
            if out.dropped and max_out is not None:
                return TIMEOUT_EXIT_CODE, out, err  # the caller refuses it; closing the channel stops it
            if timed_out:
                return TIMEOUT_EXIT_CODE, out, err
            if chan.exit_status == -1:  # closed without an exit status
                if not chan.eof_received or not chan.get_transport().is_active():
                    raise InfraError(f"{self.name}: connection to {self._where} lost while a command ran")
                err.feed(b"grpoctl: the remote command was killed by a signal\n")
                return _NO_STATUS_EXIT_CODE, out, err
            return chan.exit_status, out, err
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise InfraError(f"{self.name}: connection to {self._where} failed mid-command: {exc}") from None
        finally:
            chan.close()

    @staticmethod
    def _drain(
        chan: paramiko.Channel,
        out: LineSplitter,
        err: LineSplitter,
        deadline: float | None,
        stop_when_full: bool = False,
    ) -> bool:
        """Feed output to the splitters until the command is done; True if the deadline passed first.
        `stop_when_full`: return as soon as stdout went past its cap (a `get` refuses the file then)."""
        exited_at: float | None = None
        while True:
            while chan.recv_ready():
                out.feed(chan.recv(_READ_CHUNK))
                if stop_when_full and out.dropped:
                    return False
            while chan.recv_stderr_ready():
                err.feed(chan.recv_stderr(_READ_CHUNK))
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return True
            left = 3600.0 if deadline is None else deadline - now
            if chan.eof_received or chan.closed:
                # All output is in; the exit status is usually right behind (or the connection died).
                if chan.exit_status_ready() or chan.closed or not chan.get_transport().is_active():
                    return False
                chan.status_event.wait(min(left, 0.5))
                continue
            if chan.exit_status_ready():
                exited_at = exited_at or now
                if now - exited_at > EXIT_GRACE_S:  # a detached child holds the output open
                    return False
            # Data and EOF wake the channel's pipe; the exit status does not, hence the short wait.
            select.select([chan], [], [], min(left, 0.25))

    # -- connection management -----------------------------------------------------------------

    def _open_channel(self) -> paramiko.Channel:
        with self._lock:
            try:
                return retry_call(
                    self._open_session, retry_on=lambda e: isinstance(e, _SessionLost), policy=_REOPEN_ONCE
                )
            except _SessionLost as exc:
                raise InfraError(f"{self.name}: no session on {self._where}: {exc}") from None

    def _open_session(self) -> paramiko.Channel:
        conn = self._ensure_connected()
        try:
            return conn.open_session(timeout=self._connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            conn.close()  # dead: the next try connects afresh
            self._conn = None
            raise _SessionLost(str(exc)) from None

    def _ensure_connected(self) -> paramiko.Transport:
        if self._conn is not None and self._conn.is_active():
            return self._conn
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        policy = Backoff(attempts=self._attempts, first_s=self._backoff_s, max_s=math.inf, jitter=False)
        try:
            self._conn = retry_call(
                self._connect_once,
                retry_on=lambda e: isinstance(e, _Retryable),
                policy=policy,
                sleep=self._sleep,
            )
        except _Retryable as exc:
            tries = f" ({self._attempts} attempts)" if self._attempts > 1 else ""
            raise InfraError(f"{self.name}: cannot reach {self._where}: {exc}{tries}") from None
        self.connects += 1
        return self._conn

    def _connect_once(self) -> paramiko.Transport:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
        except ConnectionRefusedError:
            raise _Retryable("connection refused") from None
        except TimeoutError:
            raise _Retryable(f"no answer within {self._connect_timeout:g} s") from None
        except socket.gaierror as exc:
            raise _Retryable(f"cannot resolve host ({exc.strerror})") from None
        except OSError as exc:
            raise _Retryable(exc.strerror or str(exc)) from None
        _tune_socket(sock, self._keepalive_s)
        conn = paramiko.Transport(sock)
        conn.banner_timeout = conn.handshake_timeout = conn.auth_timeout = self._connect_timeout
        known = {} if self._pins else self._known_keys()  # pins decide alone: known_hosts is not read
        if known:
            options = conn.get_security_options()
            # Negotiate a key type known_hosts has, so a known host is checked, not reported unknown.
            supported = options.key_types
            preferred = [t for name in known for t in _NEGOTIATED_TYPES.get(name, (name,)) if t in supported]
            options.key_types = tuple(dict.fromkeys([*preferred, *supported]))
        try:
            conn.start_client(timeout=self._connect_timeout)
            # start_client returns quietly when its timeout passes mid-handshake: check it finished.
            server_key = conn.get_remote_server_key()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            conn.close()
            raise _Retryable(f"SSH handshake failed within {self._connect_timeout:g} s: {exc}") from None
        try:
            self._check_host_key(server_key, known)
            self._authenticate(conn)
        except BaseException:
            conn.close()
            raise
        conn.set_keepalive(int(self._keepalive_s))
        return conn

    def _known_keys(self) -> dict[str, paramiko.PKey]:
        if not self._known_hosts.is_file():
            return {}
        entries = _read_known_hosts(self._known_hosts).lookup(self._known_hosts_entry)
        return {} if entries is None else {name: entries[name] for name in entries}

    def _check_host_key(self, key: paramiko.PKey, known: dict[str, paramiko.PKey]) -> None:
        offered = sha256_fingerprint(key.asbytes())
        where = f"{self.host}:{self.port}"
        if self._pins:
            if offered in self._pins:
                return
            raise HostKeyError(
                f"{self.name}: host key mismatch for {where}: pinned {', '.join(self._pins)}, "
                f"server offered {offered} ({key.get_name()}); refusing to connect"
            )
        if key.get_name() in known:
            expected = known[key.get_name()]
            if expected.asbytes() == key.asbytes():
                return
            raise HostKeyError(
                f"{self.name}: host key mismatch for {where}: {self._known_hosts} has "
                f"{sha256_fingerprint(expected.asbytes())}, server offered {offered}; refusing to connect"
            )
        if not self._accept_new:
            raise HostKeyError(
                f"{self.name}: unknown host key {offered} ({key.get_name()}) for {where}: pin it in "
                f"host_key_sha256 or accept it once with --accept-new-host-key"
            )
        self._remember(key)

    def _remember(self, key: paramiko.PKey) -> None:
        """Append the accepted key to known_hosts (created 0600, its folder 0700)."""
        self._known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = f"{self._known_hosts_entry} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(self._known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line)

    def _authenticate(self, conn: paramiko.Transport) -> None:
        for key in self._client_keys():
            try:
                conn.auth_publickey(self.user, key)
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise InfraError(f"{self.name}: authentication with {self._where} broke off: {exc}") from None
            if conn.is_authenticated():
                return
        which = str(self._key_file) if self._key_file else "ssh-agent and ~/.ssh/id_* keys"
        raise AuthError(f"{self.name}: authentication failed for {self._where} with {which}")

    def _client_keys(self) -> list[paramiko.PKey]:
        if self._keys is not None:
            return self._keys
        if self._key_file is not None:
            self._keys = [_load_key(self._key_file)]
            return self._keys
        try:
            keys: list[paramiko.PKey] = list(paramiko.Agent().get_keys())
        except (paramiko.SSHException, OSError):
            keys = []  # a stale SSH_AUTH_SOCK: fall back to key files
        for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
            path = Path("~/.ssh").expanduser() / name
            if path.is_file():
                try:
                    keys.append(_load_key(path))
                except UsageError:
                    continue  # a passphrase-protected default key: the agent may hold it
        self._keys = keys
        return keys


def _read_known_hosts(path: Path) -> paramiko.HostKeys:
    """known_hosts, line by line: a line that does not parse (bad base64, a key that does not decode, an
    unknown type) is skipped, as OpenSSH skips it; paramiko's own loader lets one such line, even for
    another host, end every connection with a traceback. A bad line for THIS host leaves it unknown: the
    host-key check then refuses in one line."""
    keys = paramiko.HostKeys()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"known_hosts {path} cannot be read: {exc.strerror or exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except Exception:  # noqa: BLE001 (InvalidHostKey, SSHException, ValueError, struct errors...)
            continue
        if entry is not None:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)
    return keys


def _tune_socket(sock: socket.socket, keepalive_s: float) -> None:
    # Small request/reply packets: without this, Nagle + delayed ACK add ~40 ms to every channel open.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A host that vanishes without a reset (preempted VM, dropped route) would leave a command without
    # a timeout waiting forever; TCP keepalive declares the connection dead after ~3 missed probes.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(keepalive_s))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", idle), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _load_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise UsageError(f"ssh key {path} not found") from None
    except paramiko.PasswordRequiredException:
        raise UsageError(f"ssh key {path} is passphrase-protected: add it to ssh-agent instead") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise UsageError(f"ssh key {path} cannot be read: {exc}") from None


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"
