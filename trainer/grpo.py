"""GRPO math: group advantages, the one policy-loss function, and the step gradient over micro-batches.

Everything here is a pure function of arrays. The loss of a step is a weighted SUM over completion tokens,
`sum_t w_t * loss_t`, with per-token weights `w` computed once from the whole (global) batch by
`token_weights`. A micro-batch's loss is the same sum over its rows, so the accumulated micro-batch
gradients are exactly the full-batch gradient (the reference averaged per micro-batch and then again).

Batch layout (all [B, T] over packed sequences `prompt + completion + padding`, see `pack_sequences`):
    tokens, positions, attn_mask   model inputs
    targets                        tokens shifted left: position t predicts targets[t] = tokens[t + 1]
    loss_mask                      1.0 where targets[t] is a completion token (the actions)
    rewards [B]                    total reward of each sequence; rows of one group are contiguous
    old_logp                       (optional) log-probs of the policy that sampled, for ppo_epochs > 1
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trainer.kernels import token_logprobs
from trainer.model import Qwen2Config, forward, lm_head_weight

Batch = dict[str, jax.Array]
ADV_EPS = 1e-4  # the reference's std epsilon


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static knobs of the loss (hashable: a static argument of the jitted update)."""

    group_size: int
    beta: float = 0.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.3
    aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | dr_grpo
    advantage_scaling: str = "group"  # group | batch | none
    max_completion_len: int = 1024  # dr_grpo's constant normaliser
    temperature: float = 1.0
    impl: str = "jax"
    shadow_impl: str | None = None  # lockstep parity: a second provider on the same batch (None = off)
    kernel_blocks: tuple[tuple[str, int], ...] = ()
    compute_dtype: Any = jnp.bfloat16
    remat: bool | str = False  # False, or a remat policy name (trainer/model.py REMAT_POLICIES)


# ---------------------------------------------------------------------------------------------------------
# Advantages and per-token weights (whole batch).


