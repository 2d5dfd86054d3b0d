"""Evaluation under the reference's metric names.

periodic: `eval_batches_per_process` batches of `rollout.batch_size` questions x `rollout.n` samples at
          the training temperature -> eval/reward/func/<name>/mean, eval/reward/total/mean. The questions
          are the first ones of the eval split every time, so successive evals differ only by the policy.
full sweep: greedy pass@1 over the eval split -> eval_full/accuracy, time/eval_full/step_s, and one line
          per question in eval_full.jsonl ({"id", "answer", "prediction", "correct"}) so two runs can be
          compared question by question (McNemar). With `eval_full_at_start` the same sweep also runs
          before the first GRPO step, under the prefix eval_full_start/ into eval_full_start.jsonl: the
          run's own start, paired question by question with its end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from trainer.data import Problem
from trainer.rewards import (
    Grader,
    RewardWeights,
    extract_answer,
    gold_answer,
    numbers_match,
    score_completions,
)
from trainer.rollout import Sampler, global_concat
from trainer.sampler import SamplingSettings

OnBatch = Callable[[int, int], None]  # (batches done, batches in all): trainer/progress.py's advance


def periodic_eval(
    sampler: Sampler,
    params: Any,
    problems: Sequence[Problem],
    *,
    batch_size: int,
    batches: int,
    n: int,
    settings: SamplingSettings,
    weights: RewardWeights,
    rng: jax.Array,
    grader: Grader = "strict",
    on_batch: OnBatch | None = None,
) -> dict[str, float]:
    """`batches` global batches of `batch_size` questions (sliced per process), n samples each."""
    per_func: dict[str, list[np.ndarray]] = {}
    totals, lengths = [], []
    if on_batch is not None:
        on_batch(0, batches)
    for b in range(batches):
        start = (b * batch_size) % max(len(problems) - batch_size + 1, 1)
        batch = list(problems[start : start + batch_size])
        mine = batch[sampler.local_slice(len(batch))]
        rollout = sampler.sample(params, mine, n, jax.random.fold_in(rng, b), settings)
        scores = score_completions(rollout.texts, [p.answer for p in rollout.problems], weights, grader)
        for name, values in scores.per_func.items():
            per_func.setdefault(name, []).append(global_concat(values))
        totals.append(global_concat(scores.total))
        lengths.append(global_concat(rollout.lengths))
        if on_batch is not None:
            on_batch(b + 1, batches)
    metrics = {f"eval/reward/func/{k}/mean": float(np.concatenate(v).mean()) for k, v in per_func.items()}
    metrics["eval/reward/total/mean"] = float(np.concatenate(totals).mean())
    metrics["eval/completion_len/mean"] = float(np.concatenate(lengths).mean())
    return metrics


def _number(value: float | None) -> float | int | None:
    if value is None or not math.isfinite(value):
        return None
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def full_sweep(
    sampler: Sampler,
    params: Any,
    problems: Sequence[Problem],
    *,
    batch_size: int,
    settings: SamplingSettings,
    out_path: Path | None,
    grader: Grader = "strict",
    prefix: str = "eval_full",
    on_batch: OnBatch | None = None,
) -> dict[str, float]:
    """Pass@1 over `problems` with `settings` (programs.sweep_settings: greedy); writes eval_full.jsonl to
    `out_path` (process 0 passes a path).
    Metric names start with `prefix` (eval_full, or eval_full_start for the sweep before training).
    `on_batch(k, n)` hears that k of the n batches are done (k=0 before the first)."""
    t0 = time.perf_counter()
    correct, predictions = [], []
    rng = jax.random.key(0)  # unused by greedy decoding, but the sampler takes one
    starts = range(0, len(problems), batch_size)
    if on_batch is not None:
        on_batch(0, len(starts))
    for k, start in enumerate(starts, 1):
        batch = list(problems[start : start + batch_size])
        real = len(batch)
        batch += [batch[-1]] * (batch_size - real)  # one compiled shape for the ragged last batch
        mine = batch[sampler.local_slice(batch_size)]
        rollout = sampler.sample(params, mine, 1, rng, settings)
        values = [extract_answer(t, grader) for t in rollout.texts]
        ok = np.array([numbers_match(v, gold_answer(p.answer)) for v, p in zip(values, mine, strict=True)])
        pred = np.array([np.nan if v is None else v for v in values])
        correct.append(global_concat(ok.astype(np.float32))[:real])
        predictions.append(global_concat(pred.astype(np.float64))[:real])
        if on_batch is not None:
            on_batch(k, len(starts))
    flags, preds = np.concatenate(correct), np.concatenate(predictions)
    if out_path is not None:
        with open(out_path, "w") as f:
            for p, c, v in zip(problems, flags, preds, strict=True):
                row = {"id": p.id, "answer": p.answer, "prediction": _number(float(v)), "correct": bool(c)}
                f.write(json.dumps(row) + "\n")
    return {
        f"{prefix}/accuracy": float(flags.mean()) if flags.size else 0.0,
        f"{prefix}/num_questions": float(flags.size),
        f"time/{prefix}/step_s": time.perf_counter() - t0,
    }
