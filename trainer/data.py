"""GSM8K-format problems from the hub, from local files, or from a built-in generator; a resumable order.

Sources (the `source` string):
- "builtin"                     the deterministic generator below (offline, the tiny configs)
- "openai/gsm8k" (or "gsm8k")   the hub dataset through `datasets` (config "main"), when online or cached
- a local path                  a .jsonl/.json/.parquet file (every split reads it), a folder holding
                                <split>.jsonl / <split>.parquet / <split>-*.parquet, or a path containing
                                "{split}"; loaded by `datasets`. Rows: {"question", "answer"[, "id"]} where
                                "answer" is GSM8K's worked solution ending "#### N" (or just N).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.rewards import gold_answer

BUILTIN = "builtin"
GSM8K_HUB_ID = "openai/gsm8k"
GSM8K_ALIASES = {"gsm8k": GSM8K_HUB_ID, GSM8K_HUB_ID: GSM8K_HUB_ID}
BUILTIN_SIZES = {"train": 4096, "test": 256}
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A data source that cannot be read (missing file, bad row, hub unreachable); names the source."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    solution: str  # GSM8K's "answer" field: worked solution ending with "#### N"
    answer: str  # N, the final number as text (thousands separators removed)

    @property
    def value(self) -> float:
        """The final answer as a number."""
        value = gold_answer(self.answer)
        if value is None:
            raise DataError(f"problem {self.id}: answer {self.answer[:40]!r} is not a number")
        return value


def load_problems(
    source: str,
    split: str,
    *,
    size: int | None = None,
    difficulty: int = 1,
    seed: int = 0,
) -> list[Problem]:
    """The problems of one split. `size` truncates file/hub sources and sets the generator's count;
    `difficulty` and `seed` only apply to the generator."""
    if source == BUILTIN:
        return generate_problems(split, BUILTIN_SIZES.get(split, 256) if size is None else size,
                                 difficulty=difficulty, seed=seed)
    if source in GSM8K_ALIASES:
        problems = _load_hub(GSM8K_ALIASES[source], "main", split)
    elif _looks_local(source):
        problems = _load_local(source, split)
    else:
        problems = _load_hub(source, None, split)
    return problems if size is None else problems[:size]


def problem_from_row(row: dict[str, Any], default_id: str) -> Problem:
    """One GSM8K-style row ({"question", "answer"[, "id"]}) as a Problem; DataError if it is unusable."""
    question, answer_text = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip() or answer_text is None:
        raise DataError(f"row {default_id}: needs a non-empty 'question' and an 'answer'")
    answer_text = str(answer_text)
    head, marker, tail = answer_text.rpartition("####")
    final = (tail if marker else answer_text).strip().replace(",", "")
    if gold_answer(final) is None:
        raise DataError(f"row {default_id}: answer {final[:40]!r} is not a number")
    solution = answer_text if marker else f"#### {final}"
    row_id = row.get("id")
    return Problem(id=str(row_id) if row_id is not None else default_id, question=question,
                   solution=solution, answer=final)


# ----------------------------------------------------------------------------------------------- files / hub


def _looks_local(source: str) -> bool:
    return (
        "{split}" in source
        or source.startswith((".", "/", "~"))
        or source.endswith(_FILE_SUFFIXES)
        or Path(source).expanduser().exists()
    )


def _split_files(source: str, split: str) -> list[str]:
    if "{split}" in source:
        path = Path(source.replace("{split}", split)).expanduser()
        if not path.is_file():
            raise DataError(f"data source {source}: no file {path}")
        return [str(path)]
    path = Path(source).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        for pattern in (f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet"):
            found = sorted(path.glob(pattern))
            if found:
                return [str(p) for p in found]
        raise DataError(f"data source {source}: no {split}.jsonl / {split}.parquet in the folder")
    raise DataError(f"data source {source}: no such file or folder")


def _load_local(source: str, split: str) -> list[Problem]:
    import datasets

    files = _split_files(source, split)
    builder = "parquet" if files[0].endswith(".parquet") else "json"
    datasets.disable_progress_bars()
    # A throwaway Arrow cache: local files are re-read in well under a second, and the user's
    # datasets cache does not fill up with copies of every run folder's files.
    with tempfile.TemporaryDirectory(prefix="grpoctl-data-") as cache_dir:
        try:
            table = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        except Exception as err:  # datasets raises many types for unreadable files
            raise DataError(f"data source {source}: cannot read {split} ({_first_line(err)})") from err
        return [problem_from_row(row, f"{split}-{i}") for i, row in enumerate(table)]


def _load_hub(dataset_id: str, config: str | None, split: str) -> list[Problem]:
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as err:  # offline, unknown id, no such split: all one line for the user
        flags = [k for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(k, "0") != "0"]
        hint = f" ({flags[0]}=1 and not cached: use source 'builtin' or a local JSONL)" if flags else ""
        raise DataError(f"data source {dataset_id}: cannot load split {split!r}{hint}: {_first_line(err)}") \
            from err
    return [problem_from_row(row, f"{split}-{i}") for i, row in enumerate(table)]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


# ------------------------------------------------------------------------------------------------ generator

# Difficulty knob. Level 1 is what a tiny random-init model can learn within tens of steps: one addition
# or subtraction whose numbers and result are all single digits. Each level up adds steps and range.
@dataclass(frozen=True)
class Level:
    steps: int
    max_value: int  # every number in the problem, intermediate results included, lies in [0, max_value]
    ops: tuple[str, ...]


LEVELS: dict[int, Level] = {
    1: Level(steps=1, max_value=9, ops=("+", "-")),
    2: Level(steps=1, max_value=99, ops=("+", "-", "*", "/")),
    3: Level(steps=2, max_value=999, ops=("+", "-", "*", "/")),
    4: Level(steps=3, max_value=9999, ops=("+", "-", "*", "/")),
}
_MAX_FACTOR = 12  # multiplications and divisions stay within times tables

NAMES = ("Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena")
ITEMS = ("apples", "pens", "books", "cards", "coins", "shells", "stamps", "eggs", "marbles", "stickers")
_OPENINGS = ("{name} has {a} {item}.", "There are {a} {item} in {name}'s bag.")
_STEPS = {
    "+": ("{name} gets {b} more {item}.", "{name} buys {b} more.", "A friend gives {name} {b} more {item}."),
    "-": ("{name} gives away {b} {item}.", "{name} loses {b} of them.", "{name} uses {b} {item}."),
    "*": ("Then the number of {item} becomes {b} times as many.", "{name} ends up with {b} times as many."),
    "/": ("{name} splits the {item} into {b} equal piles and keeps one pile.",),
}
_QUESTION = ("How many {item} does {name} have now?", "How many {item} are there now?")


def _feasible_step(op: str, x: int, level: Level, rng: random.Random) -> int | None:
    """An operand b for `x op b` with the result in range, or None if this op cannot apply to x."""
    top = level.max_value
    if op == "+":
        return rng.randint(1, top - x) if x < top else None
    if op == "-":
        return rng.randint(1, x) if x >= 1 else None
    if op == "*":
        hi = min(_MAX_FACTOR, top // x) if x else 0
        return rng.randint(2, hi) if hi >= 2 else None
    divisors = [d for d in range(2, _MAX_FACTOR + 1) if x % d == 0 and x >= d]
    return rng.choice(divisors) if divisors else None


def _apply(op: str, x: int, b: int) -> int:
    return {"+": x + b, "-": x - b, "*": x * b, "/": x // b}[op]


def _draw_problem(rng: random.Random, level: Level) -> tuple[str, str, int]:
    """One word problem: (question, worked solution without the #### line, final answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(1, level.max_value)
    sentences = [rng.choice(_OPENINGS).format(name=name, item=item, a=x)]
    lines = []
    for _ in range(level.steps):
        options = [(op, b) for op in level.ops if (b := _feasible_step(op, x, level, rng)) is not None]
        op, b = rng.choice(options)
        y = _apply(op, x, b)
        sentences.append(rng.choice(_STEPS[op]).format(name=name, item=item, b=b))
        lines.append(f"{x} {op} {b} = {y}")
        x = y
    sentences.append(rng.choice(_QUESTION).format(name=name, item=item))
    return " ".join(sentences), "\n".join(lines), x


def _split_of(question: str) -> str:
    """Train/test membership by a hash of the question text: the splits never share a question."""
    return "test" if hashlib.sha256(question.encode()).digest()[0] % 10 == 0 else "train"


def generate_problems(split: str, size: int, *, difficulty: int = 1, seed: int = 0) -> list[Problem]:
    """`size` distinct GSM8K-format problems; the same list for the same (split, size, difficulty, seed)."""
    if difficulty not in LEVELS:
        raise DataError(f"builtin data: difficulty must be one of {sorted(LEVELS)}, got {difficulty}")
    if split not in ("train", "test"):
        raise DataError(f"builtin data: split must be 'train' or 'test', got {split!r}")
    level = LEVELS[difficulty]
    rng = random.Random(f"grpoctl-builtin:{seed}:{difficulty}:{split}")
    seen: set[str] = set()
    problems: list[Problem] = []
    for _ in range(200 * size + 1000):
        if len(problems) == size:
            break
        question, work, answer = _draw_problem(rng, level)
        if question in seen or _split_of(question) != split:
            continue
        seen.add(question)
        problems.append(Problem(id=f"builtin-{difficulty}-{split}-{len(problems)}", question=question,
                                solution=f"{work}\n#### {answer}", answer=str(answer)))
    if len(problems) < size:
        raise DataError(f"builtin data: level {difficulty} has fewer than {size} distinct {split} problems")
    return problems


# ------------------------------------------------------------------------------------------- resumable order


class ProblemStream:
    """Batches of problems in a shuffled order, a fresh permutation per epoch from (seed, epoch).

    The whole position is `state()`, a dict of four ints: the trainer checkpoints it and resumes the
    same order from it.
    """

    def __init__(self, problems: Sequence[Problem], seed: int, state: dict[str, int] | None = None):
        if not problems:
            raise DataError("no problems to train on")
        self.problems = problems
        self.seed = seed
        self.restore(state or {"seed": seed, "epoch": 0, "position": 0, "size": len(problems)})

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def next_batch(self, count: int) -> list[Problem]:
        """The next `count` problems; an epoch boundary inside a batch rolls over to the next permutation."""
        picked: list[Problem] = []
        while len(picked) < count:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(picked), len(self._order) - self.position)
            picked += [self.problems[i] for i in self._order[self.position : self.position + take]]
            self.position += take
        return picked

    def state(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "size": len(self.problems)}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a state() taken earlier on the same problems and seed."""
        if int(state["size"]) != len(self.problems) or int(state["seed"]) != self.seed:
            raise DataError(
                f"data order state is for {state['size']} problems with seed {state['seed']}, not "
                f"{len(self.problems)} with seed {self.seed}: the data source or seed changed"
            )
        if not 0 <= int(state["position"]) <= len(self.problems) or int(state["epoch"]) < 0:
            raise DataError(f"data order state {state} is out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
