"""Compare two arms (each one run or a group of seeded runs): summaries side by side, the verdicts, plots.

The verdicts, each answering one question and no other:
- kernel parity (orchestrator/parity.py): did this run's loss provider compute what its shadow computed,
  step by step on the same batch? The direct answer to "does the kernel change training?";
- start -> end per run (orchestrator/learning.py): its own start sweep (eval_full_start.jsonl) vs its end
  sweep (eval_full.jsonl): exact McNemar on the greedy answers and, where the sweeps sampled, a paired t
  test over the questions on the sampled pass rate ("improved", "no detectable change", "worse" at 5%);
- start -> end over an arm's runs (learning.OverRuns): each run's change is one number, runs the units;
- the method verdict (orchestrator/stats.py): per-run end accuracies, runs as the units: "different",
  "equivalent" within a margin, or "inconclusive" (always with one run per arm);
- McNemar per seed pair: do these two trained policies answer the same questions differently? It says
  nothing about the methods: one sampled token can send two runs of identical math down other paths.

Inputs are the fetched run folders (`runs/<run-id>/` locally): summary.json, eval_full.jsonl,
eval_full_start.jsonl, metrics.jsonl, config.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpoctl_contract import rundir
from grpoctl_contract.rundir import SOP_KEYS  # cli and the SOP replayer read it as compare.SOP_KEYS
from orchestrator import learning, parity, stats, untrusted, worker_data
from orchestrator.errors import UsageError

# the start -> end verdict words live in learning.py; re-exported (cli, reports and tests read cmp.*)
from orchestrator.learning import IMPROVED as IMPROVED
from orchestrator.learning import NO_CHANGE as NO_CHANGE
from orchestrator.learning import WORSE as WORSE

ALPHA = stats.ALPHA
# The McNemar verdicts: about two trained policies, never about the methods that trained them.
POLICIES_DIFFER = "these two trained policies answer differently at 5%"
NO_DETECTABLE_DIFFERENCE = (
    "no detectable difference between these two trained policies at 5% (not a proof of sameness)"
)
SEED_KEY = "seed"  # the trainer config's seed (configs/*.yaml `seed:`); SOP `seeds:` sets it per run


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
        # Absence of evidence is not sameness: a large p never reads as "the same".
        return POLICIES_DIFFER if self.p_value < ALPHA else NO_DETECTABLE_DIFFERENCE

    @property
    def accuracy_a(self) -> float:
        return (self.both + self.only_a) / self.n if self.n else float("nan")

    @property
    def accuracy_b(self) -> float:
        return (self.both + self.only_b) / self.n if self.n else float("nan")

    def line(self, note: str = "") -> str:
        return (
            f"McNemar exact test on {self.n} paired questions{note}: A-only {self.only_a}, "
            f"B-only {self.only_b}, p={self.p_value:.3g} -> {self.verdict}"
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
        return learning.direction(self.paired.p_value, self.paired.only_b, self.paired.only_a)

    def line(self) -> str:
        p = self.paired
        return (
            f"{self.run_id}: start {p.accuracy_a:.3f} -> end {p.accuracy_b:.3f} on {p.n} paired questions "
            f"(gained {p.only_b}, lost {p.only_a}, exact McNemar p={p.p_value:.3g}) -> {self.verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        p = self.paired
        return {
            "run": self.run_id,
            "n": p.n,
            "start_accuracy": p.accuracy_a,
            "end_accuracy": p.accuracy_b,
            "gained": p.only_b,
            "lost": p.only_a,
            "p_value": p.p_value,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class KeyRow:
    key: str
    a: Any
    b: Any

    @property
    def delta(self) -> float | None:
        if is_number(self.a) and is_number(self.b):
            return float(self.b) - float(self.a)
        return None


def side_by_side(
    a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str] | None = None
) -> list[KeyRow]:
    """Rows for `keys` (default: the SOP keys present in either run, else every numeric key of both)."""
    if not keys:
        keys = [k for k in SOP_KEYS if k in a or k in b]
        if not keys:
            keys = sorted(k for k in set(a) | set(b) if is_number(a.get(k)) or is_number(b.get(k)))
    return [KeyRow(k, a.get(k), b.get(k)) for k in keys]


def is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if is_number(x):
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
    config: dict[str, Any] = field(default_factory=dict)  # config.json: the run's effective trainer config
    sampled: dict[str, tuple[int, int]] | None = None  # the end sweep's sampled pass (eval_full_sampled)
    sampled_start: dict[str, tuple[int, int]] | None = None

    @property
    def seed(self) -> int | None:
        seed = self.config.get(SEED_KEY)
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def fabricated(self) -> bool:
        return bool(self.summary.get("dry_run"))

    def start_to_end(self) -> StartToEnd | None:
        """End vs start of this run, paired by question; None without both sweeps."""
        if not self.eval_full or not self.eval_full_start:
            return None
        return StartToEnd(self.run_id, paired_test(self.eval_full_start, self.eval_full))

    def sampled_start_to_end(self) -> learning.SampledStartToEnd | None:
        """The sampled pass rate, end vs start, paired by question; None without both sampled passes."""
        return learning.sampled_test(self.run_id, self.sampled_start, self.sampled)


def load_run(folder: str | Path) -> RunFiles:
    """A fetched run folder; its summary.json (or W&B's wandb-summary.json) must exist."""
    folder = Path(folder)
    summary = read_summary(folder)
    if not summary:
        raise UsageError(f"{folder}: no {rundir.SUMMARY} (fetch the run first: grpoctl fetch {folder.name})")
    # Every worker file is read validated (orchestrator/worker_data.py): an id and a real boolean per eval
    # row, no repeated id; metrics rows keep only finite numbers.
    end, start = (
        worker_data.read_eval_sweep(path) if (path := folder / name).is_file() else None
        for name in (rundir.EVAL_FULL_ROWS, rundir.EVAL_FULL_START_ROWS)
    )
    metrics_path = folder / rundir.METRICS
    metrics = worker_data.read_metrics(metrics_path) if metrics_path.is_file() else []
    config_path = folder / rundir.CONFIG
    config = read_config(config_path) if config_path.is_file() else {}
    return RunFiles(
        folder.name, folder, summary, end and end.correct, metrics, start and start.correct, config,
        end and end.sampled, start and start.sampled,
    )


def read_summary(folder: Path) -> dict[str, Any]:
    """W&B's wandb-summary.json overlaid by our own summary.json (ours wins); {} when neither exists."""
    summary: dict[str, Any] = {}
    for name in (rundir.WANDB_SUMMARY, rundir.SUMMARY):
        path = folder / name
        if path.is_file():
            summary.update(worker_data.read_summary_file(path))  # validated: flat, finite
    return summary


def read_config(path: Path) -> dict[str, Any]:
    """config.json (the trainer's effective config, nested): {} when it is not a JSON object. It only feeds
    the seed, the parity tolerance and the config warnings, so a bad one never stops a comparison."""
    if path.stat().st_size > untrusted.CONFIG.max_bytes:
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


FABRICATED = "FABRICATED by --dry-run, not a result:"
# The two groups a reader sees the verdict lines in (grouped_verdicts): what the runs say about the methods,
# and what these particular trajectories did.
# "Over runs" lines are tests whose words another machine repeats unless their p sits near 5%: they average
# the trajectories out; parity and a one-run method verdict do not depend on the trajectory at all.
METHOD_HEADING = "Verdicts on the methods (not tied to one trajectory: the same words on another machine):"
TRAJECTORY_HEADING = (
    "These runs (their trajectories follow the machine's float rounding: another machine can print other "
    "words here):"
)
WATERMARK = "FABRICATED by --dry-run"
# The summary's accuracy after training (used when a run has no eval_full.jsonl) and before GRPO step 1.
END_KEY, START_KEY = f"{rundir.EVAL_FULL}/accuracy", f"{rundir.EVAL_FULL_START}/accuracy"
# Config keys two arms may differ in without a warning: what is being compared (the trainer's config.json
# is nested: trainer/config.py to_dict), and the seed.
ARM_KEYS = ("train.policy_loss_impl", "train.shadow_policy_loss_impl", "train.kernel_blocks")
# Keys that differ from run to run by design, or only say where things are kept and how they are logged:
# none of them changes what a run computes.
RUN_KEYS = (
    SEED_KEY,
    "dry_run",
    "wandb_name",
    "wandb_project",
    "wandb_mode",
    "print_time_breakdown",
    "checkpoint",
    "compile_cache_dir",
)


def grouped_verdicts(lines: Sequence[str], trajectory: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`lines` (each verdict once, in reading order) as (heading, lines) groups: the method-level verdicts,
    then the lines about these trajectories (`Comparison.trajectory_lines`). An empty group is left out."""
    runs = set(trajectory)
    groups = [
        (METHOD_HEADING, [line for line in lines if line not in runs]),
        (TRAJECTORY_HEADING, [line for line in lines if line in runs]),
    ]
    return [(heading, group) for heading, group in groups if group]


def _share(k: int, n: int) -> float:
    return k / n if n else float("nan")


def _counts(correct: Mapping[str, bool] | None) -> tuple[int, int] | None:
    return (sum(correct.values()), len(correct)) if correct else None


@dataclass(frozen=True)
class RunAccuracy:
    """One run's start and end accuracy: (right, questions) from its sweeps, Wilson intervals."""

    run_id: str
    seed: int | None
    start: tuple[int, int] | None
    end: tuple[int, int] | None
    end_summary: float | None = None  # summary.json's eval_full/accuracy (no per-question rows)

    @property
    def start_value(self) -> float | None:
        return _share(*self.start) if self.start else None

    @property
    def end_value(self) -> float | None:
        return _share(*self.end) if self.end else self.end_summary

    @staticmethod
    def _interval(counts: tuple[int, int] | None) -> stats.Interval | None:
        if not counts or not counts[1]:
            return None
        try:
            return stats.proportion_interval(*counts)
        except stats.StatsUnavailable:
            return None

    def start_interval(self) -> stats.Interval | None:
        return self._interval(self.start)

    def end_interval(self) -> stats.Interval | None:
        return self._interval(self.end)

    def to_json(self) -> dict[str, Any]:
        def one(counts: tuple[int, int] | None, value: float | None, ci: stats.Interval | None) -> Any:
            if value is None:
                return None
            return {
                "accuracy": value,
                "right": counts[0] if counts else None,
                "questions": counts[1] if counts else None,
                "ci": None if ci is None else ci.to_json(),
            }

        return {
            "run": self.run_id,
            "seed": self.seed,
            "start": one(self.start, self.start_value, self.start_interval()),
            "end": one(self.end, self.end_value, self.end_interval()),
        }


def run_accuracy(run: RunFiles) -> RunAccuracy:
    end_summary = run.summary.get(END_KEY)
    return RunAccuracy(
        run.run_id,
        run.seed,
        _counts(run.eval_full_start),
        _counts(run.eval_full),
        float(end_summary) if is_number(end_summary) else None,
    )


def _fmt_ci(ci: stats.Interval | None) -> str:
    return "" if ci is None else f" {ci.text()}"


@dataclass(frozen=True)
class ArmStats:
    """An arm's runs and, over them, the mean start and end accuracy with a t interval (2+ runs)."""

    label: str
    runs: list[RunAccuracy]

    def values(self, which: str) -> list[float]:
        """Each run's start or end accuracy (`which`), the runs without one left out."""
        values = [getattr(r, f"{which}_value") for r in self.runs]
        return [v for v in values if v is not None]

    def mean(self, which: str) -> float | None:
        values = self.values(which)
        return math.fsum(values) / len(values) if values else None

    def interval(self, which: str) -> stats.Interval | None:
        """Across runs: a t interval; one run: its Wilson interval (question sampling only)."""
        values = self.values(which)
        if len(values) == 1 and len(self.runs) == 1:
            return getattr(self.runs[0], f"{which}_interval")()
        try:
            return stats.mean_interval(values)
        except stats.StatsUnavailable:
            return None

    def line(self) -> str:
        parts = []
        for which in ("start", "end"):
            mean, ci = self.mean(which), self.interval(which)
            label = "" if ci is None else f" {ci.method} {ci.level:.0%}"
            parts.append("-" if mean is None else f"{mean:.3f}{_fmt_ci(ci)}{label}")
        runs = f"{len(self.runs)} run{'s' if len(self.runs) != 1 else ''}"
        return f"{self.label} ({runs}): start {parts[0]} -> end {parts[1]}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "runs": [r.to_json() for r in self.runs]}
        for which in ("start", "end"):
            ci = self.interval(which)
            out[which] = {"mean": self.mean(which), "ci": None if ci is None else ci.to_json()}
        return out


@dataclass(frozen=True)
class SeedPair:
    """McNemar on one pair of trained policies (same seed in both arms when seeds are known)."""

    a: str
    b: str
    seed: int | None
    result: PairedResult

    def line(self) -> str:
        seed = "" if self.seed is None else f" (seed {self.seed} in both)"
        return f"{self.a} vs {self.b}: {self.result.line(seed)}"

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "a": self.a,
            "b": self.b,
            "seed": self.seed,
            "n": r.n,
            "only_a": r.only_a,
            "only_b": r.only_b,
            "p_value": r.p_value,
            "verdict": r.verdict,
        }


def pair_runs(a: Sequence[RunFiles], b: Sequence[RunFiles]) -> tuple[list[tuple[RunFiles, RunFiles]], bool]:
    """Pairs of runs (A, B) for McNemar, and whether the method test may pair them by seed.

    With every seed known and distinct within each arm, runs pair by seed (the seeds both arms hold); the
    method test is paired only when both arms hold the same seeds. Without seeds, arms of equal size pair
    by position (McNemar only: position is not a seed)."""
    seeds_a, seeds_b = [r.seed for r in a], [r.seed for r in b]
    known = None not in seeds_a and None not in seeds_b
    if known and len(set(seeds_a)) == len(a) and len(set(seeds_b)) == len(b):
        by_seed = {r.seed: r for r in b}
        pairs = [(r, by_seed[r.seed]) for r in a if r.seed in by_seed]
        if pairs or len(a) > 1 or len(b) > 1:
            return pairs, set(seeds_a) == set(seeds_b)
    if len(a) == len(b):
        return list(zip(a, b, strict=True)), False
    return [], False


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], allowed: Sequence[str]) -> list[str]:
    """`key a -> b` for each config key (dotted) that differs, leaving out `allowed` keys and their
    sub-keys."""
    fa, fb = _flatten(a), _flatten(b)

    def allowed_key(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in allowed)

    keys = sorted(k for k in set(fa) | set(fb) if not allowed_key(k) and fa.get(k) != fb.get(k))
    shown = [(k, fmt(fa.get(k)), fmt(fb.get(k))) for k in keys]  # worker text: no escapes reach a terminal
    return [untrusted.clean(f"{k} {x} vs {y}", untrusted.FIELD) for k, x, y in shown]


