"""The reward parser and reward functions, table-driven; malformed completions score 0 and never raise."""

from __future__ import annotations

import random

import numpy as np
import pytest

from trainer.rewards import (
    REWARD_FUNCS,
    RewardWeights,
    extract_answer,
    format_number,
    gold_answer,
    last_number,
    reward_correct,
    reward_format,
    reward_tag_count,
    score_completions,
)

GOOD = "<think>3 + 4 = 7</think>\n<answer>7</answer>"

# (text, last number). Rows marked "reference bug" are ones the reference parser got wrong.
LAST_NUMBER_ROWS = [
    ("42", 42.0),
    ("-5", -5.0),  # reference bug: minus dropped
    ("the answer is -12 degrees", -12.0),  # reference bug
    ("\u22128", -8.0),  # unicode minus sign
    ("(-3)", -3.0),
    ("x = -7.5", -7.5),
    ("10-5", 5.0),  # a subtraction, not a negative number
    ("12 - 5 = 7", 7.0),
    ("1,234", 1234.0),  # reference bug: read as 234
    ("1,234,567 people", 1234567.0),
    ("$1,234.50", 1234.5),
    ("-$5", -5.0),
    ("costs $18 in total", 18.0),
    ("3.14159", 3.14159),
    (".5", 0.5),
    ("3/4", 0.75),
    ("-1/2 cup", -0.5),
    ("12/0", None),  # division by zero is no number
    ("-0", 0.0),
    ("7.", 7.0),  # sentence full stop
    ("50%", 50.0),
    ("5kg and 3m", 3.0),
    ("1,2345", 2345.0),  # not a thousands group: 1 then 2345
    ("1, 2, 3", 3.0),  # a list, not thousands
    ("007", 7.0),
    ("9" * 400, None),  # does not fit a float
    ("abc", None),
    ("", None),
    (None, None),
    (12, None),  # only text is parsed
]


