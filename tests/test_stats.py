"""Method-level statistics: intervals and tests against closed forms, pinned reference numbers (scipy 1.17 /
statsmodels 0.14-0.15) and the hostile cases (n=1, no spread, unequal sizes, margin 0)."""

from __future__ import annotations

import math
import sys

import pytest

from orchestrator import stats

st = pytest.importorskip("scipy.stats")

# Three seeds per arm, end accuracies (B - A per seed: 0, +0.01, 0).
A3 = [0.17, 0.18, 0.16]
B3 = [0.17, 0.19, 0.16]


def _welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's t (B - A), its Welch-Satterthwaite df and the standard error, by hand."""
    va, vb = (st.tvar(x) / len(x) for x in (a, b))
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return (sum(b) / len(b) - sum(a) / len(a)) / se, df, se


def test_wilson_and_exact_intervals_match_their_closed_forms():
    k, n = 22, 256  # the demo's start accuracy, 0.086
    z = st.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    wilson = stats.proportion_interval(k, n)
    assert (wilson.low, wilson.high) == pytest.approx((centre - half, centre + half), rel=1e-12)
    assert (wilson.low, wilson.high) == pytest.approx((0.057435579036, 0.126682302066), abs=1e-11)
    assert wilson.method == "Wilson" and wilson.text() == "[0.057, 0.127]"
    exact = stats.proportion_interval(k, n, method="beta")
    assert exact.low == pytest.approx(st.beta.ppf(0.025, k, n - k + 1), rel=1e-10)
    assert exact.high == pytest.approx(st.beta.ppf(0.975, k + 1, n - k), rel=1e-10)
    assert exact.method == "Clopper-Pearson"
    none_right = stats.proportion_interval(0, n)  # hostile: 0 of n, and n of n
    assert none_right.low == 0 and 0 < none_right.high < 0.02
    all_right = stats.proportion_interval(n, n)
    assert all_right.high == pytest.approx(1.0) and 0.98 < all_right.low < 1
    for bad in ((5, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError):
            stats.proportion_interval(*bad)


def test_mean_interval_over_seeds_is_the_t_interval():
    values = [0.184, 0.172, 0.141]
    mean = sum(values) / 3
    half = st.t.ppf(0.975, 2) * st.tstd(values) / math.sqrt(3)
    ci = stats.mean_interval(values)
    assert (ci.low, ci.high) == pytest.approx((mean - half, mean + half), rel=1e-12)
    assert ci.method == "t" and ci.level == 0.95
    assert stats.mean_interval([0.2]) is None and stats.mean_interval([]) is None  # no spread to use
    flat = stats.mean_interval([0.1, 0.1, 0.1])  # hostile: identical runs, width 0, not NaN
    assert flat.low == flat.high == pytest.approx(0.1, abs=1e-15)


def test_welch_and_tost_on_unpaired_runs_match_hand_computation_and_pinned_values():
    result = stats.method_test(A3, B3, 0.03)
    t, df, se = _welch(A3, B3)
    assert result.design == "Welch (unpaired)" and result.df == pytest.approx(df, rel=1e-12)
    assert result.p_difference == pytest.approx(2 * st.t.sf(abs(t), df), rel=1e-10)
    assert result.p_difference == pytest.approx(0.770025638391, rel=1e-9)
    # TOST: the larger of the two one-sided p-values, each shifted by the margin.
    diff = sum(B3) / 3 - sum(A3) / 3
    p_low = st.t.sf((diff + 0.03) / se, df)
    p_high = st.t.cdf((diff - 0.03) / se, df)
    assert result.p_equivalence == pytest.approx(max(p_low, p_high), rel=1e-10)
    assert result.p_equivalence == pytest.approx(0.0372941825624, rel=1e-9)
    assert result.verdict == "equivalent" and result.difference == pytest.approx(diff)
    half = st.t.ppf(0.975, df) * se
    assert (result.difference_ci.low, result.difference_ci.high) == pytest.approx((diff - half, diff + half))
    assert "within +/-0.03" in result.line() and "3 vs 3 runs, Welch (unpaired)" in result.line()


def test_paired_by_seed_uses_the_per_seed_differences():
    result = stats.method_test(A3, B3, 0.03, paired=True)
    d = [y - x for x, y in zip(A3, B3, strict=True)]
    se = st.tstd(d) / math.sqrt(3)
    mean = sum(d) / 3
    assert result.design == "paired by seed" and result.df == 2
    assert result.p_difference == pytest.approx(2 * st.t.sf(abs(mean / se), 2), rel=1e-10)
    assert result.p_difference == pytest.approx(0.422649730810, rel=1e-9)
    assert result.p_equivalence == pytest.approx(max(st.t.sf((mean + 0.03) / se, 2),
                                                     st.t.cdf((mean - 0.03) / se, 2)), rel=1e-10)
    assert result.p_equivalence == pytest.approx(0.00763403608267, rel=1e-9)
    assert result.verdict == "equivalent"
    with pytest.raises(ValueError, match="as many runs"):
        stats.method_test(A3, B3[:2], paired=True)


def test_different_and_the_both_reject_case():
    far = stats.method_test([0.10, 0.11, 0.12], [0.30, 0.31, 0.29])
    assert far.verdict == "different" and far.p_difference < 1e-3 and far.p_equivalence > 0.5
    assert "differ at 5%" in far.line() and far.difference == pytest.approx(0.19)
    # A steady +0.01 per seed: detectably different, and well inside a 0.03 margin -> equivalent, said so.
    small = stats.method_test([0.50, 0.40, 0.60, 0.45], [0.511, 0.409, 0.610, 0.460], 0.03, paired=True)
    assert small.p_difference < 0.05 and small.p_equivalence < 0.05
    assert small.verdict == "equivalent" and "smaller than the margin" in small.reason


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        ([0.18], [0.13], "one run per arm"),
        ([], [], "one run per arm"),
        ([0.18], [0.13, 0.15, 0.16], "fewer than two runs in an arm"),
        ([0.1, 0.1, 0.1], [0.2, 0.2, 0.2], "no spread between runs"),  # Welch alone would say p = 0
    ],
)
def test_what_no_test_can_judge_is_inconclusive_and_says_why(a, b, why):
    result = stats.method_test(a, b)
    assert result.verdict == "inconclusive" and why in result.reason
    assert result.p_difference is None and result.p_equivalence is None
    assert result.line().startswith(f"method verdict: inconclusive: {result.reason}")
    if why == "no spread between runs":  # the guard matters: scipy's Welch calls this "different"
        with pytest.warns(RuntimeWarning):
            assert st.ttest_ind(b, a, equal_var=False).pvalue < 1e-40