def group_advantages(rewards: jax.Array, group_size: int, scaling: str = "group") -> jax.Array:
    """(r - group mean) / (std + 1e-4), one scalar per sequence; groups are contiguous runs of rows.

    scaling: "group" divides by the group's population std (the reference), "batch" by the whole batch's
    std, "none" does not divide (Dr. GRPO)."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scaling == "group":
        centred = centred / (r.std(axis=1, keepdims=True) + ADV_EPS)
    elif scaling == "batch":
        centred = centred / (r.std() + ADV_EPS)
    elif scaling != "none":
        raise ValueError(f"unknown advantage scaling {scaling!r}")
    return centred.reshape(-1)


def token_weights(loss_mask: jax.Array, aggregation: str, max_completion_len: int) -> jax.Array:
    """[B, T] weights such that the step loss is sum(w * per_token_loss).

    token_mean:           1 / (completion tokens in the whole batch)   (the reference)
    seq_mean_token_mean:  1 / (sequence's completion length * sequences)
    dr_grpo:              1 / (max completion length * sequences)       (a constant: no length bias)
    """
    mask = loss_mask.astype(jnp.float32)
    n_seq = mask.shape[0]
    if aggregation == "token_mean":
        return mask / jnp.maximum(mask.sum(), 1.0)
    if aggregation == "seq_mean_token_mean":
        lengths = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        return mask / (lengths * n_seq)
    if aggregation == "dr_grpo":
        return mask / (max_completion_len * n_seq)
    raise ValueError(f"unknown loss aggregation {aggregation!r}")


# ---------------------------------------------------------------------------------------------------------
# The policy loss.


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    weights: jax.Array,
    token_frac: jax.Array,
    *,
    beta: float,
    clip_eps_low: float,
    clip_eps_high: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO-clip surrogate + beta * KL(k3) as `sum(weights * per_token_loss)`.

    logp/old_logp/ref_logp/weights/token_frac: [B, T]; advantages: [B]. token_frac is the loss mask over
    the global completion-token count, so the returned metrics are token means that add up across
    micro-batches."""
    adv = advantages[:, None]
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {
        "clip_frac_low": jnp.sum(token_frac * ((ratio < 1.0 - clip_eps_low) & (adv < 0))),
        "clip_frac_high": jnp.sum(token_frac * ((ratio > 1.0 + clip_eps_high) & (adv > 0))),
        "ratio_mean": jnp.sum(token_frac * ratio),
    }
    if ref_logp is not None:
        # k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0.
        delta = ref_logp - logp
        kl = jnp.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.sum(token_frac * kl)
    loss = jnp.sum(weights * per_token)
    metrics["loss"] = loss
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# From params to per-token log-probs, and the step gradient.


def head_inputs(params: Any, model_cfg: Qwen2Config, batch: Batch, loss_cfg: LossConfig):
    """The loss head's inputs: final hidden states [B, T, H] and the LM head [V, H], in the compute dtype."""
    hidden, _ = forward(
        params, model_cfg, batch["tokens"], batch["positions"], batch["attn_mask"],
        dtype=loss_cfg.compute_dtype, remat=loss_cfg.remat,
    )
    return hidden, lm_head_weight(params, model_cfg).astype(loss_cfg.compute_dtype)


def head_stats(hidden: jax.Array, w: jax.Array, targets: jax.Array, loss_cfg: LossConfig, impl: str):
    """TokenStats [B, T] of `targets` from the head inputs, by the provider `impl`."""
    return token_logprobs(hidden, w, targets, loss_cfg.temperature, impl, **dict(loss_cfg.kernel_blocks))


def sequence_logprobs(params: Any, model_cfg: Qwen2Config, batch: Batch, loss_cfg: LossConfig):
    """TokenStats [B, T] of the batch's targets under `params` (hidden states -> token_logprobs)."""
    hidden, w = head_inputs(params, model_cfg, batch, loss_cfg)
    return head_stats(hidden, w, batch["targets"], loss_cfg, loss_cfg.impl)


def loss_from_stats(stats, ref_logp: jax.Array | None, mb: Batch, loss_cfg: LossConfig):
    """The micro-batch's policy loss from its TokenStats: the one place every provider's log-probs meet
    the loss math (the update step and the lockstep parity both call it)."""
    # ppo_epochs == 1: the sampling policy is the current one, so old = stop_gradient(logp), ratio == 1.
    old_logp = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(stats.logp)
    return policy_loss(
        stats.logp, old_logp, ref_logp, mb["advantages"], mb["weights"], mb["token_frac"],
        beta=loss_cfg.beta, clip_eps_low=loss_cfg.clip_eps_low, clip_eps_high=loss_cfg.clip_eps_high,
    )


class HeadPass(NamedTuple):
    """The loss head's side of one micro-batch's gradient: its inputs (and the reference policy's, at
    beta > 0), the loss, the log-probs and the gradient w.r.t. the inputs (what the lockstep parity reads)."""

    hidden: jax.Array
    w: jax.Array
    ref: tuple[jax.Array, jax.Array] | None
    loss: jax.Array
    logp: jax.Array
    dhidden: jax.Array
    dw: jax.Array


def head_loss(hidden: jax.Array, w: jax.Array, ref: Any, mb: Batch, loss_cfg: LossConfig, impl: str):
    """The micro-batch's policy loss from the head inputs through the provider `impl` (`ref`: the reference
    policy's head inputs, or None): (loss, (metrics, logp)). Every provider's log-probs meet the loss math
    here, the update's and the lockstep parity's shadow alike."""
    stats = head_stats(hidden, w, mb["targets"], loss_cfg, impl)
    ref_logp = None
    if ref is not None:
        ref_logp = jax.lax.stop_gradient(head_stats(*ref, mb["targets"], loss_cfg, impl).logp)
    loss, metrics = loss_from_stats(stats, ref_logp, mb, loss_cfg)
    metrics["entropy"] = jnp.sum(mb["token_frac"] * stats.entropy)
    if "sample_logp" in mb:  # how far the sampler's log-probs are from the ones training computes
        metrics["logp_mismatch"] = jnp.sum(mb["token_frac"] * jnp.abs(stats.logp - mb["sample_logp"]))
    return loss, (metrics, stats.logp)


def micro_batch_grads(
    params: Any, ref_params: Any, model_cfg: Qwen2Config, mb: Batch, loss_cfg: LossConfig
) -> tuple[Any, dict[str, jax.Array], HeadPass]:
    """The micro-batch's parameter gradient and metrics: one forward pass to the head inputs, the head's
    loss and gradient w.r.t. them, then the backbone's backward pass from that gradient."""
    (hidden, w), backbone_vjp = jax.vjp(lambda p: head_inputs(p, model_cfg, mb, loss_cfg), params)
    ref = None
    if loss_cfg.beta > 0:
        ref = jax.lax.stop_gradient(head_inputs(ref_params, model_cfg, mb, loss_cfg))
    grad_fn = jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True)
    (loss, (metrics, logp)), (dhidden, dw) = grad_fn(hidden, w, ref, mb, loss_cfg, loss_cfg.impl)
    (grads,) = backbone_vjp((dhidden, dw))
    return grads, metrics, HeadPass(hidden, w, ref, loss, logp, dhidden, dw)


