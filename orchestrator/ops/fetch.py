"""Fetch a run's results from worker 0 (process 0 writes them) into `runs/<run-id>/` locally."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import recipes
from orchestrator.compare import read_summary
from orchestrator.errors import InfraError, UsageError
from orchestrator.ops.env import absolute_remote_dir
from orchestrator.runs import RunRecord

RUN_FILES = ("summary.json", "eval_full.jsonl", "eval_full_start.jsonl", "metrics.jsonl", "config.json")


@dataclass
class FetchResult:
    run_id: str
    folder: Path
    files: list[str]  # local file names written
    summary: dict[str, Any]


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
    folder = Path(dest_root) / record.run_id
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    sources = [(rel, rel.rsplit("/", 1)[-1]) for rel in found]
    if wandb_paths:
        sources.append((sorted(wandb_paths)[-1], "wandb-summary.json"))
    for rel, name in sources:
        try:
            data = t.get(f"{remote_dir}/{rel}")
        except FileNotFoundError as err:
            raise InfraError(f"{t.name}: {rel} vanished while fetching") from err
        (folder / name).write_bytes(data)
        written.append(name)
    return FetchResult(record.run_id, folder, written, read_summary(folder))
