"""Evaluation under the reference's metric names.

periodic: `eval_batches_per_process` batches of `rollout.batch_size` questions x `rollout.n` samples at
          the training temperature -> eval/reward/func/<name>/mean, eval/reward/total/mean. The questions
          are the first ones of the eval split every time, so successive evals differ only by the policy.
full sweep: greedy pass@1 over the eval split -> eval_full/accuracy, time/eval_full/step_s, and one line
          per question in eval_full.jsonl ({"id", "answer", "prediction", "correct"}) so two runs can be
          compared question by question (McNemar). With `eval_full_at_start` the same sweep also runs
          before the first GRPO step, under the prefix eval_full_start/ into eval_full_start.jsonl: the
          run's own start, paired question by question with its end.
sampled:  with `eval_full_sampled` the sweep also samples each question n times like a training rollout
          (the rollout's settings and batch, so its compiled program) -> eval_full/sampled_accuracy and each
          row's {"samples": n, "sampled_correct": k}. The keys are fixed per batch and the same in every
          sweep of every run: start and end (and two arms) differ by the policy, not by the dice. Greedy
          answers of a weak policy can sit on one mode (every answer 0) while GRPO moves probability onto
          right answers; the sampled pass rate is the quantity GRPO optimises and sees that.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from trainer.data import Problem
from trainer.progress import batches
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


SAMPLED_SWEEP_KEY = 20261207  # the sampled pass's dice: one fixed seed for every sweep of every run


@dataclass(frozen=True)
class SampledPass:
    """The sweep's sampled pass: `n` completions per question at `settings`, `batch_size` questions at a
    time (train.sweep passes the rollout's own n, settings and batch size)."""

    n: int
    settings: SamplingSettings
    batch_size: int


def sweep_batches(questions: int, batch_size: int, sampled: SampledPass | None) -> int:
    """Batches of one full sweep: the greedy ones, then the sampled ones."""
    return batches(questions, batch_size) + (batches(questions, sampled.batch_size) if sampled else 0)


def _padded(problems: Sequence[Problem], start: int, size: int) -> tuple[list[Problem], int]:
    """problems[start:start+size]; a ragged last batch padded with its last question (one compiled shape)."""
    batch = list(problems[start : start + size])
    real = len(batch)
    return batch + [batch[-1]] * (size - real), real


def _sampled_counts(
    sampler: Sampler,
    params: Any,
    problems: Sequence[Problem],
    sampled: SampledPass,
    grader: Grader,
    on_batch: Callable[[int], None],
) -> np.ndarray:
    """How many of the n samples of each question are right (int, one per question, every process)."""
    counts = []
    for b, start in enumerate(range(0, len(problems), sampled.batch_size)):
        batch, real = _padded(problems, start, sampled.batch_size)
        mine = batch[sampler.local_slice(len(batch))]
        rng = jax.random.fold_in(jax.random.key(SAMPLED_SWEEP_KEY), b)
        rollout = sampler.sample(params, mine, sampled.n, rng, sampled.settings)
        ok = [numbers_match(extract_answer(t, grader), gold_answer(p.answer))
              for t, p in zip(rollout.texts, rollout.problems, strict=True)]
        per_question = np.asarray(ok, np.int32).reshape(len(mine), sampled.n).sum(axis=1)
        counts.append(global_concat(per_question)[:real])
        on_batch(b + 1)
    return np.concatenate(counts)


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
    sampled: SampledPass | None = None,
) -> dict[str, float]:
    """Pass@1 over `problems` with `settings` (programs.sweep_settings: greedy); writes eval_full.jsonl to
    `out_path` (process 0 passes a path). With `sampled`, also the sampled pass (module docstring).
    Metric names start with `prefix` (eval_full, or eval_full_start for the sweep before training).
    `on_batch(k, n)` hears that k of the n batches are done (k=0 before the first)."""
    t0 = time.perf_counter()
    correct, predictions = [], []
    rng = jax.random.key(0)  # unused by greedy decoding, but the sampler takes one
    starts = range(0, len(problems), batch_size)
    total = sweep_batches(len(problems), batch_size, sampled)
    if on_batch is not None:
        on_batch(0, total)
    for k, start in enumerate(starts, 1):
        batch, real = _padded(problems, start, batch_size)
        mine = batch[sampler.local_slice(batch_size)]
        rollout = sampler.sample(params, mine, 1, rng, settings)
        values = [extract_answer(t, grader) for t in rollout.texts]
        ok = np.array([numbers_match(v, gold_answer(p.answer)) for v, p in zip(values, mine, strict=True)])
        pred = np.array([np.nan if v is None else v for v in values])
        correct.append(global_concat(ok.astype(np.float32))[:real])
        predictions.append(global_concat(pred.astype(np.float64))[:real])
        if on_batch is not None:
            on_batch(k, total)
    flags, preds = np.concatenate(correct), np.concatenate(predictions)
    def sampled_done(k: int) -> None:  # the sampled batches come after the greedy ones
        if on_batch is not None:
            on_batch(len(starts) + k, total)

    counts = None
    if sampled is not None and len(problems):
        counts = _sampled_counts(sampler, params, problems, sampled, grader, sampled_done)
    if out_path is not None:
        with open(out_path, "w") as f:
            for i, (p, c, v) in enumerate(zip(problems, flags, preds, strict=True)):
                row = {"id": p.id, "answer": p.answer, "prediction": _number(float(v)), "correct": bool(c)}
                if counts is not None:
                    row.update(samples=sampled.n, sampled_correct=int(counts[i]))
                f.write(json.dumps(row) + "\n")
    metrics = {
        f"{prefix}/accuracy": float(flags.mean()) if flags.size else 0.0,
        f"{prefix}/num_questions": float(flags.size),
    }
    if counts is not None:
        metrics[f"{prefix}/sampled_accuracy"] = float(counts.sum() / (counts.size * sampled.n))
    metrics[f"time/{prefix}/step_s"] = time.perf_counter() - t0
    return metrics