# ---------------------------------------------------------------------------------------------------------
# Lockstep parity: the shadow provider on the same micro-batch and parameters as the main one.
#
# The shadow gets the main pass's head inputs (hidden states and LM head: no second forward pass) and goes
# through the same `head_loss`; only token_logprobs differs. The gradient compared is the policy loss's
# gradient w.r.t. those head inputs (hidden states of every token, and the LM head), not w.r.t. every
# parameter: the backbone's backward pass is one linear map applied to either provider's dhidden, so any
# difference in the full gradient starts here, and it costs no second backward pass through the model.

def micro_batch_parity(main: HeadPass, mb: Batch, loss_cfg: LossConfig) -> dict[str, jax.Array]:
    """Main vs shadow provider on one micro-batch: log-prob differences over its completion tokens, both
    losses, and their head-input gradients (dhidden reduced to squared norms, dlm_head kept whole: it is
    summed over micro-batches before its norm is taken)."""
    hidden, w = jax.lax.stop_gradient((main.hidden, main.w))
    grad_fn = jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True)
    (loss_b, (_, logp_b)), (dh_b, dw_b) = grad_fn(hidden, w, main.ref, mb, loss_cfg, loss_cfg.shadow_impl)
    diff = jnp.abs(main.logp - logp_b)
    dh_a, dh_b = main.dhidden.astype(jnp.float32), dh_b.astype(jnp.float32)
    dw_a, dw_b = main.dw.astype(jnp.float32), dw_b.astype(jnp.float32)
    return {
        "logp_max": jnp.max(jnp.where(mb["token_frac"] > 0, diff, 0.0)),
        "logp_abs_sum": jnp.sum(mb["token_frac"] * diff),
        "loss_main": main.loss,
        "loss_shadow": loss_b,
        "dh_diff_sq": jnp.sum(jnp.square(dh_a - dh_b)),
        "dh_main_sq": jnp.sum(jnp.square(dh_a)),
        "dw_main": dw_a,
        "dw_diff": dw_a - dw_b,
    }