@pytest.mark.parametrize(("text", "expected"), LAST_NUMBER_ROWS)
def test_last_number(text: object, expected: float | None) -> None:
    got = last_number(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def _c(answer: str, think: str = "x") -> str:
    """A well-formed completion whose answer block holds `answer`."""
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# (completion, gold answer, strict, lenient). The strict grader is the default: the answer block alone,
# one committed value. The lenient one is the reference's (last number, answer block first).
CORRECT_ROWS = [
    (GOOD, "#### 7", 1.0, 1.0),
    (GOOD, "Tom has 3 + 4 = 7 apples.\n#### 7", 1.0, 1.0),
    (GOOD, "7", 1.0, 1.0),
    (GOOD, 7, 1.0, 1.0),
    (GOOD, 7.0, 1.0, 1.0),
    (GOOD, "#### 8", 0.0, 0.0),
    (_c("-4", "5 - 9"), "#### -4", 1.0, 1.0),
    (_c("-4", "5 - 9"), "#### 4", 0.0, 0.0),  # reference bug: matched 4
    (_c("\u22124"), "#### -4", 1.0, 1.0),  # unicode minus
    (_c("1,234"), "#### 1234", 1.0, 1.0),  # reference bug: read 234
    (_c("1234"), "#### 1,234", 1.0, 1.0),
    (_c("1,234,567 people"), "#### 1234567", 1.0, 1.0),
    # Currency, units, percent, trailing zeros, an equation's result.
    (_c("$1,234.00"), "#### 1234", 1.0, 1.0),
    (_c("-$5"), "#### -5", 1.0, 1.0),
    (_c("18 dollars"), "#### 18", 1.0, 1.0),
    (_c("\\$18"), "#### 18", 1.0, 1.0),
    (_c("72 clips"), "#### 72", 1.0, 1.0),
    (_c("5 hours."), "#### 5", 1.0, 1.0),
    (_c("60 km/h"), "#### 60", 1.0, 1.0),
    (_c("25%"), "#### 25", 1.0, 1.0),
    (_c("12.50"), "#### 12.5", 1.0, 1.0),
    (_c("7.0"), "#### 7", 1.0, 1.0),
    (_c("7.0000001"), "#### 7", 1.0, 1.0),  # numeric tolerance
    (_c("7.01"), "#### 7", 0.0, 0.0),
    (_c("-0"), "#### 0", 1.0, 1.0),
    (_c("The total is 3 + 4 = 7"), "#### 7", 1.0, 1.0),
    (_c("x = 3 + 4 = 7"), "#### 7", 1.0, 1.0),  # a chain of equations commits to its last result
    (_c("**18**"), "#### 18", 1.0, 1.0),  # markdown bold
    (_c("The answer is 18."), "#### 18", 1.0, 1.0),
    (_c("18 (18 dollars)"), "#### 18", 1.0, 1.0),  # one value, written twice
    # Fractions and LaTeX.
    (_c("0.5"), "#### 1/2", 1.0, 1.0),
    (_c("3/4"), "#### 0.75", 1.0, 1.0),
    (_c("0.3333333"), "#### 1/3", 1.0, 1.0),  # within 1e-6
    (_c("0.333"), "#### 1/3", 0.0, 0.0),  # but not a rough rounding
    (_c("\\boxed{18}"), "#### 18", 1.0, 1.0),
    (_c("$\\boxed{1{,}234}$"), "#### 1234", 1.0, 0.0),  # the lenient parser reads 234
    (_c("\\boxed{\\frac{3}{4}}"), "#### 0.75", 1.0, 0.0),  # lenient: last number 4
    (_c("\\dfrac{9}{2}"), "#### 4.5", 1.0, 0.0),
    (_c("\\frac{-3}{4}"), "#### -0.75", 1.0, 0.0),
    (_c("\\text{18 dollars}"), "#### 18", 1.0, 1.0),
    (_c("1\\,234"), "#### 1234", 1.0, 0.0),  # LaTeX thin space as thousands separator
    (_c("\\boxed{18"), "#### 18", 0.0, 1.0),  # unclosed box: no committed value
    # Not committed: hedges, ranges, several values.
    (_c("72 or 73"), "#### 73", 0.0, 1.0),
    (_c("either 72 or 73"), "#### 72", 0.0, 0.0),
    (_c("10-12"), "#### 12", 0.0, 1.0),
    (_c("10 to 12"), "#### 12", 0.0, 1.0),
    (_c("between 10 and 12"), "#### 12", 0.0, 1.0),
    (_c("72 clips (24 in May)"), "#### 72", 0.0, 0.0),  # lenient reads 24
    (_c("72 clips (24 in May)"), "#### 24", 0.0, 1.0),
    (_c("about 72"), "#### 72", 0.0, 1.0),
    (_c("approximately 72"), "#### 72", 0.0, 1.0),
    (_c("~72"), "#### 72", 0.0, 1.0),
    (_c("72?"), "#### 72", 0.0, 1.0),
    (_c("at least 72"), "#### 72", 0.0, 1.0),
    (_c("maybe 72"), "#### 72", 0.0, 1.0),
    (_c("1, 2, 3"), "#### 3", 0.0, 1.0),
    (_c("\\boxed{72} or \\boxed{73}"), "#### 73", 0.0, 1.0),
    (_c("\\boxed{72}, i.e. \\boxed{72.0}"), "#### 72", 1.0, 1.0),  # boxes that agree
    (_c("\\boxed{72}, then \\boxed{73}"), "#### 72", 0.0, 0.0),  # boxes that disagree: not the first one
    (_c("6 x 3 = \\boxed{18}"), "#### 18", 1.0, 1.0),  # the box, not the working
    (_c("maybe \\boxed{18}"), "#### 18", 0.0, 1.0),  # a hedge outside the box
    # Only the answer block counts: no fallback to numbers elsewhere.
    ("so the answer is 7", "#### 7", 0.0, 1.0),  # no answer block
    ("<think>the answer is 7", "#### 7", 0.0, 1.0),  # truncated mid-thought
    ("<think>3 + 4 = 7</think>\n<answer>7", "#### 7", 0.0, 1.0),  # truncated inside the answer
    (_c("", "3 + 4 = 7"), "#### 7", 0.0, 1.0),  # empty answer block
    (_c("I am not sure", "3 + 4 = 7"), "#### 7", 0.0, 1.0),  # no number in the block
    (_c("seven", "7 apples"), "#### 7", 0.0, 1.0),  # number words are not read
    ("<think>2+5</think>\n<answer>7</answer> then 9", "#### 7", 1.0, 1.0),  # text after the block
    ("<think>2+5</think>\n<answer>7</answer> then 9", "#### 9", 0.0, 0.0),
    ("<answer>3</answer><answer>7</answer>", "#### 7", 0.0, 1.0),  # two blocks that disagree
    ("<answer>7</answer><answer>3</answer>", "#### 7", 0.0, 0.0),  # ... whichever of them is right
    ("<answer>7</answer><answer>7.0</answer>", "#### 7", 1.0, 1.0),  # two blocks that agree
    # Garbage in, 0 out, never an exception.
    (_c("12/0"), "#### 12", 0.0, 0.0),  # 12/0 is no number
    ("<think>x</think>\n<answer>", "#### 7", 0.0, 0.0),
    ("", "#### 7", 0.0, 0.0),
    (None, "#### 7", 0.0, 0.0),
    (b"<answer>7</answer>", "#### 7", 0.0, 0.0),
    ("<answer>" + "9" * 5000 + "</answer>", "#### 7", 0.0, 0.0),
    (GOOD, None, 0.0, 0.0),  # no gold answer never matches
    (GOOD, "#### unknown", 0.0, 0.0),
    (GOOD, True, 0.0, 0.0),
    (GOOD, float("nan"), 0.0, 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "strict", "lenient"), CORRECT_ROWS)
def test_reward_correct(completion: object, gold: object, strict: float, lenient: float) -> None:
    assert reward_correct(completion, gold) == strict  # strict is the default
    assert reward_correct(completion, gold, "strict") == strict
    assert reward_correct(completion, gold, "lenient") == lenient


def test_the_table_is_large_and_the_graders_disagree_where_it_matters() -> None:
    assert len(CORRECT_ROWS) >= 40
    assert sum(row[2] != row[3] for row in CORRECT_ROWS) >= 20


def test_unknown_grader_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown grader"):
        reward_correct(GOOD, "7", "generous")  # type: ignore[arg-type]


FORMAT_ROWS = [
    (GOOD, 1.0, 1.0),
    ("<think>\nreason\n</think>\n<answer>\n7\n</answer>", 1.0, 1.0),
    ("  <think>a</think>  \n  <answer>7</answer>\n", 1.0, 1.0),  # surrounding whitespace is fine
    ("<think></think>\n<answer>7</answer>", 1.0, 1.0),  # empty reasoning still has the layout
    ("<think>a</think><answer>7</answer>", 0.0, 1.0),  # no line break between the blocks
    ("<think>a</think>\n<answer> </answer>", 0.0, 1.0),  # empty answer
    ("<think>a</think>\n<answer>7</answer> extra", 0.0, 1.0),  # text after the answer
    ("preamble <think>a</think>\n<answer>7</answer>", 0.0, 1.0),
    ("<answer>7</answer>\n<think>a</think>", 0.0, 1.0),  # wrong order
    ("<think>a</think>\n<answer>7</answer>\n<answer>8</answer>", 0.0, 0.5),  # tag twice
    ("<think>a<think>b</think>\n<answer>7</answer>", 0.0, 0.75),
    ("<think>a</think>\n<answer>7", 0.0, 0.75),  # truncated
    ("<think>a", 0.0, 0.25),
    ("</think></answer>", 0.0, 0.5),
    ("7", 0.0, 0.0),
    ("", 0.0, 0.0),
    (None, 0.0, 0.0),
    (["<think>"], 0.0, 0.0),
]


@pytest.mark.parametrize(("completion", "fmt", "tags"), FORMAT_ROWS)
def test_format_and_tag_count(completion: object, fmt: float, tags: float) -> None:
    assert reward_format(completion) == fmt
    assert reward_tag_count(completion) == tags


def test_extract_answer_and_gold() -> None:
    assert extract_answer("<think>1</think>\n<answer>-3</answer>") == -3.0
    assert extract_answer("no digits") is None
    assert extract_answer("7", "lenient") == 7.0 and extract_answer("7") is None
    assert gold_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == 72.0  # only the text after ####
    assert gold_answer("#### -1,000") == -1000.0
    assert gold_answer(np.int64(5)) == 5.0
    assert format_number(extract_answer("<answer>-0</answer>")) == "0"
    assert format_number(2.5) == "2.5"
    assert format_number(None) is None


def test_batch_scores_weighted_total_and_metric_names() -> None:
    completions = [GOOD, "<think>a</think>\n<answer>8</answer>", "7", None, "<think>"]
    answers = ["#### 7"] * len(completions)
    lenient = score_completions(completions, answers, RewardWeights(), "lenient")
    np.testing.assert_allclose(lenient.per_func["reward_correct"], [1, 0, 1, 0, 0])
    batch = score_completions(completions, answers, RewardWeights())  # strict: "7" has no answer block
    np.testing.assert_allclose(batch.per_func["reward_correct"], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(batch.per_func["reward_format"], [1, 1, 0, 0, 0])
    np.testing.assert_allclose(batch.per_func["reward_tag_count"], [1, 1, 0, 0, 0.25])
    np.testing.assert_allclose(batch.total, [2.0, 1.0, 0.0, 0.0, 0.125])
    assert batch.total.dtype == np.float32 and batch.total.shape == (5,)
    metrics = batch.metrics()
    assert set(metrics) == {f"reward/func/{name}/mean" for name in REWARD_FUNCS} | {
        "reward/total/mean", "reward/total/std"}
    assert metrics["reward/func/reward_correct/mean"] == pytest.approx(0.2)
    assert metrics["reward/total/mean"] == pytest.approx(3.125 / 5)
    assert RewardWeights().max_total == 2.0


def test_weights_change_the_total() -> None:
    weights = RewardWeights.from_config({"correct": 2.0, "format": 0.0, "reward_tag_count": 1.0})
    batch = score_completions([GOOD, "<answer>7</answer>"], ["7", "7"], weights)
    np.testing.assert_allclose(batch.total, [3.0, 2.5])
    assert RewardWeights.from_config([1.0, 0.5, 0.5]) == RewardWeights()
    assert RewardWeights.from_config(None) == RewardWeights()


@pytest.mark.parametrize("bad", [{"speed": 1.0}, [1.0, 2.0]])
def test_bad_weights_name_the_key(bad: object) -> None:
    with pytest.raises(ValueError, match="reward_weights"):
        RewardWeights.from_config(bad)  # type: ignore[arg-type]


def test_batch_length_mismatch_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score_completions([GOOD, GOOD], ["7"])


def test_random_garbage_scores_within_bounds_and_never_raises() -> None:
    rng = random.Random(0)
    alphabet = ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "-", ",", ".", "/", "$", "9", "0",
                "a", "\u2212", "<", ">", "####", "1,000", "\x00", "\U0001f600"]
    completions = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(400)]
    batch = score_completions(completions, ["#### 9"] * len(completions))
    assert np.all((batch.total >= 0) & (batch.total <= RewardWeights().max_total))
    for name in REWARD_FUNCS:
        assert set(np.unique(batch.per_func[name])) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    # Garbage occasionally hits the layout by chance; the format reward must then agree with the tags.
    assert np.all(batch.per_func["reward_format"] <= batch.per_func["reward_tag_count"])


