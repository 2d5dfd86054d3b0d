"""Start -> end claims (orchestrator/learning.py): the sampled pass per run (a paired t test over
questions) and the change over an arm's runs (one-sample t test, runs as the units), checked against
scipy on fresh random data, and how `compare` shows them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from orchestrator import compare as cmp
from orchestrator import learning

st = pytest.importorskip("scipy.stats", reason="the learning statistics need the stats extra")

SAMPLES = 8


def counts(values: list[int]) -> dict[str, tuple[int, int]]:
    return {f"q{i}": (k, SAMPLES) for i, k in enumerate(values)}


@pytest.mark.parametrize("seed", range(5))
def test_the_sampled_start_to_end_is_scipys_paired_t_test_over_questions(seed: int):
    rng = random.Random(seed)
    start = [rng.randint(0, SAMPLES) for _ in range(120)]
    end = [min(SAMPLES, max(0, k + rng.choice((-2, -1, 0, 0, 1, 2, 3)))) for k in start]
    result = learning.sampled_test("r", counts(start), counts(end))
    changes = [b - a for a, b in zip(start, end, strict=True)]
    reference = st.ttest_rel(end, start).pvalue
    assert result.p_value == pytest.approx(reference, rel=1e-12)
    assert (result.up, result.down) == (sum(c > 0 for c in changes), sum(c < 0 for c in changes))
    assert result.start == sum(start) / (SAMPLES * 120) and result.end == sum(end) / (SAMPLES * 120)
    assert result.questions == 120 and result.samples == SAMPLES


def test_the_sampled_verdict_has_a_side_only_when_the_test_says_so():
    up = learning.sampled_test("r", counts([1] * 40), counts([3] * 30 + [1] * 10))
    down = learning.sampled_test("r", counts([3] * 30 + [1] * 10), counts([1] * 40))
    noise = learning.sampled_test("r", counts([2, 3] * 20), counts([3, 2] * 20))
    same = learning.sampled_test("r", counts([2] * 40), counts([2] * 40))
    assert (up.verdict, down.verdict) == (learning.IMPROVED, learning.WORSE)
    assert noise.verdict == same.verdict == learning.NO_CHANGE and same.p_value == 1.0
    assert "up on 30, down on 0" in up.line() and "paired t test p=" in up.line()
    # the side is the pass rate's: 60 questions down by one sample and 40 up by three is a gain, not a loss
    few_large = learning.sampled_test("r", counts([4] * 100), counts([3] * 60 + [7] * 40))
    assert (few_large.up, few_large.down) == (40, 60) and few_large.end > few_large.start
    assert few_large.p_value < 0.05 and few_large.verdict == learning.IMPROVED
    # the seed-5 shape of the tiny demo: the pass rate rises a little, most questions lose a sample; a rank
    # test calls it "worse" at 5%, the test of the pass rate does not
    many_small = learning.sampled_test("r", counts([2] * 150), counts([1] * 110 + [2] * 10 + [7] * 30))
    assert many_small.end > many_small.start
    ranks = st.wilcoxon([-1] * 110 + [5] * 30, zero_method="wilcox")
    assert ranks.pvalue < 0.05 and many_small.verdict != learning.WORSE


def test_only_questions_sampled_alike_at_both_ends_are_paired():
    start = {"a": (1, 8), "b": (2, 8), "c": (0, 4)}
    end = {"a": (5, 8), "c": (4, 8), "d": (8, 8)}
    result = learning.sampled_test("r", start, end)
    assert result.questions == 1 and (result.start, result.end) == (1 / 8, 5 / 8)  # "a" only
    assert learning.sampled_test("r", None, end) is None
    assert learning.sampled_test("r", {"c": (0, 4)}, {"c": (1, 8)}) is None


@pytest.mark.parametrize("seed", range(4))
def test_over_runs_is_a_one_sample_t_test_on_the_runs_changes(seed: int):
    rng = random.Random(seed)
    changes = [rng.gauss(0.02, 0.02) for _ in range(rng.randint(2, 6))]
    result = learning.over_runs("arm", "sampled pass rate", changes, improved_runs=1)
    reference = st.ttest_1samp(changes, 0.0)
    ci = reference.confidence_interval(0.95)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert (result.interval.low, result.interval.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    want = learning.NO_CHANGE if reference.pvalue >= 0.05 else (
        learning.IMPROVED if sum(changes) > 0 else learning.WORSE)
    assert result.verdict == want


def test_over_runs_needs_two_runs_that_vary():
    assert learning.over_runs("arm", "m", [0.05], 1) is None  # one run: the per-run line is all there is
    flat = learning.over_runs("arm", "m", [0.0, 0.0, 0.0], 0)
    assert flat.p_value is None and flat.verdict == learning.NO_TEST
    clear = learning.over_runs("arm", "m", [0.04, 0.05, 0.045], 3)
    assert clear.verdict == learning.IMPROVED
    assert clear.line().startswith("arm over 3 runs: m end - start +0.045 (t 95% CI +")
    assert "3 of 3 runs improved by their own test" in clear.line()


# ------------------------------------------------------------------------------ through compare


def sampled_run(root: Path, name: str, seed: int, start: list[int], end: list[int], impl: str) -> Path:
    """A fetched run folder whose sweeps have a sampled pass (greedy: question i right iff its count > 4)."""
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"seed": seed, "train": {"policy_loss_impl": impl}}))
    summary = {"eval_full/accuracy": sum(k > 4 for k in end) / len(end)}
    (folder / "summary.json").write_text(json.dumps(summary))
    for file, values in (("eval_full_start.jsonl", start), ("eval_full.jsonl", end)):
        rows = [{"id": f"q{i}", "correct": k > 4, "samples": SAMPLES, "sampled_correct": k}
                for i, k in enumerate(values)]
        (folder / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_shows_the_sampled_pass_per_run_and_over_runs_and_tests_methods_on_it(tmp_path: Path):
    rng = random.Random(7)
    runs: dict[str, list[cmp.RunFiles]] = {"jax": [], "pallas": []}
    for arm in runs:
        for seed in range(3):
            start = [rng.randint(0, 3) for _ in range(60)]
            end = [min(SAMPLES, k + rng.choice((0, 1, 1, 2))) for k in start]  # every run gains
            folder = sampled_run(tmp_path, f"{arm}-s{seed}", seed, start, end, arm)
            runs[arm].append(cmp.load_run(folder))
    result = cmp.compare_runs(runs["jax"], runs["pallas"], labels=("jax", "pallas"))

    per_run = [line for line in result.learning_lines() if "sampled pass rate" in line]
    assert len(per_run) == 6 and all(line.endswith("-> improved at 5%") for line in per_run)
    over = result.over_runs_lines()
    assert [line.split(" over ")[0] for line in over] == ["jax", "pallas"]
    assert all("sampled pass rate (8 per question) end - start +" in line for line in over)
    ends = {arm: [cmp.sampled_rate(r.sampled) for r in rs] for arm, rs in runs.items()}
    reference = st.ttest_rel(ends["pallas"], ends["jax"])
    assert result.method.metric == "end sampled pass rate" and result.method.design == "paired by seed"
    assert result.method.p_difference == pytest.approx(reference.pvalue, rel=1e-10)
    assert "mean end sampled pass rate B - A" in result.method_line()

    # the over-runs lines are claims about the method: grouped with it, not with these trajectories
    groups = dict(cmp.grouped_verdicts(result.summary_lines(), result.trajectory_lines()))
    assert set(over) <= set(groups[cmp.METHOD_HEADING])
    assert set(per_run) <= set(groups[cmp.TRAJECTORY_HEADING])
    as_json = result.to_json()
    assert [o["verdict"] for o in as_json["learning_over_runs"]] == [learning.IMPROVED] * 2
    assert len(as_json["sampled_start_to_end"]) == 6
    assert as_json["method"]["metric"] == "end sampled pass rate"


def test_without_a_sampled_pass_in_every_run_the_method_test_stays_on_greedy_accuracy(tmp_path: Path):
    a = [cmp.load_run(sampled_run(tmp_path, f"a{s}", s, [1] * 20, [6] * 20, "jax")) for s in range(2)]
    plain = tmp_path / "b0"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"seed": 0}))
    (plain / "summary.json").write_text(json.dumps({"eval_full/accuracy": 0.5}))
    (plain / "eval_full.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "correct": i < 10}) + "\n" for i in range(20)))
    result = cmp.compare_runs(a, [cmp.load_run(plain)])
    assert result.method.metric == "end accuracy"


def test_status_shows_the_sampled_pass_rate_beside_greedy_accuracy_when_the_run_has_one():
    from orchestrator.render import accuracy_text

    greedy = {"eval_full_start/accuracy": 0.086, "eval_full/accuracy": 0.184}
    assert accuracy_text(greedy) == "accuracy 0.086 -> 0.184 (full eval sweep, start -> end)"
    both = {**greedy, "eval_full_start/sampled_accuracy": 0.1, "eval_full/sampled_accuracy": 0.118}
    assert accuracy_text(both) == (
        "accuracy 0.086 -> 0.184, sampled pass rate 0.100 -> 0.118 (full eval sweep, start -> end)"
    )


def test_the_plot_adds_the_sampled_pass_rate_when_every_run_sampled(tmp_path: Path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot", reason="plots need the plot extra")
    from orchestrator import plots

    figures: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    runs = [cmp.load_run(sampled_run(tmp_path, f"r{k}", k, [1, 2, 3], [2, 3, 5 + k], "jax"))
            for k in range(3)]
    plots.plot(runs[:2], runs[2], tmp_path / "p.png", labels=("two", "one"))
    *_, sampled_ax = figures[-1].axes
    assert len(figures[-1].axes) == 4 and sampled_ax.get_title().startswith("sampled pass rate")
    # each run a dot: "two" at the end holds (2+3+5)/24 and (2+3+6)/24
    ends = sorted(round(float(y), 4) for c in sampled_ax.collections for x, y in c.get_offsets() if x > 0.5)
    assert ends == sorted(round(v, 4) for v in (10 / 24, 11 / 24, 12 / 24))
    greedy_only = tmp_path / "g"
    greedy_only.mkdir()
    (greedy_only / "summary.json").write_text(json.dumps({"eval_full/accuracy": 0.5}))
    plots.plot(runs[0], cmp.load_run(greedy_only), tmp_path / "q.png")
    assert len(figures[-1].axes) == 3  # not every run sampled: no fourth panel
