"""GSM8K rewards: correctness, format and tag count, plus the weighted batch total.

Each reward function maps one completion (any object: a model can emit garbage and the caller may pass
None) to a float in [0, 1] and never raises. The weighted total uses the config's weights (reference:
1.0 / 0.5 / 0.5, so at most 2.0).

Two graders for correctness (config `reward_grader`):
- "strict" (default): the answer comes from the <answer> block only, and it must commit to ONE value.
  No block, an unclosed (truncated) or empty block, no number in it, a hedge ("about 7", "7?", "7 or 8"),
  a range ("10-12") or several different numbers ("72 clips (24 in May)") score 0. Understood: currency,
  units, percent, thousands separators, trailing zeros, an equation ending in its result ("3 + 4 = 7"),
  `\\boxed{}` (several boxes must agree), `\\frac{a}{b}` and `\\text{}`. Several answer blocks count only
  when they all agree.
- "lenient": the reference trainer's rule, kept to compare with the seed's published numbers: the last
  number inside the last answer block, else the last number anywhere in the completion (so a truncated
  completion or "I am not sure" with a number in the reasoning can score 1).

The number parser fixes two defects of the reference parser: it keeps minus signs ("-5" is not 5) and reads
thousands separators ("1,234" is 1234, not 234). It also reads decimals, fractions ("3/4"), currency and
trailing units, and compares numerically with a small tolerance.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from trainer.prompts import ANSWER_CLOSE, ANSWER_OPEN, FORMAT_TAGS

# A number as people write it in GSM8K answers. The minus is a sign only when nothing numeric or
# word-like stands right before it ("x = -5", "(-5)"), so "10-5" reads as 10 and 5, not 10 and -5.
# Thousands groups must be exact ("1,234,567"); "1,2345" reads as 1 and 2345.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.)\]])[-\u2212])?"
    r"\$?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\d.])\.\d+)"
    r"(?:/(?P<den>\d+(?:\.\d+)?))?"
)
_ANSWER_BLOCK = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
# The whole completion is "<think>...</think>", a line break, "<answer>...</answer>" (answer non-empty).
_FORMAT = re.compile(
    r"\A\s*<think>.*?</think>[ \t]*\n\s*<answer>\s*\S.*?</answer>\s*\Z",
    re.DOTALL,
)
_GOLD_MARKER = "####"

REL_TOL = 1e-6
ABS_TOL = 1e-6


def _number_value(match: re.Match[str]) -> float | None:
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None:
        den = float(match["den"])
        if den == 0:
            return None
        value /= den
    if match["sign"]:
        value = -value
    return value if math.isfinite(value) else None


def last_number(text: object) -> float | None:
    """The last number written in `text` (None when there is none or it does not fit a float)."""
    if not isinstance(text, str):
        return None
    value = None
    for match in _NUMBER.finditer(text):
        value = _number_value(match)
    return value


# --------------------------------------------------------------------------------------- the graders

Grader = Literal["strict", "lenient"]
GRADERS: tuple[str, ...] = ("strict", "lenient")

# Words and marks that take back a single number: "about 72", "72?", "at least 72", "~72".
_HEDGE = re.compile(
    r"\b(?:or|either|between|about|around|approx(?:imately)?|roughly|nearly|almost|maybe|perhaps|"
    r"probably|possibly|likely|guess|unsure|not sure|uncertain|at least|at most|more than|less than|"
    r"up to)\b|[~\u2248\u00b1?]|\+/-",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\q?quad")


def answer_blocks(completion: object) -> list[str]:
    """The text of every closed <answer>...</answer> block, in order ([] for a truncated completion)."""
    if not isinstance(completion, str):
        return []
    return _ANSWER_BLOCK.findall(completion)


def _boxed_contents(text: str) -> list[str] | None:
    """The content of every \\boxed{...} (braces balanced); None when one is left open."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                contents.append(text[start:i])
                break
        else:
            return None
    return contents


def _plain(text: str) -> str:
    """LaTeX and markup as plain text: "\\frac{3}{4}" -> "3/4", "\\text{18 dollars}" -> "18 dollars"."""
    text = _LATEX_WRAPPER.sub(r" \1 ", text)
    text = _LATEX_FRAC.sub(r"\1/\2", text)
    text = text.replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    text = _LATEX_SPACE.sub(lambda m: "" if m.group() == "\\," else " ", text)
    return text.replace("$", "").replace("*", "")  # currency / math delimiters, markdown bold


def _single_value(plain: str) -> float | None:
    """The one number of `plain` (an equation by its result), None for none or several different ones."""
    _, eq, tail = plain.rpartition("=")
    if eq and _NUMBER.search(tail):
        plain = tail
    values: list[float] = []
    for match in _NUMBER.finditer(plain):
        value = _number_value(match)
        if value is None:  # unreadable (1/0, overflow): no committed value
            return None
        if not any(numbers_match(value, v) for v in values):
            values.append(value)
    return values[0] if len(values) == 1 else None


def _agreed(values: list[float | None]) -> float | None:
    """The common value of `values` when there is one (None when empty, one is None, or they differ)."""
    if not values or values[0] is None or not all(numbers_match(values[0], v) for v in values[1:]):
        return None
    return values[0]