def parity_metrics(acc: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The step's parity metrics from the micro-batch accumulations (`parity/...`; train.py logs them as
    `train/parity/...`). grad_rel_diff = ||g_main - g_shadow|| / ||g_main|| over the head inputs."""
    diff_sq = acc["dh_diff_sq"] + jnp.sum(jnp.square(acc["dw_diff"]))
    main_sq = acc["dh_main_sq"] + jnp.sum(jnp.square(acc["dw_main"]))
    return {
        "parity/logp_max_abs_diff": acc["logp_max"],
        "parity/logp_mean_abs_diff": acc["logp_abs_sum"],
        "parity/grad_rel_diff": jnp.sqrt(diff_sq) / jnp.maximum(jnp.sqrt(main_sq), 1e-30),
        "parity/loss_abs_diff": jnp.abs(acc["loss_main"] - acc["loss_shadow"]),
    }


def prepare_batch(batch: Batch, loss_cfg: LossConfig) -> Batch:
    """Adds advantages, loss weights and metric weights computed over the WHOLE batch."""
    mask = batch["loss_mask"].astype(jnp.float32)
    out = dict(batch)
    out["advantages"] = group_advantages(batch["rewards"], loss_cfg.group_size, loss_cfg.advantage_scaling)
    out["weights"] = token_weights(mask, loss_cfg.aggregation, loss_cfg.max_completion_len)
    out["token_frac"] = mask / jnp.maximum(mask.sum(), 1.0)
    return out


def split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] -> [num_micro, B / num_micro, ...]. Row b goes to micro-batch b % num_micro, so each
    micro-batch takes rows from every data shard (the batch axis is sharded in contiguous blocks)."""

    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        if b % num_micro:
            raise ValueError(f"batch of {b} rows does not split into {num_micro} micro-batches")
        return jnp.swapaxes(x.reshape(b // num_micro, num_micro, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def step_gradients(
    params: Any,
    ref_params: Any,
    model_cfg: Qwen2Config,
    batch: Batch,
    loss_cfg: LossConfig,
    num_micro: int,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of the whole step's loss, accumulated over `num_micro` micro-batches (a lax.scan).

    Returns (grads, metrics) where metrics are whole-step values (loss, KL, clip fractions, entropy; with
    loss_cfg.shadow_impl also the lockstep parity's `parity/...`, which never feed the gradient)."""
    batch = prepare_batch(batch, loss_cfg)
    keys = (
        "tokens", "positions", "attn_mask", "targets", "advantages", "weights", "token_frac", "old_logp",
        "sample_logp",
    )
    micro = split_micro_batches({k: batch[k] for k in keys if k in batch}, num_micro)
    shadow = loss_cfg.shadow_impl is not None

    def micro_batch(mb: Batch) -> tuple[Any, dict[str, jax.Array], dict[str, jax.Array]]:
        g, m, head = micro_batch_grads(params, ref_params, model_cfg, mb, loss_cfg)
        # the shadow provider on the same micro-batch, parameters and head inputs
        return g, m, micro_batch_parity(head, mb, loss_cfg) if shadow else {}

    def body(carry, mb):
        grads, sums, parity = carry
        g, m, p = micro_batch(mb)
        grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
        parity = {k: jnp.maximum(v, p[k]) if k == "logp_max" else v + p[k] for k, v in parity.items()}
        return (grads, {k: sums[k] + m[k] for k in sums}, parity), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    _, metric_shapes, parity_shapes = jax.eval_shape(micro_batch, jax.tree.map(lambda x: x[0], micro))
    parity_init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), parity_shapes)
    init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes), parity_init)
    (grads, metrics, parity), _ = jax.lax.scan(body, init, micro)
    metrics["advantage_abs_mean"] = jnp.mean(jnp.abs(batch["advantages"]))
    if shadow:
        metrics.update(parity_metrics(parity))
    return grads, metrics


# ---------------------------------------------------------------------------------------------------------
# Host side: pack prompt + completion rows and trim to the longest real sequence.


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def pack_sequences(
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    completion_tokens: np.ndarray,
    completion_mask: np.ndarray,
    seq_bucket: int,
    pad_id: int = 0,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-padded prompts [B, P] + right-padded completions [B, G] -> packed rows [B, T].

    Each row is `real prompt tokens, real completion tokens, padding`; T is the longest row rounded up to
    `seq_bucket` (few distinct shapes, so few compilations), not the full P + G buffer. Several hosts
    pass the same `length` (their common maximum) so that their rows form one global batch."""
    b = prompt_tokens.shape[0]
    p_len = prompt_mask.sum(axis=1).astype(np.int64)
    c_len = completion_mask.sum(axis=1).astype(np.int64)
    t = length or round_up(int((p_len + c_len).max()), seq_bucket)
    tokens = np.full((b, t), pad_id, np.int32)
    attn = np.zeros((b, t), bool)
    loss_mask = np.zeros((b, t), np.float32)
    for i in range(b):
        prompt = prompt_tokens[i][prompt_mask[i].astype(bool)]
        completion = completion_tokens[i][completion_mask[i].astype(bool)]
        n_p, n_c = len(prompt), len(completion)
        tokens[i, :n_p] = prompt
        tokens[i, n_p : n_p + n_c] = completion
        attn[i, : n_p + n_c] = True
        loss_mask[i, n_p - 1 : n_p + n_c - 1] = 1.0  # position t predicts token t + 1
    targets = np.concatenate([tokens[:, 1:], np.full((b, 1), pad_id, np.int32)], axis=1)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return {
        "tokens": tokens,
        "positions": positions,
        "attn_mask": attn,
        "targets": targets,
        "loss_mask": loss_mask,
    }


def scatter_completion_values(values: np.ndarray, packed_loss_mask: np.ndarray, completion_mask: np.ndarray):
    """Puts per-completion-token values [B, G] (e.g. sampling log-probs) at their packed slots [B, T]."""
    out = np.zeros(packed_loss_mask.shape, np.float32)
    for i in range(out.shape[0]):
        out[i, packed_loss_mask[i] > 0] = values[i][completion_mask[i].astype(bool)]
    return out
