"""Where metrics go: W&B (online / offline / disabled), metrics.jsonl, the optional time breakdown, and
summary.json (always: W&B offline writes no summary file). The progress lines on stdout for the orchestrator
are trainer/progress.py's.

Only process 0 writes; other processes get a `RunLogger(enabled=False)` that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grpoctl_contract import rundir

# Metrics shown in the per-step progress line (by their W&B names).
PROGRESS_KEYS = (
    "train/reward/total/mean",
    "train/reward/func/reward_correct/mean",
    "loss",
    "eval/reward/total/mean",
    "time/train/step_s",
)


def progress_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The PROGRESS_KEYS of `metrics`, as floats (NaN/inf as null)."""
    return {k: _jsonable(float(metrics[k])) for k in PROGRESS_KEYS if k in metrics}


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """The commit of the checkout the trainer runs from (not of the cwd); "unknown" outside git."""
    cwd = cwd or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _jsonable(value: Any) -> Any:
    """Floats that JSON can hold (NaN/inf become null so every line stays valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        config: Mapping[str, Any],
        config_hash: str,
        wandb_mode: str,
        wandb_project: str,
        wandb_name: str | None,
        run_id: str | None = None,
        enabled: bool = True,
    ):
        self.run_dir = run_dir
        self.enabled = enabled
        self.config_hash = config_hash
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.latest: dict[str, Any] = {}  # the last value of every metric: the summary
        self.git_commit = git_commit()
        self.url: str | None = None  # the W&B run page when online
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / rundir.CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner would interleave with our lines
            self._wandb = wandb.init(
                project=wandb_project,
                name=wandb_name,
                mode=wandb_mode,
                dir=str(run_dir),
                id=self.run_id,
                resume="allow",  # a resumed run (same run dir) continues the same W&B run
                config={**dict(config), "config_hash": config_hash},
            )
            self.run_id = self._wandb.id
            if wandb_mode == "online":
                self.url = getattr(self._wandb, "url", None) or None

    def history(self) -> list[dict[str, Any]]:
        """Every metrics.jsonl row so far: it rides in each checkpoint's meta, so a run resumed on a
        recreated VM (a fresh disk) keeps its whole history, not only the steps after the last resume."""
        path = self.run_dir / rundir.METRICS
        if not self.enabled or not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def restore_history(self, rows: list[dict[str, Any]] | None) -> None:
        """Before `resume_history`: the checkpoint's rows where the run dir lost (or never had) them."""
        if not self.enabled or not rows or len(self.history()) >= len(rows):
            return
        (self.run_dir / rundir.METRICS).write_text("".join(json.dumps(row) + "\n" for row in rows))

    def resume_history(self, step: int, key: str) -> list[float]:
        """On a restart from the checkpoint of `step`: drops metrics.jsonl lines of later (lost) steps,
        reloads the latest value of every metric, and returns the history of `key` (e.g. step times)."""
        path = self.run_dir / rundir.METRICS
        if not self.enabled or not path.is_file():
            return []
        kept = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [row for row in map(json.loads, kept) if row.get("step", 0) <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        for row in kept:
            self.latest.update({k: v for k, v in row.items() if k != "step"})
        return [row[key] for row in kept if row.get(key) is not None]

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        self.latest.update(clean)
        with open(self.run_dir / rundir.METRICS, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def time_breakdown(self, step: int, total: int, times: Mapping[str, float]) -> None:
        """The seed's PRINT_TRAIN_TIME_BREAKDOWN line (plain text: not an orchestrator event)."""
        if not self.enabled:
            return
        parts = " ".join(f"{k} {v:.3f}s" for k, v in times.items())
        print(f"time step {step}/{total}: {parts}", flush=True)

    def finish(self, steps: int, extra: Mapping[str, Any] | None = None) -> Path:
        """Writes summary.json (latest metrics + run id, config hash, git commit, W&B URL when online)."""
        path = self.run_dir / rundir.SUMMARY
        if not self.enabled:
            return path
        summary = {
            **self.latest,
            **{k: _jsonable(v) for k, v in (extra or {}).items()},
            "run_id": self.run_id,
            "config_hash": self.config_hash,
            "git_commit": self.git_commit,
            "steps": steps,
            **({"wandb_url": self.url} if self.url else {}),
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if v is not None})
            self._wandb.finish()
            self._wandb = None
        return path

    def close(self) -> None:
        """Ends the W&B run without a summary (the run failed or was interrupted)."""
        if self._wandb is not None:
            self._wandb.finish(exit_code=1)
            self._wandb = None
