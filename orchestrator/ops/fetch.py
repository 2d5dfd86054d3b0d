"""Fetch a run's results from worker 0 (process 0 writes them) into `runs/<run-id>/` locally.

A fetch never mixes files of two fetches and never silently loses one: files land in a fresh temporary
folder beside the destination, which then replaces `runs/<run-id>/` in one rename. If the earlier copy
differs, it is kept as `runs/<run-id>.prev/` (replacing an older `.prev`); an identical copy is left as is.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpoctl_contract import rundir
from orchestrator import recipes, untrusted, worker_data
from orchestrator.compare import read_summary
from orchestrator.errors import InfraError, UsageError
from orchestrator.ops.env import absolute_remote_dir
from orchestrator.runs import RunRecord

RUN_FILES = rundir.RESULT_FILES


@dataclass
class FetchResult:
    run_id: str
    folder: Path
    files: list[str]  # local file names written
    summary: dict[str, Any]
    previous: Path | None = None  # where the earlier, different copy went (runs/<id>.prev)


def fetch(target, record: RunRecord, dest_root: str | Path = "runs") -> FetchResult:
    t = target.transports()[0]
    remote_dir = absolute_remote_dir(t, record.remote_dir)
    wanted = [f"{record.run_dir}/{name}" for name in RUN_FILES]
    listing = t.run(recipes.existing_files(remote_dir, wanted), timeout=60)
    found = recipes.parse_files(listing.stdout) if listing.ok else []
    wandb = t.run(recipes.find_wandb_summary(remote_dir, record.run_dir), timeout=60)
    wandb_paths = recipes.parse_wandb_paths(wandb.stdout) if wandb.ok else []
    if not found and not wandb_paths:
        raise UsageError(
            f"run {record.run_id}: no result files in {record.run_dir} on {t.name} (state {record.state})"
        )
    root = Path(dest_root)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / record.run_id
    sources = [(rel, rel.rsplit("/", 1)[-1]) for rel in found]
    if wandb_paths:
        sources.append((sorted(wandb_paths)[-1], rundir.WANDB_SUMMARY))
    staging = Path(tempfile.mkdtemp(prefix=f".{record.run_id}.fetching-", dir=root))
    try:
        for rel, name in sources:
            try:
                data = untrusted.read(t, f"{remote_dir}/{rel}", untrusted.limit_for(name))
            except FileNotFoundError as err:
                raise InfraError(f"{t.name}: {rel} vanished while fetching") from err
            worker_data.check(name, data, f"{t.name}: {rel}")  # refused before anything is swapped in
            (staging / name).write_bytes(data)
        previous = _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    names = [name for _, name in sources]
    return FetchResult(record.run_id, folder, names, read_summary(folder), previous)


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def _swap_in(staging: Path, folder: Path) -> Path | None:
    """Make `staging` the run's folder; keep a different earlier copy as `<folder>.prev`."""
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a fetched folder is an ordinary one
    if not folder.exists():
        staging.rename(folder)
        return None
    if folder.is_dir() and _same_files(staging, folder):
        shutil.rmtree(staging)
        return None
    previous = folder.with_name(folder.name + ".prev")
    if previous.is_dir():
        shutil.rmtree(previous)
    elif previous.exists():
        previous.unlink()
    folder.rename(previous)
    staging.rename(folder)
    return previous
