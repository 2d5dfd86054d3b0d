"""Push the local `.env` to every worker: mode 0600 from the first byte, verified by key and value BYTE
length only (the worker runs the same parser), and only then renamed over the live file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpoctl_contract import envfile
from orchestrator import recipes
from orchestrator.errors import GrpoctlError, InfraError, UsageError
from orchestrator.ops.fanout import fan_out, values
from orchestrator.ops.session import Session
from orchestrator.transport.base import Transport


def parse_dotenv(data: bytes | str, source: str = ".env") -> dict[str, str]:
    """The shared parser (grpoctl_contract.envfile); a file that does not parse is a one-line UsageError."""
    try:
        return envfile.parse(data, source)
    except envfile.EnvFileError as err:
        raise UsageError(str(err)) from None


def read_dotenv(path: str | Path = ".env") -> dict[str, str]:
    path = Path(path)
    return parse_dotenv(path.read_bytes(), str(path)) if path.is_file() else {}


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
    expected = envfile.byte_lengths(parse_dotenv(data, str(local_path)))
    if not expected and not session.dry_run:
        raise UsageError(f"{local_path}: no KEY=VALUE lines")

    def one(_: int, t: Transport) -> tuple[str, str, dict[str, int]]:
        remote_dir = absolute_remote_dir(t, session.remote_dir)
        made = t.run(f"mkdir -p -- {recipes.qpath(remote_dir)}", timeout=60)
        if not made.ok:
            raise InfraError(f"{t.name}: cannot create {remote_dir}")
        remote = f"{remote_dir}/.env"
        # The upload lands beside the live file and replaces it only once it reads back right: a failed
        # or garbled push leaves the previous .env in place.
        pending, checker = f"{remote}.grpoctl-pending", f"{remote}.grpoctl-check.py"
        t.put(data, pending, mode=0o600)
        try:
            t.put(recipes.ENVFILE_SOURCE, checker, mode=0o600)
            check = t.run(recipes.env_verify(pending, checker), timeout=60)
            mode, lengths = recipes.parse_env_verify(check.stdout)
            if session.dry_run:  # the recording transport has no file to read back
                mode, lengths = "600", dict(expected)
            if not check.ok or mode is None:
                raise InfraError(f"{t.name}: could not verify {pending} (exit {check.exit_code})")
            if mode != "600":
                raise InfraError(f"{t.name}: {pending} has mode {mode}, expected 600")
            if lengths != expected:
                bad = sorted(k for k in expected.keys() | lengths.keys() if expected.get(k) != lengths.get(k))
                raise InfraError(
                    f"{t.name}: {pending} does not match the local file for keys {', '.join(bad)}"
                    f" ({remote} left as it was)"
                )
        except BaseException:
            with contextlib.suppress(GrpoctlError):  # the first error is the one worth reporting
                t.run(recipes.remove_file(pending), timeout=60)
            raise
        finally:
            with contextlib.suppress(GrpoctlError):
                t.run(recipes.remove_file(checker), timeout=60)
        installed = t.run(recipes.env_install(pending, remote), timeout=60)
        if not installed.ok:
            raise InfraError(f"{t.name}: could not move {pending} over {remote} (exit {installed.exit_code})")
        return remote, mode, lengths

    results = values(fan_out(session.target.transports(), one))
    remote, mode, lengths = results[0]
    return EnvPushResult(remote, lengths, mode, [t.name for t in session.target.transports()])


Prompt = Callable[[str], str]


def resolve_secrets(
    names: list[str], env_file: str | Path = ".env", prompt: Prompt | None = None
) -> dict[str, str]:
    """`--secret NAME` values, never from a command line: the laptop's environment, else `env_file`, else
    `prompt` (the CLI's no-echo prompt on a terminal); a name none of them has is a one-line UsageError."""
    out: dict[str, str] = {}
    dotenv: dict[str, str] | None = None
    for name in names:
        if "=" in name:
            raise UsageError(
                f"--secret {name.split('=', 1)[0]}=...: give the NAME only (a value on the command line is "
                "visible to every user in `ps` and kept in shell history); the value comes from the "
                "environment, .env or a prompt"
            )
        recipes._env_name(name)
        if name in os.environ:
            out[name] = os.environ[name]
            continue
        if dotenv is None:
            dotenv = read_dotenv(env_file)
        if name in dotenv:
            out[name] = dotenv[name]
        elif prompt is not None:
            out[name] = prompt(name)
        else:
            raise UsageError(
                f"--secret {name}: not in the environment nor in {env_file} (and no terminal to ask)"
            )
    return out


def _forms(value: str) -> set[str]:
    """A secret as a log may show it: as is, JSON-escaped, shell-quoted, URL-encoded (both ways)."""
    return {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        shlex.quote(value),
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        repr(value)[1:-1],
    }


def redactor(values_to_hide: list[str], min_len: int = 4):
    """A function that replaces every secret value in a text with `***` (longest first), in the forms a
    log may show it (`_forms`). A value shorter than `min_len` is hidden where it stands alone (between
    non-word characters), so that a 2-character secret does not blank out every word that holds it."""
    forms = {f for v in values_to_hide if v for f in _forms(v)}
    long_ = sorted((f for f in forms if len(f) >= min_len), key=len, reverse=True)
    short = sorted((f for f in forms if len(f) < min_len), key=len, reverse=True)
    parts = [re.escape(f) for f in long_]
    parts += [rf"(?<![A-Za-z0-9_]){re.escape(f)}(?![A-Za-z0-9_])" for f in short]
    if not parts:
        return lambda text: text
    pattern = re.compile("|".join(parts))
    return lambda text: pattern.sub("***", text)
