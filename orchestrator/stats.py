"""Method-level statistics for `compare`: runs, not questions, are the units of a claim about a method.

Pure functions over per-run accuracies. The numbers come from scipy (t tests, t intervals) and statsmodels
(Wilson / exact intervals for one run's accuracy, two one-sided tests for equivalence); nothing here
re-derives a distribution. Why these and not more (field-notes section 7, Henderson et al. 2018, Agarwal et
al. 2021): with 3-5 seeds per arm a t interval across seeds is what the field reports; rliable's stratified
bootstrap over tasks reduces to a plain bootstrap on our one task and is unreliable below ~10 runs, so it is
not used.

A method verdict is one of:
- "different":    a two-sided t test on the per-run end accuracies rejects "same mean" at 5%;
- "equivalent":   two one-sided t tests (TOST) reject "the means differ by at least the margin" at 5%
                  (the 90% interval of the difference lies inside +/- margin);
- "inconclusive": neither, or the data cannot support a test (one run per arm, no spread between runs).
When both tests reject (a difference smaller than the margin), the verdict is "equivalent" and says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ALPHA = 0.05
DEFAULT_MARGIN = 0.03  # accuracy points (3 percentage points): the default equivalence margin
END_ACCURACY = "end accuracy"  # the method test's default measure: each run's greedy end accuracy
DIFFERENT, EQUIVALENT, INCONCLUSIVE = "different", "equivalent", "inconclusive"
VERDICTS = (DIFFERENT, EQUIVALENT, INCONCLUSIVE)
_NEEDS = (
    "the method statistics need scipy and statsmodels, which this install lacks: pip install 'grpoctl[stats]'"
)


class StatsUnavailable(RuntimeError):
    """scipy or statsmodels is missing (a trimmed laptop install): verdicts say so instead of guessing."""


def _scipy_stats() -> Any:
    try:
        from scipy import stats
    except ImportError:
        raise StatsUnavailable(_NEEDS) from None
    return stats


def _weightstats() -> Any:
    try:
        from statsmodels.stats import weightstats
    except ImportError:
        raise StatsUnavailable(_NEEDS) from None
    return weightstats


# ------------------------------------------------------------------------------------------ intervals


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    method: str  # "Wilson", "Clopper-Pearson", "t"
    level: float = 1 - ALPHA

    def text(self) -> str:
        return f"[{self.low:.3f}, {self.high:.3f}]"

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "method": self.method, "level": self.level}


def proportion_interval(k: int, n: int, alpha: float = ALPHA, method: str = "wilson") -> Interval:
    """One run's accuracy (k right of n questions): Wilson's score interval, or "beta" (Clopper-Pearson,
    exact). It covers the question sampling of that one run only, not run-to-run variance."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0 (k={k}, n={n})")
    try:
        from statsmodels.stats.proportion import proportion_confint
    except ImportError:
        raise StatsUnavailable(_NEEDS) from None
    low, high = proportion_confint(k, n, alpha=alpha, method=method)
    return Interval(
        float(low), float(high), {"wilson": "Wilson", "beta": "Clopper-Pearson"}[method], 1 - alpha
    )


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values) if values else 0.0


def mean_interval(values: Sequence[float], alpha: float = ALPHA) -> Interval | None:
    """A t interval for the mean over runs (seeds); None with fewer than two runs (no spread to use).
    With no spread at all the interval has width 0: it says the sample did not vary, not that it cannot."""
    if len(values) < 2:
        return None
    mean = math.fsum(values) / len(values)
    if _spread(values) == 0:
        return Interval(mean, mean, "t", 1 - alpha)
    ci = _scipy_stats().ttest_1samp(list(values), 0.0).confidence_interval(1 - alpha)
    return Interval(float(ci.low), float(ci.high), "t", 1 - alpha)


def one_sample_p(values: Sequence[float]) -> float | None:
    """Two-sided one-sample t test of "mean 0" over runs; None with fewer than two runs or no spread (a t test
    has no variance to judge by)."""
    if len(values) < 2 or _spread(values) == 0:
        return None
    return float(_scipy_stats().ttest_1samp(list(values), 0.0).pvalue)


def mean_change_p(changes: Sequence[int | float]) -> float:
    """Two-sided t test of "mean change 0" over paired units (questions: each one's change in right
    samples). The test of the pass rate itself, which is a mean: a rank test (Wilcoxon) asks whether most
    questions moved one way, and on the tiny demo it called a run whose pass rate rose "worse" (many
    questions lost a sample, a few gained many). With no spread: 1.0 when nothing changed, else 0.0 (every
    question moved by the same non-zero amount)."""
    p = one_sample_p(changes)
    if p is None:
        return 1.0 if not changes or changes[0] == 0 else 0.0
    return p


# ------------------------------------------------------------------------------------- method test


