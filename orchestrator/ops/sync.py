"""Sync the repo on every worker by git (never by copying files), and bootstrap the worker's venv."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import recipes, validate
from orchestrator.errors import InfraError, UsageError
from orchestrator.ops.fanout import fan_out, values
from orchestrator.ops.session import Session
from orchestrator.transport.base import CommandResult


@dataclass(frozen=True)
class RepoSpec:
    url: str
    branch: str
    warnings: tuple[str, ...] = ()


@dataclass
class SyncResult:
    url: str
    branch: str
    heads: dict[str, str]  # worker name -> full commit
    warnings: list[str] = field(default_factory=list)
    pythons: dict[str, str] = field(default_factory=dict)  # worker name -> interpreter (after bootstrap)


GIT_MISSING = "git is not installed (or not on PATH): grpoctl reads this checkout with it; install git"


def _git(cwd: Path, *args: str) -> str | None:
    """Read-only look at the local repo (validate.git, stripped); None when git says no. Without git at
    all, one line that says so (Windows would say `[WinError 2]`)."""
    if shutil.which("git") is None:
        raise UsageError(GIT_MISSING)
    out = validate.git(cwd, *args)
    return None if out is None else out.strip()


def resolve_repo(session: Session, cwd: Path | None = None) -> RepoSpec:
    """repo.url / repo.branch from the config, else the current repo's origin and branch.

    The local target uses the current repo by its own path. Warns (never refuses) when the
    working tree is dirty or the local branch has commits origin does not: workers get origin's tip.
    """
    cwd = (cwd or Path.cwd()).resolve()
    if session.dry_run:
        try:
            return _resolve_repo(session, cwd)
        except UsageError as err:  # a dry run shows the procedure even outside a usable checkout
            return RepoSpec(
                session.repo.url or "<repo.url>", session.repo.branch or "<branch>", (f"dry run: {err}",)
            )
    return _resolve_repo(session, cwd)


def _resolve_repo(session: Session, cwd: Path) -> RepoSpec:
    top = _git(cwd, "rev-parse", "--show-toplevel")
    url, branch = session.repo.url, session.repo.branch
    if url is None and top is not None:
        # The local target is this machine: its checkout clones this repo itself (offline, local commits).
        url = top if session.kind == "local" else _git(cwd, "remote", "get-url", "origin")
    if url is None:
        raise UsageError(
            "repo.url is not set in the config and the current folder has no git remote 'origin'"
        )
    if branch is None:
        branch = _git(cwd, "rev-parse", "--abbrev-ref", "HEAD") if top else None
        if not branch or branch == "HEAD":
            raise UsageError("repo.branch is not set and the current folder is not on a git branch")
    warnings: list[str] = []
    if top is not None:
        if _git(cwd, "status", "--porcelain"):
            warnings.append("local working tree has uncommitted changes: workers get committed code only")
        if url != top:
            ahead = _git(cwd, "rev-list", "--count", f"origin/{branch}..HEAD")
            if ahead is None:
                warnings.append(f"branch {branch!r} is not on origin (push it first)")
            elif ahead != "0":
                warnings.append(f"{ahead} local commit(s) on {branch!r} not pushed: workers get origin's tip")
    return RepoSpec(url, branch, tuple(warnings))


def _check(result: CommandResult, what: str) -> CommandResult:
    if result.exit_code == recipes.EXIT_REFUSED:  # not our checkout, or user files in the way: untouched
        raise UsageError(f"{result.worker}: {_last_line(result.stderr)}")
    if result.exit_code == recipes.EXIT_BUSY and what == "git sync":
        busy = recipes.parse_busy(result.stdout)
        raise UsageError(f"{result.worker}: a job runs in the checkout ({busy}): stop it before syncing")
    if not result.ok:
        raise InfraError(
            f"{result.worker}: {what} failed (exit {result.exit_code}): {_last_line(result.stderr)}"
        )
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def sync(session: Session, spec: RepoSpec | None = None, *, timeout: float = 600) -> SyncResult:
    """Bring every worker's checkout to origin's tip of the branch; refuse when workers disagree."""
    spec = spec or resolve_repo(session)
    for w in spec.warnings:
        session.say(f"warning: {w}")
    script = recipes.sync(session.remote_dir, spec.url, spec.branch)

    def one(_: int, t) -> str:
        result = _check(t.run(script, timeout=timeout), "git sync")
        head = recipes.parse_head(result.stdout)
        if not head:
            raise InfraError(f"{t.name}: git sync printed no HEAD")
        return head

    results = fan_out(session.target.transports(), one)
    heads = dict(zip([r.worker for r in results], values(results), strict=True))
    if len(set(heads.values())) > 1:
        listing = ", ".join(f"{w.split()[0]} {h[:12]}" for w, h in heads.items())
        raise InfraError(f"workers disagree on HEAD after sync ({listing}): re-run sync")
    return SyncResult(spec.url, spec.branch, heads, list(spec.warnings))


OnStage = Callable[[str, int, int, str], None]  # (worker, stage k, of n, what it does)


def bootstrap(
    session: Session,
    *,
    extras: tuple[str, ...] | None = None,
    timeout: float = 1800,
    on_stage: OnStage | None = None,
) -> dict[str, str]:
    """A venv with the trainer on every worker, unless the target names an interpreter.

    `on_stage(worker, k, n, label)` hears each worker's stages as they begin (from its worker's thread)."""
    if session.target.python or session.kind == "local":
        return {t.name: session.python for t in session.target.transports()}
    if extras is None:
        extras = session.target.bootstrap_extras
    script = recipes.bootstrap(session.remote_dir, extras)

    def one(_: int, t) -> str:
        def on_output(line: str) -> None:
            stage = recipes.parse_stage(line)
            if stage is not None and on_stage is not None:
                on_stage(t.name, *stage)

        result = t.run(script, timeout=timeout, on_output=on_output)
        if result.exit_code == recipes.EXIT_NO_PYTHON:
            raise InfraError(f"{t.name}: no python >= 3.11 on the worker (set the target's `python`)")
        return recipes.parse_python(_check(result, "bootstrap").stdout) or ""

    results = fan_out(session.target.transports(), one)
    return dict(zip([r.worker for r in results], values(results), strict=True))


def sync_and_bootstrap(
    session: Session, *, bootstrap_venv: bool = True, on_stage: OnStage | None = None
) -> SyncResult:
    """What `grpoctl sync`, an SOP's sync step and a recovery on a recreated node all do: the checkout at
    origin's tip on every worker, then (unless told not to) the venv."""
    result = sync(session)
    if bootstrap_venv:
        result.pythons = bootstrap(session, on_stage=on_stage)
    return result