# The full layout with exactly one tag missing or misspelt: none of these has the format, whichever tag
# it is (a grader that forgot to require `</think>` accepted the first ones).
@pytest.mark.parametrize(
    "completion",
    [
        "<think>a\n<answer>7</answer>",  # no </think>
        "<think>a\n\n<answer>7</answer>",
        "<think>a</thin>\n<answer>7</answer>",
        "<think>a<think>\n<answer>7</answer>",  # <think> twice, </think> never
        "a</think>\n<answer>7</answer>",  # no <think>
        "<think>a</think>\n7</answer>",  # no <answer>
        "<think>a</think>\n<answer>7",  # no </answer>
        "<think>a</think>\n<answer>7</answer></think>",  # </think> twice
    ],
)
def test_format_needs_every_tag_exactly_once(completion: str) -> None:
    assert reward_format(completion) == 0.0
    assert reward_tag_count(completion) < 1.0
    # ...and the batch total gives it no format credit either.
    batch = score_completions([completion], ["7"])
    assert batch.per_func["reward_format"][0] == 0.0


def test_weights_config_forms_and_errors_are_exact() -> None:
    w = RewardWeights(2.0, 0.0, 1.5)
    assert RewardWeights.from_config(w) is w
    assert RewardWeights.from_config((2, 0, 1.5)) == w
    assert RewardWeights.from_config({"reward_correct": 2, "tag_count": 1.5, "format": 0}) == w
    assert RewardWeights.from_config({"format": 0.25}) == RewardWeights(1.0, 0.25, 0.5)  # others default
    assert w.as_dict() == {"reward_correct": 2.0, "reward_format": 0.0, "reward_tag_count": 1.5}
    assert w.max_total == 3.5
    with pytest.raises(ValueError, match=r"^reward_weights: unknown reward 'speed' \(known: reward_correct, "
                                         r"reward_format, reward_tag_count\)$"):
        RewardWeights.from_config({"speed": 1.0})
    with pytest.raises(ValueError, match=r"^reward_weights: expected 3 weights \(reward_correct, "
                                         r"reward_format, reward_tag_count\), got 4$"):
        RewardWeights.from_config([1, 2, 3, 4])


