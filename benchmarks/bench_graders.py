"""Correctness graders side by side: agreement with a careful grader, and cost per 128 completions.

    python benchmarks/bench_graders.py [--repeats 5]

Graders: ours (`strict`, the default, and `lenient`, the reference rule) and, when the package is
installed (`pip install math-verify`), math-verify (the grader behind TRL's accuracy reward) used two ways:
on the whole completion, as TRL does, and on the text of the last <answer> block. The labelled cases are
tests/test_rewards.py's CORRECT_ROWS (the strict column is the careful grader's verdict). The timed
batch is 128 completions (one reference step: 16 prompts x 8) cycled from those cases, graded one by one
as the trainer does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_rewards import CORRECT_ROWS  # noqa: E402
from trainer.rewards import answer_blocks, gold_answer, reward_correct  # noqa: E402

Grade = Callable[[object, object], float]


def math_verify_graders() -> dict[str, Grade]:
    try:
        from math_verify import parse, verify
    except ImportError:
        return {}

    def gold_of(answer: object) -> list:
        value = gold_answer(answer)
        return parse(f"${value:g}$") if value is not None else []

    def whole(completion: object, answer: object) -> float:
        if not isinstance(completion, str):
            return 0.0
        gold = gold_of(answer)
        return float(bool(gold) and verify(gold, parse(completion)))

    def block(completion: object, answer: object) -> float:
        blocks = answer_blocks(completion)
        gold = gold_of(answer)
        return float(bool(blocks) and bool(gold) and verify(gold, parse(blocks[-1])))

    return {"math-verify (whole completion)": whole, "math-verify (answer block)": block}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    graders: dict[str, Grade] = {
        "strict (default)": lambda c, a: reward_correct(c, a, "strict"),
        "lenient (reference)": lambda c, a: reward_correct(c, a, "lenient"),
        **math_verify_graders(),
    }
    batch = [CORRECT_ROWS[i % len(CORRECT_ROWS)][:2] for i in range(128)]
    print(f"{len(CORRECT_ROWS)} labelled cases; timing {len(batch)} completions x {args.repeats} repeats\n")
    print("| grader | agrees with the careful grader | ms per 128 completions (median) | vs strict |")
    print("|---|---|---|---|")
    base = None
    for name, grade in graders.items():
        agree = sum(grade(c, a) == strict for c, a, strict, _ in CORRECT_ROWS)
        grade(*batch[0])  # first call imports / compiles whatever the grader needs
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for c, a in batch:
                grade(c, a)
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        base = base or ms
        print(f"| {name} | {agree}/{len(CORRECT_ROWS)} | {ms:.2f} | {ms / base:.3g}x |", flush=True)


if __name__ == "__main__":
    main()