def test_paired_with_no_spread_in_the_differences_is_inconclusive():
    result = stats.method_test([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], paired=True)  # identical on every seed
    assert result.verdict == "inconclusive" and "every per-seed difference is the same" in result.reason
    assert result.difference == 0


def test_unequal_group_sizes_welch():
    a, b = [0.17, 0.18], [0.15, 0.16, 0.14, 0.17]
    result = stats.method_test(a, b, 0.03)
    t, df, _ = _welch(a, b)
    assert (result.n_a, result.n_b) == (2, 4)
    assert result.p_difference == pytest.approx(2 * st.t.sf(abs(t), df), rel=1e-10)


def test_margin_zero_never_shows_equivalence_and_bad_margins_are_refused():
    a, b = [0.10, 0.20, 0.30], [0.11, 0.19, 0.30]
    result = stats.method_test(a, b, 0.0)
    assert result.p_equivalence >= 0.5 and result.verdict == "inconclusive"
    assert "a margin of 0 can never show equivalence" in result.reason
    assert stats.method_test(a, b, 0.5).verdict == "equivalent"  # the same runs, a wide margin
    for bad in (-0.01, 1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="margin"):
            stats.method_test(a, b, bad)


def test_to_json_carries_the_figures():
    figures = stats.method_test(A3, B3, 0.03).to_json()
    assert figures["verdict"] == "equivalent" and figures["margin"] == 0.03
    assert (figures["n_a"], figures["n_b"], figures["design"]) == (3, 3, "Welch (unpaired)")
    assert figures["difference_ci"]["method"] == "t" and figures["alpha"] == 0.05
    assert set(figures) >= {"p_difference", "p_equivalence", "mean_a", "mean_b", "difference", "df"}


def test_without_statsmodels_the_verdict_says_what_is_missing(monkeypatch):
    for name in ("statsmodels.stats", "statsmodels.stats.weightstats", "statsmodels.stats.proportion"):
        monkeypatch.setitem(sys.modules, name, None)  # the import fails, as on a trimmed install
    result = stats.method_test(A3, B3)
    assert result.verdict == "inconclusive" and "pip install 'grpoctl[stats]'" in result.reason
    with pytest.raises(stats.StatsUnavailable):
        stats.proportion_interval(1, 2)
