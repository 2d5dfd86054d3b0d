"""Supervised warm start: what the Instruct checkpoint is to the real recipe, for a random-init model.

GRPO only improves what the policy already samples now and then. The real recipe starts from an Instruct
model that already writes `<think>...</think>\\n<answer>N</answer>`; a random-init tiny model does not, so
before GRPO step 1 it is trained with teacher forcing on ideal completions of TRAIN problems (the worked
solution as the reasoning, the final number as the answer, then the end-of-turn token). The loss is the
mean negative log-likelihood of the completion tokens only (the prompt is context, not a target).

Runs once per run, before the first GRPO step; a run resumed from a checkpoint (always taken after a GRPO
step) already has it in its params and skips it. It has its own AdamW state, dropped when it ends.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import PreTrainedTokenizerBase

from trainer import grpo, programs, sharding
from trainer.config import WarmStartConfig
from trainer.data import Problem
from trainer.kernels import token_logprobs
from trainer.model import Qwen2Config, forward, lm_head_weight
from trainer.optim import make_optimizer, scale_updates
from trainer.prompts import ideal_completion
from trainer.sampler import left_pad
from trainer.tokenizer import IM_END, encode_prompts


def problem_completion(problem: Problem) -> str:
    """The ideal completion of a problem: its worked solution (without the `#### N` line) as reasoning."""
    reasoning = problem.solution.rpartition("####")[0].strip() or problem.answer
    return ideal_completion(reasoning, problem.answer)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]
) -> tuple[list[list[int]], list[list[int]]]:
    """(chat prompt ids ending with the assistant header, ideal completion ids + end of turn) per problem."""
    prompts = encode_prompts(tokenizer, [p.question for p in problems])
    texts = [problem_completion(p) + IM_END for p in problems]
    completions = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return prompts, [list(c) for c in completions]


def pack_examples(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Rows `prompt + completion + padding` of `length` tokens (grpo.pack_sequences' layout): loss_mask
    is 1 where the target is a completion token."""
    p_tokens, p_mask = left_pad(prompts, pad_id)  # pack_sequences takes the real tokens of each row,
    c_tokens, c_mask = left_pad(completions, pad_id)  # whichever side the padding is on
    return grpo.pack_sequences(p_tokens, p_mask, c_tokens, c_mask, seq_bucket=length, pad_id=pad_id,
                               length=length)


def sft_loss(params: Any, model_cfg: Qwen2Config, batch: grpo.Batch, compute_dtype: Any) -> jax.Array:
    """Mean negative log-likelihood of the completion tokens (teacher forcing), over the whole batch."""
    hidden, _ = forward(params, model_cfg, batch["tokens"], batch["positions"], batch["attn_mask"],
                        dtype=compute_dtype)
    w = lm_head_weight(params, model_cfg).astype(compute_dtype)
    logp = token_logprobs(hidden, w, batch["targets"], impl="jax").logp
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(mask * logp) / jnp.maximum(mask.sum(), 1.0)


@functools.partial(
    jax.jit, static_argnames=("model_cfg", "compute_dtype", "optimizer"), donate_argnums=(0, 1)
)
def sft_step(params, opt_state, batch, lr, *, model_cfg, compute_dtype, optimizer):
    loss, grads = jax.value_and_grad(sft_loss)(params, model_cfg, batch, compute_dtype)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, scale_updates(updates, lr)), opt_state, loss


def warm_start(
    params: Any,
    cfg: WarmStartConfig,
    model_cfg: Qwen2Config,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    mesh: jax.sharding.Mesh,
    *,
    seed: int,
    pad_id: int,
    compute_dtype: Any,
    local_rows: slice,
    on_step: Callable[[int, jax.Array], None] | None = None,
) -> tuple[Any, dict[str, float]]:
    """`cfg.steps` AdamW steps (cosine lr from `cfg.lr` to 0) of `sft_loss` on batches of `cfg.batch_size`
    problems drawn from `problems` (every process draws the same global batch and packs its `local_rows`).
    `on_step(k, loss)` follows each step (the loss stays on the device until the callback reads it).

    Returns (params, {"warm_start/loss": mean loss of the last 10 steps, "warm_start/loss_first": of the
    first step, "time/warm_start_s": seconds})."""
    start = time.perf_counter()
    prompts, completions = encode_examples(tokenizer, problems)
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    length = grpo.round_up(longest, 8)  # one shape for every step: one compilation, little padding
    optimizer = make_optimizer("adamw", 0.9, 0.99, 0.0, 1.0)
    # Split like the params (programs.optimizer_init, as the GRPO state), under the mesh so the count is
    # typed as sft_step returns it: one compilation.
    with jax.set_mesh(mesh):
        opt_state = programs.optimizer_init(optimizer, params, mesh)(params)
    schedule = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1))
    rng = np.random.default_rng([seed, 0x5F7])  # apart from the GRPO data order, which it leaves alone
    losses = []
    for step in range(cfg.steps):
        picked = rng.choice(len(problems), size=cfg.batch_size, replace=len(problems) < cfg.batch_size)
        rows = picked[local_rows]
        host = pack_examples([prompts[i] for i in rows], [completions[i] for i in rows], length, pad_id)
        batch = sharding.shard_batch(host, mesh)
        params, opt_state, loss = sft_step(
            params, opt_state, batch, np.float32(schedule(step)), model_cfg=model_cfg,
            compute_dtype=compute_dtype, optimizer=optimizer,
        )
        losses.append(loss)
        if on_step is not None:
            on_step(step + 1, loss)
    losses = [float(x) for x in jax.device_get(losses)]
    return params, {
        "warm_start/loss": float(np.mean(losses[-10:])),
        "warm_start/loss_first": losses[0],
        "time/warm_start_s": time.perf_counter() - start,
    }
