"""Push the local `.env` to every worker: atomically, mode 0600, verified by key and value LENGTH only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from orchestrator import recipes
from orchestrator.errors import InfraError, UsageError
from orchestrator.ops.fanout import fan_out, values
from orchestrator.ops.session import Session
from orchestrator.transport.base import Transport

_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)")


def parse_dotenv(text: str) -> dict[str, str]:
    """KEY=VALUE lines (optional `export `, optional matching quotes); comments and blanks skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        value = m.group(2).rstrip("\r")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[m.group(1)] = value
    return out


def read_dotenv(path: str | Path = ".env") -> dict[str, str]:
    path = Path(path)
    return parse_dotenv(path.read_text()) if path.is_file() else {}


@dataclass
class EnvPushResult:
    remote_path: str  # on worker 0 (absolute)
    lengths: dict[str, int]  # key -> value length, as read back on the workers
    mode: str  # "600"
    workers: list[str]


def absolute_remote_dir(t: Transport, remote_dir: str) -> str:
    """`~/x` -> `/home/u/x` on that worker (SFTP does not expand `~`)."""
    if remote_dir != "~" and not remote_dir.startswith("~/"):
        return remote_dir
    result = t.run(recipes.home_dir(), timeout=60)
    home = recipes.parse_home(result.stdout) if result.ok else None
    if not home:
        raise InfraError(f"{t.name}: could not read $HOME")
    return home.rstrip("/") + remote_dir[1:]


def push_env(session: Session, local_path: str | Path = ".env") -> EnvPushResult:
    local_path = Path(local_path)
    if not local_path.is_file():
        if not session.dry_run:
            raise UsageError(f"{local_path}: no such file (nothing to push)")
        session.say(f"warning: {local_path} not found: the dry run pushes an empty file (a real run stops)")
        data = b""
    else:
        data = local_path.read_bytes()
    expected = {k: len(v) for k, v in parse_dotenv(data.decode("utf-8", errors="replace")).items()}
    if not expected and not session.dry_run:
        raise UsageError(f"{local_path}: no KEY=VALUE lines")

    def one(_: int, t: Transport) -> tuple[str, str, dict[str, int]]:
        remote_dir = absolute_remote_dir(t, session.remote_dir)
        made = t.run(f"mkdir -p {recipes.q(remote_dir)}", timeout=60)
        if not made.ok:
            raise InfraError(f"{t.name}: cannot create {remote_dir}")
        remote = f"{remote_dir}/.env"
        t.put(data, remote, mode=0o600)
        check = t.run(recipes.env_verify(remote), timeout=60)
        if not check.ok:
            raise InfraError(f"{t.name}: could not verify {remote} (exit {check.exit_code})")
        mode, lengths = recipes.parse_env_verify(check.stdout)
        if session.dry_run:  # the recording transport has no file to read back
            mode, lengths = "600", dict(expected)
        if mode != "600":
            raise InfraError(f"{t.name}: {remote} has mode {mode}, expected 600")
        if lengths != expected:
            bad = sorted(k for k in expected.keys() | lengths.keys() if expected.get(k) != lengths.get(k))
            raise InfraError(f"{t.name}: {remote} does not match the local file for keys {', '.join(bad)}")
        return remote, mode, lengths

    results = values(fan_out(session.target.transports(), one))
    remote, mode, lengths = results[0]
    return EnvPushResult(remote, lengths, mode, [t.name for t in session.target.transports()])


def redactor(values_to_hide: list[str], min_len: int = 4):
    """A function that replaces every secret value in a text with `***` (longest first)."""
    hidden = sorted({v for v in values_to_hide if len(v) >= min_len}, key=len, reverse=True)
    if not hidden:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(v) for v in hidden))
    return lambda text: pattern.sub("***", text)
