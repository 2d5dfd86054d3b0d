"""A run's config, checked on the laptop before anything remote happens.

`run` and `sop replay` call `check_run` first: the config path (separators normalised: PowerShell
completes `configs\\tiny_cpu.yaml`), the file itself at the commit `grpoctl sync` gives the workers, and
every `--set` key and value against the trainer's own schema (trainer/config.py: one schema for both
halves, importable without jax). A mistake is one UsageError line (exit 2): no run record, no remote
process.

The schema check applies when the repo the workers run is this checkout and it carries the trainer's schema
(`trainer/config.py`); a repo with its own trainer (the tests' stand-in) only gets the path checks.
"""

from __future__ import annotations

import posixpath
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import safe_yaml
from orchestrator.errors import UsageError

SCHEMA_FILE = "trainer/config.py"


def normalise_config_path(config: str) -> str:
    """`configs\\tiny_cpu.yaml` and `./configs//tiny_cpu.yaml` -> `configs/tiny_cpu.yaml` (the workers are
    Linux: the path inside the checkout always uses `/`)."""
    text = config.strip().replace("\\", "/")
    if not text:
        raise UsageError("the config path is empty")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UsageError(f"config {config!r}: give a path inside the checkout (e.g. configs/tiny_cpu.yaml)")
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../"):
        raise UsageError(f"config {config!r} points outside the checkout")
    return norm


def git(cwd: Path, *args: str) -> str | None:
    """stdout of a read-only git command, None when it fails (or git is not installed)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, encoding="utf-8", check=False
        )
    except OSError:
        return None
    return proc.stdout if proc.returncode == 0 else None


@dataclass(frozen=True)
class Source:
    """Where the workers' code comes from, as far as this laptop can tell."""

    root: Path | None  # this checkout's top folder (None: not in a git checkout)
    ref: str | None  # the local name of the commit `sync` gives the workers (None: unknown here)
    same_repo: bool  # the workers run this checkout's repo (not some other repo.url)


def source(repo_url: str | None, branch: str | None, target_kind: str, cwd: Path | None = None) -> Source:
    """The checkout and the ref the workers will run: the local branch when they clone this checkout by
    its path (the local target), else `origin/<branch>`."""
    cwd = cwd or Path.cwd()
    top = git(cwd, "rev-parse", "--show-toplevel")
    if top is None:
        return Source(None, None, repo_url is None)
    root = Path(top.strip())
    origin = (git(root, "remote", "get-url", "origin") or "").strip()
    same = repo_url is None or repo_url in (origin, str(root))
    branch = branch or (git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    if not same or not branch or branch == "HEAD":
        return Source(root, None, same)
    # The local target clones this checkout by path (as does any target whose repo.url is its path).
    by_path = repo_url == str(root) or (target_kind == "local" and repo_url is None)
    ref = branch if by_path else f"origin/{branch}"
    if git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}") is None:
        ref = None
    return Source(root, ref, same)


def read_config(config: str, src: Source) -> str | None:
    """The config's text at the workers' commit (else in this folder); None when this laptop cannot know
    (not the workers' repo). UsageError when the file is not there."""
    if not src.same_repo or src.root is None:  # not in a checkout: the workers' repo is unknown here
        return None
    if src.ref is not None:
        text = git(src.root, "show", f"{src.ref}:{config}")
        if text is not None:
            return text
        committed_here = (src.root / config).is_file()
        fix = "commit it, push it, then `grpoctl sync`" if committed_here else "check the path"
        raise UsageError(f"config {config!r} is not in {src.ref} (the commit the workers get): {fix}")
    path = src.root / config
    if not path.is_file():
        raise UsageError(f"config {config!r} not found in {path.parent}")
    return path.read_text(encoding="utf-8")


def _has_schema(src: Source) -> bool:
    return src.same_repo and src.root is not None and (src.root / SCHEMA_FILE).is_file()


def check_schema(config: str, text: str | None, overrides: Mapping[str, str], env: Mapping[str, str]) -> None:
    """The trainer's own validation, here: unknown keys (with did-you-mean), bad values, bad combinations.
    Without the file's text only the overrides are checked (against the defaults)."""
    from orchestrator.preflight import effective_overrides  # the env flags the run switches on
    from trainer import config as schema

    items = effective_overrides(overrides, env)
    data: Any = safe_yaml(text, f"config {config}") if text is not None else {}  # aliases, nesting bounded
    if data is not None and not isinstance(data, dict):
        raise UsageError(f"config {config}: expected a mapping of keys, got {type(data).__name__}")
    try:
        schema.from_dict(schema.apply_overrides(data or {}, items))
    except schema.ConfigError as err:
        raise UsageError(f"{_blame(err.key, overrides)}{err}") from None


def _blame(key: str, overrides: Mapping[str, str]) -> str:
    """`--set nosuch.key=1: ` when an override made the error, else `` (the file did)."""
    for name, value in overrides.items():
        if name == key or name.startswith(key + ".") or key.startswith(name + "."):
            return f"--set {name}={value}: "
    return ""


def check_run(
    config: str,
    *,
    overrides: Mapping[str, str],
    env: Mapping[str, str],
    repo_url: str | None,
    branch: str | None,
    target_kind: str,
    cwd: Path | None = None,
) -> str:
    """The normalised config path, once the config and its overrides pass; UsageError otherwise."""
    config = normalise_config_path(config)
    src = source(repo_url, branch, target_kind, cwd)
    text = read_config(config, src)
    if _has_schema(src):
        check_schema(config, text, overrides, env)
    return config
