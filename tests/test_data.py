"""Data sources (local files through the real `datasets`, hub offline, generator) and the resumable order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trainer.data import (
    LEVELS,
    DataError,
    Problem,
    ProblemStream,
    generate_problems,
    load_problems,
)
from trainer.prompts import ideal_completion
from trainer.rewards import RewardWeights, score_completions

TRAIN_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"},
    {"question": "A shop sells 1,000 pens a day for 2 days. How many pens?",
     "answer": "1000*2=2000\n#### 2,000"},
    {"question": "It was 3 degrees and fell by 5. What is the temperature?", "answer": "#### -2"},
]
TEST_ROWS = [{"id": "q-17", "question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"}]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def gsm8k_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gsm8k")
    _write_jsonl(folder / "train.jsonl", TRAIN_ROWS)
    _write_jsonl(folder / "test.jsonl", TEST_ROWS)
    return folder


def test_jsonl_folder_through_datasets(gsm8k_folder: Path) -> None:
    train = load_problems(str(gsm8k_folder), "train")
    assert [p.id for p in train] == ["train-0", "train-1", "train-2"]
    assert train[0].question == TRAIN_ROWS[0]["question"]
    assert train[0].solution == TRAIN_ROWS[0]["answer"]  # the worked solution is kept whole
    assert [p.answer for p in train] == ["72", "2000", "-2"]  # thousands separator removed, sign kept
    assert [p.value for p in train] == [72.0, 2000.0, -2.0]
    test = load_problems(str(gsm8k_folder), "test")
    assert test == [Problem(id="q-17", question=TEST_ROWS[0]["question"], solution="6*7=42\n#### 42",
                            answer="42")]
    assert load_problems(str(gsm8k_folder), "train", size=2) == train[:2]


def test_split_template_and_single_file(gsm8k_folder: Path) -> None:
    by_template = load_problems(str(gsm8k_folder / "{split}.jsonl"), "test")
    assert [p.id for p in by_template] == ["q-17"]
    single = load_problems(str(gsm8k_folder / "train.jsonl"), "test")  # one file serves every split
    assert [p.answer for p in single] == ["72", "2000", "-2"]


def test_parquet_folder_in_hub_layout(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(TRAIN_ROWS).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    problems = load_problems(str(tmp_path), "train")
    assert [p.answer for p in problems] == ["72", "2000", "-2"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "", "answer": "#### 1"}], r"row train-0: needs a non-empty 'question'"),
        ([{"question": "q", "answer": "#### many"}], r"row train-0: answer 'many' is not a number"),
        ([{"answer": "#### 1"}], r"row train-0: needs a non-empty 'question'"),
    ],
)
def test_bad_rows_fail_with_the_row_named(tmp_path: Path, rows: list[dict], message: str) -> None:
    _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_problems(str(tmp_path), "train")


def test_unreadable_file_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\nnot json at all\n')
    with pytest.raises(DataError, match=r"cannot read train") as err:
        load_problems(str(tmp_path), "train")
    assert "\n" not in str(err.value)


def test_missing_sources_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such file or folder") as err:
        load_problems(str(tmp_path / "nope.jsonl"), "train")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"no test.jsonl / test.parquet in the folder"):
        load_problems(str(tmp_path), "test")
    with pytest.raises(DataError, match=r"no file .*validation.jsonl"):
        load_problems(str(tmp_path / "{split}.jsonl"), "validation")


def test_hub_id_offline_fails_fast_with_one_line() -> None:
    # Fast because offline mode is on (the message says so): online, the hub client retries for ~50 s.
    with pytest.raises(DataError) as err:
        load_problems("grpoctl-test/no-such-dataset", "test")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data source grpoctl-test/no-such-dataset: cannot load split 'test'")
    assert "HF_DATASETS_OFFLINE=1" in message


# --------------------------------------------------------------------------------------------- generator

_LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def _check_worked_solution(problem: Problem) -> None:
    *lines, final = problem.solution.split("\n")
    assert final == f"#### {problem.answer}"
    previous = None
    for line in lines:
        x, op, b, y = _LINE.match(line).groups()  # type: ignore[union-attr]
        x, b, y = int(x), int(b), int(y)
        assert y == {"+": x + b, "-": x - b, "*": x * b, "/": x // b}[op]
        assert op != "/" or x % b == 0
        assert previous is None or x == previous  # each step continues from the last result
        previous = y
    assert previous == int(problem.answer)


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_generator_solutions_are_right_and_reward_two(difficulty: int) -> None:
    problems = generate_problems("train", 200, difficulty=difficulty, seed=3)
    level = LEVELS[difficulty]
    for problem in problems:
        _check_worked_solution(problem)
        assert problem.solution.count("\n") == level.steps
        assert all(0 <= int(n) <= level.max_value for n in re.findall(r"\d+", problem.question))
    assert len({p.id for p in problems}) == len({p.question for p in problems}) == 200
    ideal = [ideal_completion(p.solution.rpartition("####")[0].strip(), p.answer) for p in problems]
    batch = score_completions(ideal, [p.solution for p in problems])
    assert batch.total.min() == RewardWeights().max_total


def test_easiest_level_has_single_digit_answers_of_every_value() -> None:
    answers = {p.answer for p in generate_problems("train", 500, difficulty=1)}
    assert answers == {str(d) for d in range(10)}


def test_generator_is_deterministic_and_splits_are_disjoint() -> None:
    first = generate_problems("train", 300, difficulty=2, seed=7)
    assert first == generate_problems("train", 300, difficulty=2, seed=7)
    assert first[:100] == generate_problems("train", 100, difficulty=2, seed=7)  # a prefix of the longer list
    assert first != generate_problems("train", 300, difficulty=2, seed=8)
    test = generate_problems("test", 100, difficulty=1, seed=7)
    train = generate_problems("train", 2000, difficulty=1, seed=7)
    assert not {p.question for p in test} & {p.question for p in train}
    assert load_problems("builtin", "test", size=100, difficulty=1, seed=7) == test


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "train", "size": 5, "difficulty": 9}, "difficulty must be one of"),
    ({"split": "validation", "size": 5}, "split must be 'train' or 'test'"),
])
def test_generator_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        generate_problems(**kwargs)


# ------------------------------------------------------------------------------------------------ order


@pytest.fixture(scope="module")
def ten_problems() -> list[Problem]:
    return generate_problems("train", 10, difficulty=1)


def test_each_epoch_is_a_fresh_permutation(ten_problems: list[Problem]) -> None:
    stream = ProblemStream(ten_problems, seed=0)
    epoch0, epoch1 = stream.next_batch(10), stream.next_batch(10)
    assert sorted(p.id for p in epoch0) == sorted(p.id for p in ten_problems) == sorted(p.id for p in epoch1)
    assert epoch0 != epoch1
    assert stream.state() == {"seed": 0, "epoch": 1, "position": 10, "size": 10}
    assert ProblemStream(ten_problems, seed=0).next_batch(20) == epoch0 + epoch1  # batches cross epochs
    assert ProblemStream(ten_problems, seed=1).next_batch(10) != epoch0


def test_resume_from_state_continues_the_same_order(ten_problems: list[Problem]) -> None:
    stream = ProblemStream(ten_problems, seed=5)
    stream.next_batch(7)
    saved = json.loads(json.dumps(stream.state()))  # the checkpoint stores it as JSON
    expected = [stream.next_batch(7) for _ in range(3)]
    resumed = ProblemStream(ten_problems, seed=5, state=saved)
    assert [resumed.next_batch(7) for _ in range(3)] == expected


@pytest.mark.parametrize("state", [
    {"seed": 5, "epoch": 0, "position": 3, "size": 11},
    {"seed": 6, "epoch": 0, "position": 3, "size": 10},
    {"seed": 5, "epoch": 0, "position": 12, "size": 10},
])
def test_resume_refuses_a_state_of_other_data(ten_problems: list[Problem], state: dict) -> None:
    with pytest.raises(DataError, match="data order state"):
        ProblemStream(ten_problems, seed=5, state=state)
