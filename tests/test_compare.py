"""Compare: exact McNemar against scipy, pairing by question id, side-by-side rows, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import binomtest

from orchestrator import compare as cmp
from orchestrator.errors import UsageError


@pytest.mark.parametrize(
    "only_a,only_b", [(0, 0), (1, 0), (3, 9), (10, 10), (200, 234), (30, 61), (700, 619)]
)
def test_mcnemar_matches_scipy_binomial(only_a: int, only_b: int):
    n = only_a + only_b
    expected = 1.0 if n == 0 else binomtest(min(only_a, only_b), n, 0.5).pvalue
    assert cmp.mcnemar_exact_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)


def test_paired_test_counts_and_verdicts():
    a = {f"q{i}": i % 2 == 0 for i in range(100)}
    same = cmp.paired_test(a, dict(a))
    assert (same.only_a, same.only_b, same.p_value, same.verdict) == (0, 0, 1.0, "aligned")
    b = {k: True for k in a} | {"extra": False}  # B fixes every odd question; "extra" is unpaired
    diff = cmp.paired_test(a, b)
    assert (diff.n, diff.both, diff.only_a, diff.only_b, diff.neither) == (100, 50, 0, 50, 0)
    assert diff.verdict == "different at 5%" and diff.p_value < 1e-10
    assert diff.accuracy_a == 0.5 and diff.accuracy_b == 1.0
    assert "different at 5%" in diff.line() and "100 paired" in diff.line()


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
    assert result.verdict == "different at 5%"
    md = result.markdown()
    assert "| `eval_full/accuracy` | 0.5 | 0.55 | +0.05 |" in md
    assert result.to_json()["mcnemar"]["only_b"] == 20
    (tmp_path / "plots").mkdir()  # plot() never creates folders (see check_plot_path)
    png = cmp.plot(a, b, tmp_path / "plots" / "ab.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_compare_without_eval_files_has_no_test(tmp_path: Path):
    a = cmp.load_run(_write_run(tmp_path / "A", {"eval/reward/total/mean": 1.0}, None, [0.1]))
    b = cmp.load_run(_write_run(tmp_path / "B", {"eval/reward/total/mean": 1.5}, [True], [0.2]))
    result = cmp.compare_runs(a, b)
    assert result.paired is None and result.verdict is None
    assert "no significance test" in result.markdown()


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


@pytest.mark.parametrize(
    ("start", "end", "verdict", "gained", "lost"),
    [
        ([False] * 30 + [True] * 10, [True] * 40, "improved at 5%", 30, 0),
        ([True] * 40, [True] * 30 + [False] * 10, "worse at 5%", 0, 10),
        ([True, False] * 20, [False, True] * 20, "no change at 5%", 20, 20),  # as many gained as lost
        ([False] * 36 + [True] * 4, [True] * 4 + [False] * 36, "no change at 5%", 4, 4),
        ([False] * 35 + [True] * 5, [True] * 5 + [True] * 3 + [False] * 32, "no change at 5%", 8, 5),  # p>.05
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
