"""Compare two runs: summary keys side by side, an exact McNemar test on paired eval results, plots.

Inputs are the fetched run folders (`runs/<run-id>/` locally): summary.json, eval_full.jsonl, metrics.jsonl.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import read_text_utf8
from orchestrator.errors import UsageError

# The five keys the seed SOP reads from each run's summary.
SOP_KEYS = (
    "eval_full/accuracy",
    "eval/reward/func/reward_correct/mean",
    "eval/reward/total/mean",
    "time/train/step_avg_last10_s",
    "time/eval_full/step_s",
)
ALPHA = 0.05


# ------------------------------------------------------------------------------------- pure math


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(n, 1/2) test on the discordant pairs.

    `only_a` questions were right in A and wrong in B, `only_b` the reverse. Exact integer arithmetic,
    so it holds for any n (the full GSM8K test split has 1319 questions).
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedResult:
    n: int  # questions answered in both runs
    both: int
    only_a: int
    only_b: int
    neither: int
    p_value: float

    @property
    def verdict(self) -> str:
        return "aligned" if self.p_value >= ALPHA else "different at 5%"

    @property
    def accuracy_a(self) -> float:
        return (self.both + self.only_a) / self.n if self.n else float("nan")

    @property
    def accuracy_b(self) -> float:
        return (self.both + self.only_b) / self.n if self.n else float("nan")

    def line(self) -> str:
        return (
            f"McNemar exact test on {self.n} paired questions: A-only {self.only_a}, B-only {self.only_b}, "
            f"p={self.p_value:.3g} -> {self.verdict}"
        )


def paired_test(a: Mapping[str, bool], b: Mapping[str, bool]) -> PairedResult:
    """Pair per-question correctness by question id (questions in only one run are left out)."""
    ids = sorted(set(a) & set(b))
    both = sum(1 for i in ids if a[i] and b[i])
    only_a = sum(1 for i in ids if a[i] and not b[i])
    only_b = sum(1 for i in ids if b[i] and not a[i])
    return PairedResult(
        n=len(ids),
        both=both,
        only_a=only_a,
        only_b=only_b,
        neither=len(ids) - both - only_a - only_b,
        p_value=mcnemar_exact_p(only_a, only_b),
    )


@dataclass(frozen=True)
class KeyRow:
    key: str
    a: Any
    b: Any

    @property
    def delta(self) -> float | None:
        if _is_number(self.a) and _is_number(self.b):
            return float(self.b) - float(self.a)
        return None


def side_by_side(
    a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str] | None = None
) -> list[KeyRow]:
    """Rows for `keys` (default: the SOP keys present in either run, else every numeric key of both)."""
    if not keys:
        keys = [k for k in SOP_KEYS if k in a or k in b]
        if not keys:
            keys = sorted(k for k in set(a) | set(b) if _is_number(a.get(k)) or _is_number(b.get(k)))
    return [KeyRow(k, a.get(k), b.get(k)) for k in keys]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if _is_number(x):
        return f"{x:.6g}" if isinstance(x, float) else str(x)
    return str(x)


def fmt_delta(row: KeyRow) -> str:
    d = row.delta
    return "-" if d is None else f"{d:+.6g}"


# ---------------------------------------------------------------------------------------- run files


@dataclass(frozen=True)
class RunFiles:
    run_id: str
    folder: Path
    summary: dict[str, Any]
    eval_full: dict[str, bool] | None
    metrics: list[dict[str, Any]]


def load_run(folder: str | Path) -> RunFiles:
    """A fetched run folder; its summary.json (or W&B's wandb-summary.json) must exist."""
    folder = Path(folder)
    summary = read_summary(folder)
    if not summary:
        raise UsageError(f"{folder}: no summary.json (fetch the run first: grpoctl fetch {folder.name})")
    eval_path = folder / "eval_full.jsonl"
    eval_full = _read_correctness(eval_path) if eval_path.is_file() else None
    metrics_path = folder / "metrics.jsonl"
    metrics = list(_read_jsonl(metrics_path)) if metrics_path.is_file() else []
    return RunFiles(folder.name, folder, summary, eval_full, metrics)


def read_summary(folder: Path) -> dict[str, Any]:
    """W&B's wandb-summary.json overlaid by our own summary.json (ours wins); {} when neither exists."""
    summary: dict[str, Any] = {}
    for name in ("wandb-summary.json", "summary.json"):
        path = folder / name
        if path.is_file():
            summary.update(_read_json(path))
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    text = read_text_utf8(path)
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UsageError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    for n, line in enumerate(read_text_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            raise UsageError(f"{path}:{n}: not valid JSON") from None


def _read_correctness(path: Path) -> dict[str, bool]:
    return {str(row["id"]): bool(row["correct"]) for row in _read_jsonl(path) if "id" in row}


# ------------------------------------------------------------------------------------------ report


FABRICATED = "FABRICATED by --dry-run, not a result:"


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    rows: list[KeyRow]
    paired: PairedResult | None
    fabricated: bool = False  # a dry run's made-up files (summary.json says "dry_run": true)

    @property
    def verdict(self) -> str | None:
        return self.paired.verdict if self.paired else None

    def test_line(self) -> str:
        """The McNemar line; a dry run's reads as made up, never as a finding."""
        if self.paired is None:
            return "No paired per-question results (eval_full.jsonl) in both runs: no significance test."
        return f"{FABRICATED} {self.paired.line()}" if self.fabricated else self.paired.line()

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "fabricated": self.fabricated,
            "keys": [{"key": r.key, "a": r.a, "b": r.b, "delta": r.delta} for r in self.rows],
            "mcnemar": None
            if self.paired is None
            else {
                "n": self.paired.n,
                "only_a": self.paired.only_a,
                "only_b": self.paired.only_b,
                "p_value": self.paired.p_value,
                "verdict": self.paired.verdict,
            },
        }

    def markdown(self) -> str:
        lines = [f"| key | A `{self.a}` | B `{self.b}` | delta (B - A) |", "|---|---|---|---|"]
        lines += [f"| `{r.key}` | {fmt(r.a)} | {fmt(r.b)} | {fmt_delta(r)} |" for r in self.rows]
        if self.fabricated:
            lines = [f"**{FABRICATED}** every figure below was made up by the dry run.", "", *lines]
        return "\n".join([*lines, "", self.test_line()])


def compare_runs(a: RunFiles, b: RunFiles, keys: Sequence[str] | None = None) -> Comparison:
    paired = paired_test(a.eval_full, b.eval_full) if a.eval_full and b.eval_full else None
    fabricated = bool(a.summary.get("dry_run") or b.summary.get("dry_run"))
    return Comparison(a.run_id, b.run_id, side_by_side(a.summary, b.summary, keys), paired, fabricated)


# -------------------------------------------------------------------------------------------- plot

REWARD_KEYS = ("train/reward/total/mean", "reward/total/mean", "train/reward/mean", "reward")
LOSS_KEYS = ("loss", "train/loss", "train/policy_loss")


def _series(metrics: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> tuple[str, list, list] | None:
    for key in candidates:
        points = [(m["step"], m[key]) for m in metrics if _is_number(m.get(key)) and "step" in m]
        if points:
            return key, [p[0] for p in points], [p[1] for p in points]
    return None


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_plot_path(out: str | Path) -> Path:
    """A plot goes into a folder that exists (we never create folders for it: a typo such as
    `/no/such/dir/p.png` must not leave directories at the filesystem root) with a known image suffix."""
    out = Path(out)
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {str(out)!r}: use a file name ending in {', '.join(PLOT_SUFFIXES)}")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"--plot {str(out)!r}: folder {str(parent)!r} does not exist (create it first)")
    if out.is_dir():
        raise UsageError(f"--plot {str(out)!r} is a folder")
    return out


def plot(a: RunFiles, b: RunFiles, out: str | Path) -> Path:
    """Reward and loss curves of both runs (from metrics.jsonl) in one image; see `check_plot_path`."""
    out = check_plot_path(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, title, candidates in ((axes[0], "reward", REWARD_KEYS), (axes[1], "loss", LOSS_KEYS)):
        drawn = False
        for run, style in ((a, "-"), (b, "--")):
            series = _series(run.metrics, candidates)
            if series:
                key, steps, values = series
                ax.plot(steps, values, style, label=f"{run.run_id} ({key})")
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
