"""Optimizers: Lion (the reference) or AdamW, behind clip-by-global-norm and a warmup-cosine schedule."""

from __future__ import annotations

import optax

from trainer.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_frac` of the steps, then cosine down to `end_lr`."""
    total_steps = max(total_steps, 1)
    warmup = int(round(cfg.warmup_frac * total_steps))
    if warmup >= total_steps:
        warmup = total_steps - 1
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=total_steps,  # optax counts the warmup inside decay_steps
        end_value=cfg.end_lr,
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """`total_steps` counts optimizer updates (steps x ppo_epochs)."""
    schedule = lr_schedule(cfg, total_steps)
    if cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    elif cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    else:  # unreachable after config validation
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
