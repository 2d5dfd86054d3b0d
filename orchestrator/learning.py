"""Did training improve the policy? Start -> end claims, per run and over a group of runs.

Per run, two paired tests of the run's end sweep against its own start sweep (the state right before GRPO
step 1), each about this one trajectory:
- greedy (compare.StartToEnd): one answer per question, exact McNemar on the questions that flipped;
- sampled (`SampledStartToEnd`, trainer `eval_full_sampled`): n samples per question at the rollout's
  settings with the same keys at start and end; a two-sided paired t test over the questions on each
  question's change in right samples, i.e. on the pass rate itself. Questions are the units (a question's
  samples are not independent of each other); with hundreds of questions and changes bounded by n the t
  test's normal approximation holds. Not a rank test: on the tiny demo many questions lose a sample while a
  few gain many, and Wilcoxon then called a run whose pass rate rose "worse" (BENCHMARKS.md). A weak
  policy's greedy answer can sit on one mode (every answer 0) while GRPO moves probability onto right
  answers: the sampled pass rate is what GRPO optimises and sees that.

Over runs (`OverRuns`): is the method's improvement more than one lucky init? Each run's end - start
sampled pass rate (greedy where a run has no sampled pass) is one number; runs are the units: a one-sample
t test on those differences (scipy), its t interval, and how many runs improved by their own test. With
one run there is no such test: the per-run line is all there is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator import stats

ALPHA = stats.ALPHA
IMPROVED, NO_CHANGE, WORSE = "improved at 5%", "no detectable change at 5%", "worse at 5%"
NO_TEST = "no test over runs (the runs do not vary, or scipy is missing)"
Counts = Mapping[str, tuple[int, int]]  # question id -> (right samples, samples)


def direction(p_value: float, up: float, down: float) -> str:
    """The verdict words of a two-sided test: a side only when p < 5% and the change has one."""
    if p_value >= ALPHA or up == down:
        return NO_CHANGE
    return IMPROVED if up > down else WORSE


@dataclass(frozen=True)
class SampledStartToEnd:
    """One run's sampled pass rate, end vs start, paired by question."""

    run_id: str
    questions: int
    samples: int  # per question
    start: float
    end: float
    up: int  # questions with more right samples at the end than at the start
    down: int
    p_value: float  # two-sided paired t test over the questions' changes (stats.mean_change_p)

    @property
    def verdict(self) -> str:
        return direction(self.p_value, max(self.end - self.start, 0.0), max(self.start - self.end, 0.0))

    def line(self) -> str:
        return (
            f"{self.run_id}: sampled pass rate ({self.samples} per question) start {self.start:.3f} -> end "
            f"{self.end:.3f} on {self.questions} paired questions (up on {self.up}, down on {self.down}, "
            f"paired t test p={self.p_value:.3g}) -> {self.verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "n": self.questions,
            "samples": self.samples,
            "start_accuracy": self.start,
            "end_accuracy": self.end,
            "up": self.up,
            "down": self.down,
            "p_value": self.p_value,
            "test": "paired t test (two-sided, over questions)",
            "verdict": self.verdict,
        }


def sampled_test(run_id: str, start: Counts | None, end: Counts | None) -> SampledStartToEnd | None:
    """End vs start over the questions both sampled the same number of times; None when there are none or
    scipy is missing (a trimmed laptop install: the greedy line still stands)."""
    if not start or not end:
        return None
    ids = sorted(q for q in start.keys() & end.keys() if start[q][1] == end[q][1])
    if not ids:
        return None
    samples = {start[q][1] for q in ids}
    changes = [end[q][0] - start[q][0] for q in ids]
    try:
        p_value = stats.mean_change_p(changes)
    except stats.StatsUnavailable:
        return None
    total = sum(start[q][1] for q in ids)
    return SampledStartToEnd(
        run_id,
        len(ids),
        samples.pop() if len(samples) == 1 else 0,
        sum(start[q][0] for q in ids) / total,
        sum(end[q][0] for q in ids) / total,
        sum(1 for d in changes if d > 0),
        sum(1 for d in changes if d < 0),
        p_value,
    )


@dataclass(frozen=True)
class OverRuns:
    """An arm's end - start change over its runs (each run one number): the claim about the method."""

    label: str
    metric: str  # "sampled pass rate" or "greedy accuracy"
    changes: list[float]
    improved_runs: int  # runs whose own start -> end test says improved
    interval: stats.Interval | None
    p_value: float | None  # one-sample t test over runs, H0: mean change 0

    @property
    def mean(self) -> float:
        return math.fsum(self.changes) / len(self.changes)

    @property
    def verdict(self) -> str:
        if self.p_value is None:
            return NO_TEST
        mean = self.mean
        return direction(self.p_value, max(mean, 0.0), max(-mean, 0.0))

    def line(self) -> str:
        ci = self.interval
        ci_text = "" if ci is None else f" (t 95% CI {ci.low:+.3f} to {ci.high:+.3f})"
        test = "" if self.p_value is None else f", one-sample t test over runs p={self.p_value:.3g}"
        runs = len(self.changes)
        return (
            f"{self.label} over {runs} runs: {self.metric} end - start {self.mean:+.3f}{ci_text}{test}; "
            f"{self.improved_runs} of {runs} runs improved by their own test -> {self.verdict}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "metric": self.metric,
            "runs": len(self.changes),
            "changes": self.changes,
            "mean_change": self.mean,
            "ci": None if self.interval is None else self.interval.to_json(),
            "p_value": self.p_value,
            "improved_runs": self.improved_runs,
            "verdict": self.verdict,
        }


def over_runs(label: str, metric: str, changes: Sequence[float], improved_runs: int) -> OverRuns | None:
    """The over-runs claim of one arm; None with fewer than two runs (nothing to generalise over)."""
    if len(changes) < 2:
        return None
    p_value: float | None = None
    interval: stats.Interval | None = None
    try:
        interval = stats.mean_interval(changes)
        p_value = stats.one_sample_p(changes)
    except stats.StatsUnavailable:
        pass
    return OverRuns(label, metric, [float(c) for c in changes], improved_runs, interval, p_value)
