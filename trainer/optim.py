"""Optimizers: Lion (the reference) or AdamW behind clip-by-global-norm, and the warmup-cosine schedule.

The transformation is built with a unit learning rate and the jitted update multiplies its output by the
step's learning rate, passed in as an array. optax applies decoupled weight decay before the learning
rate, so this is exactly `optax.lion(schedule, ...)`; but the compiled update no longer depends on the
schedule (run length, warmup), and runs of different lengths share one compilation.
"""

from __future__ import annotations

import functools

import optax

from trainer.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_frac` of the steps, then cosine down to `end_lr`."""
    total_steps = max(total_steps, 1)
    warmup = min(int(round(cfg.warmup_frac * total_steps)), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=total_steps,  # optax counts the warmup inside decay_steps
        end_value=cfg.end_lr,
    )


@functools.lru_cache(maxsize=16)
def make_optimizer(
    name: str, b1: float, b2: float, weight_decay: float, clip_norm: float
) -> optax.GradientTransformation:
    """Unit-learning-rate transformation (cached: one object, hence one compilation, per setting)."""
    if name == "lion":
        opt = optax.lion(1.0, b1=b1, b2=b2, weight_decay=weight_decay)
    elif name == "adamw":
        opt = optax.adamw(1.0, b1=b1, b2=b2, weight_decay=weight_decay)
    else:  # unreachable after config validation
        raise ValueError(f"unknown optimizer {name!r}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm > 0 else opt


def optimizer_for(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return make_optimizer(cfg.name, cfg.b1, cfg.b2, cfg.weight_decay, cfg.clip_norm)


def scale_updates(updates: optax.Updates, lr) -> optax.Updates:  # noqa: ANN001 (array or float)
    """The unit-rate updates times the step's learning rate."""
    return optax.tree.scale(lr, updates)