@dataclass(frozen=True)
class MethodTest:
    """Arm B vs arm A on per-run end accuracies (difference = B - A)."""

    verdict: str
    reason: str  # one sentence: why this verdict (or why no test could be made)
    margin: float
    n_a: int
    n_b: int
    design: str  # "paired by seed", "Welch (unpaired)", or "none"
    mean_a: float | None = None
    mean_b: float | None = None
    difference: float | None = None  # mean of B - A
    difference_ci: Interval | None = None  # 95% (two-sided test's level)
    p_difference: float | None = None  # two-sided t test, H0: equal means
    p_equivalence: float | None = None  # TOST, H0: |difference| >= margin
    df: float | None = None
    alpha: float = ALPHA
    metric: str = END_ACCURACY  # what each run contributes: its greedy end accuracy or sampled pass rate

    def line(self) -> str:
        figures = []
        if self.difference is not None:
            ci = (
                f" (95% CI {self.difference_ci.low:+.3f} to {self.difference_ci.high:+.3f})"
                if self.difference_ci
                else ""
            )
            figures.append(f"mean {self.metric} B - A {self.difference:+.3f}{ci}")
        if self.p_difference is not None:
            figures.append(f"t test p={self.p_difference:.3g}")
        if self.p_equivalence is not None:
            figures.append(f"TOST p={self.p_equivalence:.3g}")
        design = "" if self.design == "none" else f", {self.design}"
        runs = f"{self.n_a} vs {self.n_b} runs{design}, margin +/-{self.margin:.3g}"
        tail = f"; {', '.join(figures)}" if figures else ""
        return f"method verdict: {self.verdict}: {self.reason} ({runs}{tail})"

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "margin": self.margin,
            "alpha": self.alpha,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "design": self.design,
            "mean_a": self.mean_a,
            "mean_b": self.mean_b,
            "difference": self.difference,
            "difference_ci": None if self.difference_ci is None else self.difference_ci.to_json(),
            "p_difference": self.p_difference,
            "p_equivalence": self.p_equivalence,
            "df": self.df,
            "metric": self.metric,
        }


def check_margin(margin: float) -> float:
    if not math.isfinite(margin) or margin < 0 or margin >= 1:
        raise ValueError(f"margin {margin!r}: use an accuracy difference in [0, 1), e.g. 0.03")
    return float(margin)


def method_test(
    a: Sequence[float],
    b: Sequence[float],
    margin: float = DEFAULT_MARGIN,
    *,
    paired: bool = False,
    alpha: float = ALPHA,
    metric: str = "",
) -> MethodTest:
    """Are arms A and B (per-run end accuracies) different, equivalent within `margin`, or neither?

    `paired`: A[i] and B[i] share a seed (same init, same data order), so the test is on the per-seed
    differences (scipy ttest_rel, statsmodels ttost_paired); else Welch's unequal-variance t test and
    ttost_ind(usevar="unequal"). The units are runs: at least two per arm (two pairs) are needed.
    """
    margin = check_margin(margin)
    a, b = [float(x) for x in a], [float(x) for x in b]
    if paired and len(a) != len(b):
        raise ValueError(f"a paired test needs as many runs in A as in B ({len(a)} vs {len(b)})")
    metric = metric or END_ACCURACY
    base = {"margin": margin, "n_a": len(a), "n_b": len(b), "alpha": alpha, "metric": metric}
    mean_a = math.fsum(a) / len(a) if a else None
    mean_b = math.fsum(b) / len(b) if b else None
    means = {
        "mean_a": mean_a,
        "mean_b": mean_b,
        "difference": None if mean_a is None or mean_b is None else mean_b - mean_a,
    }
    if min(len(a), len(b)) < 2:
        per_arm = "one run per arm" if max(len(a), len(b)) <= 1 else "fewer than two runs in an arm"
        reason = (
            f"{per_arm}: run-to-run (seed, sampling) variance cannot be told apart from the method; "
            "replicate each arm (SOP `seeds: [0, 1, 2]`)"
        )
        return MethodTest(INCONCLUSIVE, reason, design="none", **base, **means)
    design = "paired by seed" if paired else "Welch (unpaired)"
    diffs = [y - x for x, y in zip(a, b, strict=True)] if paired else None
    flat = _spread(diffs) == 0 if paired else (_spread(a) == 0 and _spread(b) == 0)
    if flat:
        what = "every per-seed difference is the same" if paired else "the runs within each arm are identical"
        reason = (
            f"{what} (no spread between runs): a t test has no variance to judge by; "
            "add seeds (or check that the seed reaches the trainer)"
        )
        return MethodTest(INCONCLUSIVE, reason, design=design, **base, **means)
    try:
        st, ws = _scipy_stats(), _weightstats()
    except StatsUnavailable as err:
        return MethodTest(INCONCLUSIVE, str(err), design=design, **base, **means)
    import numpy as np

    xa, xb = np.asarray(a), np.asarray(b)
    if paired:
        res = st.ttest_rel(xb, xa)
        p_eq = ws.ttost_paired(xb, xa, -margin, margin)[0]
    else:
        res = st.ttest_ind(xb, xa, equal_var=False)
        p_eq = ws.ttost_ind(xb, xa, -margin, margin, usevar="unequal")[0]
    ci = res.confidence_interval(1 - alpha)
    p_diff, p_eq = float(res.pvalue), float(p_eq)
    figures = {
        "difference_ci": Interval(float(ci.low), float(ci.high), "t", 1 - alpha),
        "p_difference": p_diff,
        "p_equivalence": p_eq,
        "df": float(res.df),
    }
    if p_eq < alpha:
        verdict = EQUIVALENT
        reason = f"the arms' mean {metric} is the same within +/-{margin:.3g} at 5% (TOST)"
        if p_diff < alpha:
            reason += "; a difference is detectable, but it is smaller than the margin"
    elif p_diff < alpha:
        verdict, reason = DIFFERENT, f"the arms' mean {metric} values differ at 5% (two-sided t test)"
    else:
        verdict = INCONCLUSIVE
        reason = (
            f"neither a difference nor equivalence within +/-{margin:.3g} is shown at 5% with these "
            "runs; more seeds narrow the interval"
        )
        if margin == 0:
            reason += " (a margin of 0 can never show equivalence)"
    return MethodTest(verdict, reason, design=design, **base, **means, **figures)
