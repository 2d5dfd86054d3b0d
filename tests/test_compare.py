"""Compare: exact McNemar against scipy, pairing by question id, side-by-side rows, plots."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

try:  # the reference for the exact test; scipy comes with the trainer extra, not the laptop-only install
    from scipy.stats import binomtest
except ImportError:
    binomtest = None

from orchestrator import compare as cmp
from orchestrator import plots, stats
from orchestrator.errors import UsageError


@pytest.mark.parametrize(
    "only_a,only_b", [(0, 0), (1, 0), (3, 9), (10, 10), (200, 234), (30, 61), (700, 619)]
)
def test_mcnemar_matches_scipy_binomial(only_a: int, only_b: int):
    if binomtest is None:
        pytest.skip("scipy, the reference, is in the trainer extra (pip install -e '.[trainer,dev]')")
    n = only_a + only_b
    expected = 1.0 if n == 0 else binomtest(min(only_a, only_b), n, 0.5).pvalue
    assert cmp.mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def test_paired_test_counts_and_verdicts():
    a = {f"q{i}": i % 2 == 0 for i in range(100)}
    same = cmp.paired_test(a, dict(a))
    assert (same.only_a, same.only_b, same.p_value, same.verdict) == (0, 0, 1.0, cmp.NO_DETECTABLE_DIFFERENCE)
    b = {k: True for k in a} | {"extra": False}  # B fixes every odd question; "extra" is unpaired
    diff = cmp.paired_test(a, b)
    assert (diff.n, diff.both, diff.only_a, diff.only_b, diff.neither) == (100, 50, 0, 50, 0)
    assert diff.verdict == cmp.POLICIES_DIFFER and diff.p_value < 1e-10
    assert diff.accuracy_a == 0.5 and diff.accuracy_b == 1.0
    assert cmp.POLICIES_DIFFER in diff.line() and "100 paired" in diff.line()


def test_side_by_side_defaults_to_sop_keys_and_deltas():
    a = {"eval_full/accuracy": 0.78, "time/eval_full/step_s": 90.0, "run_id": "a", "other": 1}
    b = {"eval_full/accuracy": 0.80, "time/eval_full/step_s": 110.0, "run_id": "b"}
    rows = cmp.side_by_side(a, b)
    assert [r.key for r in rows] == ["eval_full/accuracy", "time/eval_full/step_s"]
    assert rows[0].delta == pytest.approx(0.02) and rows[1].delta == pytest.approx(20.0)
    custom = cmp.side_by_side(a, b, ["other", "run_id"])
    assert custom[0].delta is None and cmp.fmt_delta(custom[1]) == "-"


def _write_run(folder: Path, summary: dict, correct: list[bool] | None, rewards: list[float]) -> Path:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    if correct is not None:
        rows = [{"id": i, "answer": "1", "prediction": "1", "correct": c} for i, c in enumerate(correct)]
        (folder / "eval_full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "train/reward/total/mean": r, "loss": -r}) + "\n"
            for s, r in enumerate(rewards, 1)
        )
    )
    return folder


def test_compare_runs_markdown_and_plot(tmp_path: Path):
    a = cmp.load_run(_write_run(tmp_path / "A", {"eval_full/accuracy": 0.5}, [True, False] * 20, [0.1, 0.5]))
    b = cmp.load_run(_write_run(tmp_path / "B", {"eval_full/accuracy": 0.55}, [True, True] * 20, [0.2, 0.7]))
    result = cmp.compare_runs(a, b)
    assert result.paired is not None and result.paired.only_b == 20
    assert result.paired.verdict == cmp.POLICIES_DIFFER
    assert result.verdict == "inconclusive"  # one run per arm: never a method verdict
    md = result.markdown()
    assert "| `eval_full/accuracy` | 0.5 | 0.55 | +0.05 |" in md
    assert result.to_json()["mcnemar"]["only_b"] == 20
    (tmp_path / "plots").mkdir()  # plot() never creates folders (see check_plot_path)
    if importlib.util.find_spec("matplotlib") is None:  # the plot extra is absent: one line says so
        with pytest.raises(UsageError, match=r"pip install 'grpoctl\[plot\]'"):
            plots.plot(a, b, tmp_path / "plots" / "ab.png")
        return
    png = plots.plot(a, b, tmp_path / "plots" / "ab.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

def test_compare_without_eval_files_has_no_test(tmp_path: Path):
    a = cmp.load_run(_write_run(tmp_path / "A", {"eval/reward/total/mean": 1.0}, None, [0.1]))
    b = cmp.load_run(_write_run(tmp_path / "B", {"eval/reward/total/mean": 1.5}, [True], [0.2]))
    result = cmp.compare_runs(a, b)
    assert result.paired is None and result.pairs == []
    assert "no McNemar test" in result.markdown()
    assert result.verdict == "inconclusive" and result.method.n_a == 0  # A has no end accuracy at all


@pytest.mark.parametrize("dry", ["A", "B"])
def test_a_dry_run_on_either_side_marks_the_whole_comparison_fabricated(tmp_path: Path, dry: str):
    runs = {
        name: cmp.load_run(_write_run(tmp_path / name, {"eval_full/accuracy": 0.5, "dry_run": name == dry},
                                      [True, False] * 4, [0.1, 0.5]))
        for name in ("A", "B")
    }
    result = cmp.compare_runs(runs["A"], runs["B"])
    assert result.fabricated and result.to_json()["fabricated"] is True
    assert result.details_markdown().startswith(f"**{cmp.FABRICATED}**")
    assert all(line.startswith(cmp.FABRICATED) for line in result.summary_lines())
    assert len(result.summary_lines()) == 4  # start -> end x2, method, McNemar


def test_wandb_summary_is_read_when_present(tmp_path: Path):
    folder = _write_run(tmp_path / "A", {"eval_full/accuracy": 0.5}, None, [0.1])
    (folder / "wandb-summary.json").write_text(json.dumps({"eval_full/accuracy": 0.4, "wandb_only": 3}))
    run = cmp.load_run(folder)
    assert run.summary == {"eval_full/accuracy": 0.5, "wandb_only": 3}  # our summary wins on shared keys


def test_load_run_errors_are_one_line(tmp_path: Path):
    with pytest.raises(UsageError, match="no summary.json"):
        cmp.load_run(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        cmp.load_run(tmp_path)


def _write_start(folder: Path, correct: list[bool]) -> None:
    rows = [{"id": i, "answer": "1", "prediction": "1", "correct": c} for i, c in enumerate(correct)]
    (folder / "eval_full_start.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


NO_CHANGE = "no detectable change at 5%"


@pytest.mark.parametrize(
    ("start", "end", "verdict", "gained", "lost"),
    [
        ([False] * 30 + [True] * 10, [True] * 40, "improved at 5%", 30, 0),
        ([True] * 40, [True] * 30 + [False] * 10, "worse at 5%", 0, 10),
        ([True, False] * 20, [False, True] * 20, NO_CHANGE, 20, 20),  # as many gained as lost
        ([False] * 36 + [True] * 4, [True] * 4 + [False] * 36, NO_CHANGE, 4, 4),
        ([False] * 35 + [True] * 5, [True] * 5 + [True] * 3 + [False] * 32, NO_CHANGE, 8, 5),  # p>.05
    ],
)
def test_each_run_is_paired_with_its_own_start(tmp_path: Path, start, end, verdict, gained, lost):
    """Start -> end per run: eval_full_start.jsonl vs eval_full.jsonl of the SAME run, exact McNemar."""
    a_dir = _write_run(tmp_path / "A", {"eval_full/accuracy": 0.5}, end, [0.1])
    _write_start(a_dir, start)
    b_dir = _write_run(tmp_path / "B", {"eval_full/accuracy": 0.5}, [True] * 40, [0.1])  # no start sweep
    result = cmp.compare_runs(cmp.load_run(a_dir), cmp.load_run(b_dir))
    [learned] = result.learning
    assert (learned.run_id, learned.verdict) == ("A", verdict)
    assert (learned.paired.only_b, learned.paired.only_a) == (gained, lost)
    assert learned.paired.accuracy_a == pytest.approx(sum(start) / 40)
    assert learned.paired.accuracy_b == pytest.approx(sum(end) / 40)
    assert learned.paired.p_value == cmp.mcnemar_exact_p(lost, gained)
    line_a, line_b = result.learning_lines()
    assert line_a.startswith(f"A: start {sum(start) / 40:.3f} -> end {sum(end) / 40:.3f} on 40 paired")
    assert line_a.endswith(f"-> {verdict}") and "no eval_full_start.jsonl" in line_b
    md = result.markdown()
    assert line_a in md and line_b in md and result.paired.line() in md  # both verdicts in the report
    assert result.to_json()["start_to_end"][0]["verdict"] == verdict


def _paired(only_a: int, only_b: int, both: int = 7, neither: int = 5) -> cmp.PairedResult:
    a, b = {}, {}
    for kind, (ra, rb), count in (
        ("ab", (True, True), both), ("a", (True, False), only_a),
        ("b", (False, True), only_b), ("n", (False, False), neither),
    ):
        for i in range(count):
            a[f"{kind}{i}"], b[f"{kind}{i}"] = ra, rb
    return cmp.paired_test(a, b)


# Discordant counts whose exact p-values sit just either side of the 5% level (checked against scipy), so
# a level moved either way (0.5, 0.01) or a comparison turned around flips one of the verdicts.
@pytest.mark.parametrize(
    ("only_a", "only_b", "p", "verdict"),
    [
        (25, 42, 0.049800114, cmp.POLICIES_DIFFER),
        (117, 150, 0.049983176, cmp.POLICIES_DIFFER),
        (10, 22, 0.050102460, cmp.NO_DETECTABLE_DIFFERENCE),
        (33, 52, 0.050250895, cmp.NO_DETECTABLE_DIFFERENCE),
    ],
)
def test_verdict_flips_exactly_at_the_5_percent_level(only_a: int, only_b: int, p: float, verdict: str):
    if binomtest is not None:  # the level's neighbours are the real binomial p-values
        assert binomtest(only_a, only_a + only_b, 0.5).pvalue == pytest.approx(p, rel=1e-8)
    for a, b in ((only_a, only_b), (only_b, only_a)):  # the test is two-sided: symmetric in A and B
        result = _paired(a, b)
        assert (result.only_a, result.only_b, result.n) == (a, b, a + b + 12)
        assert result.p_value == pytest.approx(p, rel=1e-8)
        assert result.verdict == verdict
        assert result.line().endswith(f"-> {verdict}")


def test_report_json_and_markdown_are_exact():
    rows = cmp.side_by_side({"eval_full/accuracy": 0.5, "time/train/step_avg_last10_s": 12},
                            {"eval_full/accuracy": 0.75})
    paired = _paired(1, 9, both=3, neither=2)
    result = cmp.Comparison("runA", "runB", rows, [cmp.SeedPair("runA", "runB", None, paired)],
                            runs_a=["runA"], runs_b=["runB"])
    assert result.paired is paired and paired.verdict == cmp.POLICIES_DIFFER
    as_json = result.to_json()
    assert as_json["keys"] == [
        {"key": "eval_full/accuracy", "a": 0.5, "b": 0.75, "delta": 0.25},
        {"key": "time/train/step_avg_last10_s", "a": 12, "b": None, "delta": None},
    ]
    assert as_json["mcnemar"] == {"a": "runA", "b": "runB", "seed": None, "n": 15, "only_a": 1, "only_b": 9,
                                  "p_value": pytest.approx(0.021484375), "verdict": cmp.POLICIES_DIFFER}
    assert as_json["start_to_end"] == [] and as_json["method_verdict"] is None  # no method test given
    assert result.details_markdown().splitlines() == [
        "| key | A `runA` (run) | B `runB` (run) | delta (B - A) |",
        "|---|---|---|---|",
        "| `eval_full/accuracy` | 0.5 | 0.75 | +0.25 |",
        "| `time/train/step_avg_last10_s` | 12 | - | - |",
    ]
    assert result.summary_lines() == [
        "runA: no eval_full_start.jsonl (eval_full_at_start off): no start -> end test",
        "runB: no eval_full_start.jsonl (eval_full_at_start off): no start -> end test",
        "runA vs runB: McNemar exact test on 15 paired questions: A-only 1, B-only 9, p=0.0215 -> "
        + cmp.POLICIES_DIFFER,
    ]
    assert paired.accuracy_a == pytest.approx(4 / 15) and paired.accuracy_b == pytest.approx(12 / 15)
    alone = cmp.Comparison("runA", "runB", rows[:1], [])
    assert alone.paired is None and alone.to_json()["mcnemar"] is None
    assert alone.summary_lines()[-1] == (
        "No paired per-question results (eval_full.jsonl) in both arms: no McNemar test."
    )

def test_formatting_and_fallback_keys():
    assert [cmp.fmt(x) for x in (None, 3, 1234567, 0.1234567891, True, "x", 1e-9)] == [
        "-", "3", "1234567", "0.123457", "True", "x", "1e-09"  # integers (token counts) exactly
    ]
    assert cmp.fmt_delta(cmp.KeyRow("k", 1.0, 0.5)) == "-0.5"
    assert cmp.KeyRow("k", True, 1.0).delta is None and cmp.KeyRow("k", 1, "2").delta is None
    assert cmp.KeyRow("k", 2, 5).delta == 3.0
    # No SOP key in either run: every key that is a number in at least one run, sorted; not bools/strings.
    a = {"zeta": 1.0, "alpha": "text", "flag": True, "beta": 2}
    b = {"gamma": 0.5, "alpha": "other"}
    assert [r.key for r in cmp.side_by_side(a, b)] == ["beta", "gamma", "zeta"]
    assert cmp.side_by_side({}, {}) == []
    empty = cmp.paired_test({}, {"q": True})
    assert (empty.n, empty.p_value, empty.verdict) == (0, 1.0, cmp.NO_DETECTABLE_DIFFERENCE)
    assert math.isnan(empty.accuracy_a) and math.isnan(empty.accuracy_b)


def test_run_files_are_read_strictly(tmp_path: Path):
    folder = tmp_path / "run-7"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"k": 1}))
    (folder / "eval_full.jsonl").write_text(
        '{"id": 3, "correct": true}\n\n{"id": "q4", "correct": false}\n'
    )
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"loss": 9}\n{"step": 2, "loss": "x"}\n'
                                          '{"step": 3, "train/loss": 1.5, "loss": 0.25}\n')
    run = cmp.load_run(folder)
    assert run.run_id == "run-7" and run.summary == {"k": 1}
    assert run.eval_full == {"3": True, "q4": False}
    assert plots._series(run.metrics, ("nope", "loss", "train/loss")) == ("loss", [1, 3], [0.5, 0.25])
    assert plots._series(run.metrics, ("nope",)) is None
    (folder / "eval_full.jsonl").write_text('{"id": 1, "correct": true}\n{broken\n')
    with pytest.raises(UsageError, match=r"eval_full.jsonl:2: not valid JSON"):
        cmp.load_run(folder)
    (folder / "summary.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="expected a JSON object"):
        cmp.load_run(folder)
    (folder / "summary.json").unlink()
    with pytest.raises(UsageError, match=r"no summary.json \(fetch the run first: grpoctl fetch run-7"):
        cmp.load_run(folder)


@pytest.fixture
def closed_figures(monkeypatch) -> list:
    """The figures plot() closes: what it drew, to inspect (the plot extra; skipped without it)."""
    plt = pytest.importorskip("matplotlib.pyplot", reason="plots need the plot extra")

    figures: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    return figures


def test_plot_draws_both_runs_labelled_and_says_when_a_panel_has_no_data(tmp_path: Path, closed_figures):
    a = cmp.load_run(_write_run(tmp_path / "A", {"k": 1}, None, [0.1, 0.5]))
    b = cmp.load_run(_write_run(tmp_path / "B", {"k": 1}, None, [0.2]))
    (tmp_path / "B" / "metrics.jsonl").write_text('{"step": 1, "reward": 0.3}\n')
    b = cmp.load_run(tmp_path / "B")
    (tmp_path / "plots").mkdir()
    out = plots.plot(a, b, tmp_path / "plots" / "ab.png")
    plots.plot(a, b, out)  # drawing over an earlier plot is fine
    (fig,) = closed_figures[-1:]
    reward_ax, loss_ax, accuracy_ax = fig.axes
    assert (reward_ax.get_title(), loss_ax.get_title()) == ("reward", "loss")
    assert accuracy_ax.get_title() == "greedy accuracy (95% interval)"
    assert reward_ax.get_xlabel() == loss_ax.get_xlabel() == "step"
    assert [t.get_text() for t in reward_ax.get_legend().get_texts()] == [
        "A (train/reward/total/mean)", "B (reward)"
    ]
    assert [line.get_linestyle() for line in reward_ax.get_lines()] == ["-", "--"]
    assert [list(line.get_xdata()) for line in reward_ax.get_lines()] == [[1, 2], [1]]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["A (loss)"]
    assert [t.get_text() for t in accuracy_ax.texts] == ["no eval_full accuracy"]  # no sweeps in either
    assert not fig.texts  # a real run's plot carries no watermark
    # No loss at all in either run: the panel says so, centred in axes coordinates.
    (tmp_path / "A" / "metrics.jsonl").write_text('{"step": 1, "reward": 0.3}\n')
    plots.plot(cmp.load_run(tmp_path / "A"), b, tmp_path / "plots" / "none.png")
    empty_loss = closed_figures[-1].axes[1]
    (note,) = empty_loss.texts
    assert note.get_text() == "no data in metrics.jsonl" and note.get_position() == (0.5, 0.5)
    assert note.get_transform() is empty_loss.transAxes and note.get_ha() == "center"
    assert empty_loss.get_legend() is None


def test_plot_of_seed_groups_draws_each_seed_and_the_mean_and_intervals(tmp_path: Path, closed_figures):
    def run(name: str, rewards: list[float], start: list[bool], end: list[bool], dry: bool = False):
        folder = _write_run(tmp_path / name, {"dry_run": dry}, end, rewards)
        _write_start(folder, start)
        return cmp.load_run(folder)

    a = [run("a0", [0.1, 0.3], [True] * 2 + [False] * 8, [True] * 4 + [False] * 6),
         run("a1", [0.3, 0.5], [True] * 2 + [False] * 8, [True] * 6 + [False] * 4)]
    b = [run("b0", [0.2, 0.2, 0.9], [True] * 2 + [False] * 8, [True] * 2 + [False] * 8)]
    (tmp_path / "p").mkdir()
    plots.plot(a, b, tmp_path / "p" / "g.png", labels=("jax", "pallas"), names={"a0": "jax/s0"})
    reward_ax, _, accuracy_ax = closed_figures[-1].axes
    lines = reward_ax.get_lines()
    assert [line.get_label() for line in lines] == [
        "jax/s0 (train/reward/total/mean)",  # an SOP's name for the run
        "a1 (train/reward/total/mean)",
        "jax: mean of 2",
        "b0 (train/reward/total/mean)",  # one run: no mean line of its own
    ]
    assert list(lines[2].get_ydata()) == pytest.approx([0.2, 0.4]) and lines[2].get_linewidth() > 2
    assert lines[0].get_alpha() == 0.35 and lines[3].get_alpha() == 1.0
    # Accuracy panel: jax's end is the mean of 0.4 and 0.6 with a t interval over the two runs.
    st = pytest.importorskip("scipy.stats", reason="the intervals need the stats extra")

    low, high = st.ttest_1samp([0.4, 0.6], 0).confidence_interval(0.95)
    bars = [c for c in accuracy_ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
    jax_end = [c for c in bars if c.lines[0].get_xdata()[0] == pytest.approx(1 - 0.08)]
    (segment,) = jax_end[0].lines[2][0].get_segments()
    assert [y for _, y in segment] == pytest.approx([low, high])
    assert [t.get_text() for t in accuracy_ax.get_legend().get_texts()] == ["jax", "pallas"]
    assert not closed_figures[-1].texts
    fake = [run("d0", [0.1], [True], [True], dry=True)]
    plots.plot(fake, b, tmp_path / "p" / "d.png")
    (mark,) = closed_figures[-1].texts
    assert mark.get_text() == "FABRICATED by --dry-run" and mark.get_color() == "red"

def test_a_plot_path_without_an_image_suffix_is_refused_naming_the_suffixes(tmp_path: Path):
    with pytest.raises(UsageError, match=r"p\.txt.*\.png"):
        plots.check_plot_path(tmp_path / "p.txt")
    assert not (tmp_path / "p.txt").exists()


def test_docs_state_each_verdict_in_the_words_the_code_prints():
    """docs/verdicts.md quotes the verdicts: a wording changed in the code (compare, stats) fails here until
    the doc says it too."""
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "verdicts.md").read_text().split())
    for words in (cmp.POLICIES_DIFFER, cmp.NO_DETECTABLE_DIFFERENCE, cmp.IMPROVED, cmp.NO_CHANGE, cmp.WORSE):
        assert words in doc, words
    for verdict in stats.VERDICTS:
        assert f"- `{verdict}`: " in doc, verdict