def test_batch_metrics_values_and_empty_batch() -> None:
    batch = score_completions([GOOD, "7", None], ["7", "8", "7"], RewardWeights(1.0, 0.5, 0.5))
    metrics = batch.metrics()
    np.testing.assert_allclose(batch.total, [2.0, 0.0, 0.0])
    assert metrics["reward/total/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/total/std"] == pytest.approx(float(np.std([2.0, 0.0, 0.0])))
    assert metrics["reward/func/reward_format/mean"] == pytest.approx(1 / 3)
    assert metrics["reward/func/reward_tag_count/mean"] == pytest.approx(1 / 3)
    for name in REWARD_FUNCS:
        assert batch.per_func[name].dtype == np.float32 and batch.per_func[name].shape == (3,)
    empty = score_completions([], [])
    assert empty.total.shape == (0,)
    assert empty.metrics() == {**{f"reward/func/{n}/mean": 0.0 for n in REWARD_FUNCS},
                               "reward/total/mean": 0.0, "reward/total/std": 0.0}


def test_format_number_of_large_and_fractional_values() -> None:
    assert format_number(1e15) == "1000000000000000.0"  # beyond exact integers: repr, not a long digit string
    assert format_number(999999999999999.0) == "999999999999999"
    assert format_number(-7.0) == "-7"
    assert format_number(0.1) == "0.1"