def config_warnings(a: Sequence[RunFiles], b: Sequence[RunFiles], labels: tuple[str, str]) -> list[str]:
    """Warnings when the arms differ in more than the loss provider / shadow / seed, or the runs of one
    arm in more than the seed (a 3-step run beside a 10-step one compares the steps, not the kernel)."""
    warnings = []
    if a and b and a[0].config and b[0].config:
        diff = config_differences(a[0].config, b[0].config, (*ARM_KEYS, *RUN_KEYS))
        if diff:
            warnings.append(
                f"warning: the two arms' configs differ in more than the loss provider / shadow / "
                f"seed: {'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}"
            )
    for label, runs in zip(labels, (a, b), strict=True):
        for other in runs[1:]:
            if runs[0].config and other.config:
                diff = config_differences(runs[0].config, other.config, RUN_KEYS)
                if diff:
                    warnings.append(
                        f"warning: {label}'s runs {runs[0].run_id} and {other.run_id} differ in "
                        f"more than the seed: {'; '.join(diff[:8])}"
                    )
    return warnings


def mean_summary(runs: Sequence[RunFiles]) -> dict[str, Any]:
    """One run's summary, or over several the mean of each key that is a number in all of them."""
    if len(runs) == 1:
        return dict(runs[0].summary)
    keys = set().union(*(r.summary for r in runs)) if runs else set()
    out: dict[str, Any] = {}
    for key in keys:
        values = [r.summary.get(key) for r in runs]
        if all(is_number(v) for v in values):
            out[key] = math.fsum(values) / len(values)
    return out


