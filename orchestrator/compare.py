"""Compare two runs: summary keys side by side, an exact McNemar test on paired eval results, plots.

Two kinds of paired test: run A vs run B (eval_full.jsonl of both: "aligned" or "different at 5%"), and
each run against its own start (eval_full_start.jsonl, the sweep right before GRPO step 1, vs its
eval_full.jsonl: "improved", "no change" or "worse" at 5%) -- did training help at all?

Inputs are the fetched run folders (`runs/<run-id>/` locally): summary.json, eval_full.jsonl,
eval_full_start.jsonl, metrics.jsonl.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl_contract import rundir
from grpoctl_contract.rundir import SOP_KEYS  # cli and the SOP replayer read it as compare.SOP_KEYS
from orchestrator import worker_data
from orchestrator.errors import UsageError

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
class StartToEnd:
    """One run's end sweep paired with its own start sweep (A = start, B = end)."""

    run_id: str
    paired: PairedResult

    @property
    def verdict(self) -> str:
        p = self.paired
        if p.p_value >= ALPHA or p.only_a == p.only_b:
            return "no change at 5%"
        return "improved at 5%" if p.only_b > p.only_a else "worse at 5%"

    def line(self) -> str:
        p = self.paired
        return (
            f"{self.run_id}: start {p.accuracy_a:.3f} -> end {p.accuracy_b:.3f} on {p.n} paired questions "
            f"(gained {p.only_b}, lost {p.only_a}, exact McNemar p={p.p_value:.3g}) -> {self.verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        p = self.paired
        return {"run": self.run_id, "n": p.n, "start_accuracy": p.accuracy_a, "end_accuracy": p.accuracy_b,
                "gained": p.only_b, "lost": p.only_a, "p_value": p.p_value, "verdict": self.verdict}


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
    eval_full_start: dict[str, bool] | None = None  # the sweep before GRPO step 1 (eval_full_at_start)

    def start_to_end(self) -> StartToEnd | None:
        """End vs start of this run, paired by question; None without both sweeps."""
        if not self.eval_full or not self.eval_full_start:
            return None
        return StartToEnd(self.run_id, paired_test(self.eval_full_start, self.eval_full))


def load_run(folder: str | Path) -> RunFiles:
    """A fetched run folder; its summary.json (or W&B's wandb-summary.json) must exist."""
    folder = Path(folder)
    summary = read_summary(folder)
    if not summary:
        raise UsageError(f"{folder}: no {rundir.SUMMARY} (fetch the run first: grpoctl fetch {folder.name})")
    eval_full, eval_full_start = (
        _read_correctness(path) if (path := folder / name).is_file() else None
        for name in (rundir.EVAL_FULL_ROWS, rundir.EVAL_FULL_START_ROWS)
    )
    metrics_path = folder / rundir.METRICS
    metrics = list(_read_jsonl(metrics_path)) if metrics_path.is_file() else []
    return RunFiles(folder.name, folder, summary, eval_full, metrics, eval_full_start)


def read_summary(folder: Path) -> dict[str, Any]:
    """W&B's wandb-summary.json overlaid by our own summary.json (ours wins); {} when neither exists."""
    summary: dict[str, Any] = {}
    for name in (rundir.WANDB_SUMMARY, rundir.SUMMARY):
        path = folder / name
        if path.is_file():
            summary.update(_read_json(path))
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    return worker_data.read_summary_file(path)  # validated: flat, finite (orchestrator/worker_data.py)


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    return worker_data.read_metrics(path)


def _read_correctness(path: Path) -> dict[str, bool]:
    return worker_data.read_eval_rows(path)  # an id and a real boolean per row, no repeated id


# ------------------------------------------------------------------------------------------ report


FABRICATED = "FABRICATED by --dry-run, not a result:"


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    rows: list[KeyRow]
    paired: PairedResult | None
    learning: list[StartToEnd] = field(default_factory=list)  # per run that has both sweeps
    fabricated: bool = False  # a dry run's made-up files (summary.json says "dry_run": true)

    @property
    def verdict(self) -> str | None:
        return self.paired.verdict if self.paired else None

    def learning_lines(self) -> list[str]:
        """One start -> end line per run (runs without eval_full_start.jsonl say so)."""
        have = {s.run_id: s.line() for s in self.learning}
        missing = "no eval_full_start.jsonl (eval_full_at_start off): no start -> end test"
        lines = [have.get(run, f"{run}: {missing}") for run in (self.a, self.b)]
        return [f"{FABRICATED} {line}" for line in lines] if self.fabricated else lines

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
            "start_to_end": [s.to_json() for s in self.learning],
        }

    def markdown(self) -> str:
        lines = [f"| key | A `{self.a}` | B `{self.b}` | delta (B - A) |", "|---|---|---|---|"]
        lines += [f"| `{r.key}` | {fmt(r.a)} | {fmt(r.b)} | {fmt_delta(r)} |" for r in self.rows]
        if self.fabricated:
            lines = [f"**{FABRICATED}** every figure below was made up by the dry run.", "", *lines]
        # Each run against its own start, then the run-vs-run test (last, as in the SOP's verdict lines).
        lines += ["", "Start -> end of each run (its eval_full_start.jsonl vs its eval_full.jsonl):", ""]
        lines += [f"- {line}" for line in self.learning_lines()]
        return "\n".join([*lines, "", self.test_line()])


def compare_runs(a: RunFiles, b: RunFiles, keys: Sequence[str] | None = None) -> Comparison:
    paired = paired_test(a.eval_full, b.eval_full) if a.eval_full and b.eval_full else None
    learning = [s for s in (a.start_to_end(), b.start_to_end()) if s is not None]
    fabricated = bool(a.summary.get("dry_run") or b.summary.get("dry_run"))
    return Comparison(a.run_id, b.run_id, side_by_side(a.summary, b.summary, keys), paired, learning,
                      fabricated)


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


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the file-only backend; matplotlib is the `plot` extra, not a base dependency."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib, which this install lacks: pip install 'grpoctl[plot]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(a: RunFiles, b: RunFiles, out: str | Path) -> Path:
    """Reward and loss curves of both runs (from metrics.jsonl) in one image; see `check_plot_path`."""
    out = check_plot_path(out)
    plt = pyplot()
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