def committed_value(text: object) -> float | None:
    """The one value an answer commits to, or None (no number, a hedge, a range, several values).

    An equation counts by its result ("3 + 4 = 7" commits to 7); the same number written twice is still
    one value ("18 (18 dollars)"). With \\boxed{}, the boxes alone count and must agree; a hedge anywhere
    ("maybe \\boxed{7}") still takes the answer back."""
    if not isinstance(text, str) or _HEDGE.search(_plain(text)):
        return None
    if _BOXED.search(text):
        boxes = _boxed_contents(text)
        return None if boxes is None else _agreed([_single_value(_plain(b)) for b in boxes])
    return _single_value(_plain(text))


def extract_answer(completion: object, grader: Grader = "strict") -> float | None:
    """The model's final answer under `grader` (see the module docstring); None when it gives none."""
    if not isinstance(completion, str):
        return None
    blocks = answer_blocks(completion)
    if grader == "lenient":
        if blocks:
            value = last_number(blocks[-1])
            if value is not None:
                return value
        return last_number(completion)
    if grader != "strict":
        raise ValueError(f"unknown grader {grader!r} (known: {', '.join(GRADERS)})")
    return _agreed([committed_value(block) for block in blocks])


def gold_answer(answer: object) -> float | None:
    """The reference answer as a number: GSM8K's text after '####', or a bare number / numeric string."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, numbers.Real):
        return float(answer) if math.isfinite(answer) else None
    if not isinstance(answer, str):
        return None
    _, marker, tail = answer.rpartition(_GOLD_MARKER)
    return last_number(tail if marker else answer)


def format_number(value: float | None) -> str | None:
    """A parsed answer as text for logs and eval_full.jsonl: "42", "-3.5"; None stays None."""
    if value is None:
        return None
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def numbers_match(predicted: float | None, gold: float | None) -> bool:
    if predicted is None or gold is None:
        return False
    return math.isclose(predicted, gold, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def reward_correct(completion: object, answer: object, grader: Grader = "strict") -> float:
    """1.0 when the completion's final answer (under `grader`) equals the reference answer, else 0.0."""
    return float(numbers_match(extract_answer(completion, grader), gold_answer(answer)))


def reward_format(completion: object) -> float:
    """1.0 when the completion is exactly '<think>...</think>\\n<answer>...</answer>' (each tag once)."""
    if not isinstance(completion, str) or not _FORMAT.match(completion):
        return 0.0
    return float(all(completion.count(tag) == 1 for tag in FORMAT_TAGS))


def reward_tag_count(completion: object) -> float:
    """0.25 for each of the four tags that appears exactly once: partial credit while the format is learnt."""
    if not isinstance(completion, str):
        return 0.0
    return 0.25 * sum(completion.count(tag) == 1 for tag in FORMAT_TAGS)


# Metric names follow the reference: reward/func/<function name>/mean.
REWARD_FUNCS: tuple[str, ...] = ("reward_correct", "reward_format", "reward_tag_count")


@dataclass(frozen=True)
class RewardWeights:
    """Weight of each reward function in the total (reference 1.0 / 0.5 / 0.5, max total 2.0)."""

    reward_correct: float = 1.0
    reward_format: float = 0.5
    reward_tag_count: float = 0.5

    @classmethod
    def from_config(
        cls, value: RewardWeights | Mapping[str, float] | Sequence[float] | None
    ) -> RewardWeights:
        """Accept {name: weight} (names with or without the 'reward_' prefix), [w1, w2, w3] or None."""
        if value is None:
            return cls()
        if isinstance(value, RewardWeights):
            return value
        names = [f.name for f in fields(cls)]
        if isinstance(value, Mapping):
            weights = {}
            for key, weight in value.items():
                name = key if key.startswith("reward_") else f"reward_{key}"
                if name not in names:
                    raise ValueError(f"reward_weights: unknown reward {key!r} (known: {', '.join(names)})")
                weights[name] = float(weight)
            return cls(**weights)
        if len(value) != len(names):
            raise ValueError(f"reward_weights: expected {len(names)} weights ({', '.join(names)}), "
                             f"got {len(value)}")
        return cls(*(float(w) for w in value))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def max_total(self) -> float:
        return sum(self.as_dict().values())


@dataclass(frozen=True)
class RewardBatch:
    """Per-function rewards [B] and the weighted total [B] for one batch of completions."""

    per_func: dict[str, np.ndarray]
    total: np.ndarray

    def metrics(self) -> dict[str, float]:
        """Reference names without the train/ or eval/ prefix (the caller adds it)."""
        out: dict[str, float] = {}
        for name, values in self.per_func.items():
            out[f"reward/func/{name}/mean"] = float(values.mean()) if values.size else 0.0
        out["reward/total/mean"] = float(self.total.mean()) if self.total.size else 0.0
        out["reward/total/std"] = float(self.total.std()) if self.total.size else 0.0
        return out


def score_completions(
    completions: Sequence[object],
    answers: Sequence[object],
    weights: RewardWeights | None = None,
    grader: Grader = "strict",
) -> RewardBatch:
    """Score completion i against answers[i] (repeat each answer once per sample of its prompt)."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    weights = weights or RewardWeights()
    per_func = {
        "reward_correct": np.array(
            [reward_correct(c, a, grader) for c, a in zip(completions, answers, strict=True)]
        ),
        "reward_format": np.array([reward_format(c) for c in completions]),
        "reward_tag_count": np.array([reward_tag_count(c) for c in completions]),
    }
    per_func = {name: values.astype(np.float32).reshape(-1) for name, values in per_func.items()}
    total = np.zeros(len(completions), np.float32)
    for name, weight in weights.as_dict().items():
        total += np.float32(weight) * per_func[name]
    return RewardBatch(per_func=per_func, total=total)