@dataclass(frozen=True)
class Comparison:
    a: str  # arm labels
    b: str
    rows: list[KeyRow]  # summary keys side by side (means over an arm's runs)
    pairs: list[SeedPair]
    learning: list[StartToEnd] = field(default_factory=list)  # per run that has both sweeps
    fabricated: bool = False  # a dry run's made-up files (summary.json says "dry_run": true)
    method: stats.MethodTest | None = None
    arms: tuple[ArmStats, ArmStats] | None = None
    parity: list[parity.ParityVerdict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    runs_a: list[str] = field(default_factory=list)
    runs_b: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # run id -> the SOP's name for it
    sampled: list[learning.SampledStartToEnd] = field(default_factory=list)  # per run with sampled sweeps
    over_runs: list[learning.OverRuns] = field(default_factory=list)  # per arm of 2+ runs

    @property
    def paired(self) -> PairedResult | None:
        """The one pair's McNemar result when each arm is one run (None otherwise)."""
        return self.pairs[0].result if len(self.pairs) == 1 else None

    @property
    def verdict(self) -> str | None:
        return self.method.verdict if self.method else None

    def _mark(self, lines: list[str]) -> list[str]:
        return [f"{FABRICATED} {line}" for line in lines] if self.fabricated else lines

    def learning_lines(self) -> list[str]:
        """Start -> end per run: greedy, then sampled where the sweeps sampled (runs without
        eval_full_start.jsonl say so). A run the SOP named goes by its name (`jax/s1`): the same words on
        every replay, the id is in the report's tables."""
        greedy = {s.run_id: s.line() for s in self.learning}
        sampled = {s.run_id: s.line() for s in self.sampled}
        missing = "no eval_full_start.jsonl (eval_full_at_start off): no start -> end test"
        lines = []
        for run in (*self.runs_a, *self.runs_b):
            for line in (greedy.get(run, f"{run}: {missing}"), sampled.get(run)):
                if line is not None:
                    lines.append(f"{self.names[run]}{line.removeprefix(run)}" if run in self.names else line)
        return self._mark(lines)

    def over_runs_lines(self) -> list[str]:
        """Start -> end over each arm's runs: a claim about the method, not about one trajectory."""
        return self._mark([o.line() for o in self.over_runs])

    def test_lines(self) -> list[str]:
        """One McNemar line per pair of trained policies; a dry run's read as made up, never as findings."""
        if not self.pairs:
            return self._mark(
                ["No paired per-question results (eval_full.jsonl) in both arms: no McNemar test."]
            )
        return self._mark([p.line() for p in self.pairs])

    def method_line(self) -> str | None:
        return None if self.method is None else self._mark([self.method.line()])[0]

    def key_lines(self) -> list[str]:
        """Each arm's start -> end accuracy with its interval: the key numbers beside the verdicts."""
        return self._mark([arm.line() for arm in self.arms or ()])

    def parity_lines(self) -> list[str]:
        return self._mark([p.line() for p in self.parity])

    def trajectory_lines(self) -> list[str]:
        """The verdict lines about these particular trajectories: each run's start -> end and each pair of
        trained policies. A last-bit rounding difference (another CPU, another compiler) changes one sampled
        token and then the whole trajectory, so on another machine these can read otherwise; the rest of
        `summary_lines` (config warnings, kernel parity, the method verdict over runs) does not."""
        return [*self.learning_lines(), *self.test_lines()]

    def summary_lines(self) -> list[str]:
        """Every verdict once, in reading order: warnings, kernel parity, start -> end of each run and over
        each arm's runs, the method verdict, the McNemar test of each pair of trained policies."""
        method = self.method_line()
        return [
            *self._mark(self.warnings),
            *self.parity_lines(),
            *self.learning_lines(),
            *self.over_runs_lines(),
            *([method] if method else []),
            *self.test_lines(),
        ]

    def details_markdown(self) -> str:
        """The figures behind the verdicts (no verdict repeated): keys, per-run and per-arm accuracies."""
        what = "mean over runs" if max(len(self.runs_a), len(self.runs_b)) > 1 else "run"
        lines = [
            f"| key | A `{self.a}` ({what}) | B `{self.b}` ({what}) | delta (B - A) |",
            "|---|---|---|---|",
        ]
        lines += [f"| `{r.key}` | {fmt(r.a)} | {fmt(r.b)} | {fmt_delta(r)} |" for r in self.rows]
        if self.fabricated:
            lines = [f"**{FABRICATED}** every figure below was made up by the dry run.", "", *lines]
        if self.arms:
            lines += [
                "",
                "| arm | run | seed | start accuracy (Wilson 95%) | end accuracy (Wilson 95%) |",
                "|---|---|---|---|---|",
            ]
            for arm in self.arms:
                for r in arm.runs:
                    start = (
                        "-" if r.start_value is None else f"{r.start_value:.3f}{_fmt_ci(r.start_interval())}"
                    )
                    end = "-" if r.end_value is None else f"{r.end_value:.3f}{_fmt_ci(r.end_interval())}"
                    seed = "-" if r.seed is None else str(r.seed)
                    lines.append(f"| {arm.label} | `{r.run_id}` | {seed} | {start} | {end} |")
        return "\n".join(lines)

    def markdown(self) -> str:
        return "\n".join([*[f"- {line}" for line in self.summary_lines()], "", self.details_markdown()])

    def to_json(self) -> dict[str, Any]:
        method = self.method.to_json() if self.method else None
        return {
            "a": self.a,
            "b": self.b,
            "runs_a": self.runs_a,
            "runs_b": self.runs_b,
            "fabricated": self.fabricated,
            "method_verdict": self.verdict,
            "margin": self.method.margin if self.method else None,
            "method": method,
            "arms": None if self.arms is None else {"a": self.arms[0].to_json(), "b": self.arms[1].to_json()},
            "parity": [p.to_json() for p in self.parity],
            "keys": [{"key": r.key, "a": r.a, "b": r.b, "delta": r.delta} for r in self.rows],
            "mcnemar": None if self.paired is None else self.pairs[0].to_json(),
            "mcnemar_pairs": [p.to_json() for p in self.pairs],
            "start_to_end": [s.to_json() for s in self.learning],
            "sampled_start_to_end": [s.to_json() for s in self.sampled],
            "learning_over_runs": [o.to_json() for o in self.over_runs],
            "config_warnings": self.warnings,
            "verdict_lines": self.summary_lines(),
        }


def as_runs(x: RunFiles | Sequence[RunFiles]) -> list[RunFiles]:
    return [x] if isinstance(x, RunFiles) else list(x)


def label_of(runs: Sequence[RunFiles]) -> str:
    return ",".join(r.run_id for r in runs)


def compare_runs(
    a: RunFiles | Sequence[RunFiles],
    b: RunFiles | Sequence[RunFiles],
    keys: Sequence[str] | None = None,
    *,
    margin: float = stats.DEFAULT_MARGIN,
    labels: tuple[str, str] | None = None,
    names: Mapping[str, str] | None = None,
) -> Comparison:
    """Arm A vs arm B: each one run or a group of runs (seeds). `labels` name the arms (default: their run
    ids), `names` the runs (the SOP's `jax/s0`)."""
    runs_a, runs_b = as_runs(a), as_runs(b)
    if not runs_a or not runs_b:
        raise UsageError("compare needs at least one run in each arm")
    ids = [r.run_id for r in (*runs_a, *runs_b)]
    if len(set(ids)) != len(ids):
        raise UsageError(
            f"compare: a run appears twice ({', '.join(sorted({i for i in ids if ids.count(i) > 1}))})"
        )
    stats.check_margin(margin)
    label_a, label_b = labels or (label_of(runs_a), label_of(runs_b))
    names = dict(names or {})
    pairs, by_seed = pair_runs(runs_a, runs_b)
    seed_pairs = [
        SeedPair(
            names.get(x.run_id, x.run_id),
            names.get(y.run_id, y.run_id),
            x.seed if x.seed is not None and x.seed == y.seed else None,
            paired_test(x.eval_full, y.eval_full),
        )
        for x, y in pairs
        if x.eval_full and y.eval_full
    ]
    arms = (
        ArmStats(label_a, [run_accuracy(r) for r in runs_a]),
        ArmStats(label_b, [run_accuracy(r) for r in runs_b]),
    )
    # Each run's one number for the method test: its sampled end pass rate when every run has one (eight
    # samples a question average out the greedy mode's all-or-nothing flips), else its greedy end accuracy.
    end = {r.run_id: r.end_value for arm in arms for r in arm.runs}
    metric = stats.END_ACCURACY
    sampled_end = {r.run_id: sampled_rate(r.sampled) for r in (*runs_a, *runs_b)}
    if all(v is not None for v in sampled_end.values()):
        end, metric = sampled_end, "end sampled pass rate"
    seed_ends = [(end[x.run_id], end[y.run_id]) for x, y in pairs]  # aligned by seed, A's order
    if by_seed and all(x is not None and y is not None for x, y in seed_ends):
        method = stats.method_test(
            [x for x, _ in seed_ends], [y for _, y in seed_ends], margin, paired=True, metric=metric
        )
    else:
        method = stats.method_test(
            [v for r in runs_a if (v := end[r.run_id]) is not None],
            [v for r in runs_b if (v := end[r.run_id]) is not None],
            margin,
            metric=metric,
        )
    learning = [s for r in (*runs_a, *runs_b) if (s := r.start_to_end()) is not None]
    sampled = {s.run_id: s for r in (*runs_a, *runs_b) if (s := r.sampled_start_to_end()) is not None}
    over = [
        o for label, runs in ((label_a, runs_a), (label_b, runs_b))
        if (o := arm_over_runs(label, runs, learning, sampled)) is not None
    ]
    verdicts = [
        v
        for r in (*runs_a, *runs_b)
        if (v := parity.parity_verdict(names.get(r.run_id, r.run_id), r.summary, r.metrics, r.config))
    ]
    return Comparison(
        label_a,
        label_b,
        side_by_side(mean_summary(runs_a), mean_summary(runs_b), keys),
        seed_pairs,
        learning,
        any(r.fabricated for r in (*runs_a, *runs_b)),
        method,
        arms,
        verdicts,
        config_warnings(runs_a, runs_b, (label_a, label_b)),
        [r.run_id for r in runs_a],
        [r.run_id for r in runs_b],
        names,
        list(sampled.values()),
        over,
    )


def sampled_rate(counts: Mapping[str, tuple[int, int]] | None) -> float | None:
    """A sweep's sampled pass rate: right samples over samples; None without a sampled pass."""
    total = sum(n for _, n in (counts or {}).values())
    return sum(k for k, _ in counts.values()) / total if counts and total else None


def arm_over_runs(
    label: str,
    runs: Sequence[RunFiles],
    greedy: Sequence[StartToEnd],
    sampled: Mapping[str, learning.SampledStartToEnd],
) -> learning.OverRuns | None:
    """The arm's start -> end over its runs: on the sampled pass rate when every run has one (the finer
    measure), else on greedy accuracy when every run has both sweeps; None otherwise or with one run."""
    ids = [r.run_id for r in runs]
    by_run = {s.run_id: s for s in greedy}
    if all(i in sampled for i in ids):
        results = [sampled[i] for i in ids]
        changes = [s.end - s.start for s in results]
        metric = f"sampled pass rate ({'/'.join(sorted({str(s.samples) for s in results}))} per question)"
    elif all(i in by_run for i in ids):
        results = [by_run[i] for i in ids]
        changes = [s.paired.accuracy_b - s.paired.accuracy_a for s in results]
        metric = "greedy accuracy"
    else:
        return None
    improved = sum(1 for s in results if s.verdict == IMPROVED)
    return learning.over_runs(label, metric, changes, improved)
