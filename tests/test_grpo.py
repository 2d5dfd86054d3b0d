"""GRPO math: advantages, loss weights, the policy loss's sign/clip/KL, micro-batch gradient accumulation,
and the host-side packing that trims training tensors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import grpo
from trainer.model import Qwen2Config, init_params

# ---------------------------------------------------------------------------------------------------------
# Pure functions.


def test_group_advantages_match_the_reference_formula():
    r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 0.0], np.float32)
    got = np.asarray(grpo.group_advantages(jnp.asarray(r), 4, "group"))
    groups = r.reshape(2, 4)
    want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-6)
    # A group whose rewards are all equal has zero advantage (no signal, no NaN).
    np.testing.assert_array_equal(np.asarray(grpo.group_advantages(jnp.ones(4), 4)), np.zeros(4))
    none = np.asarray(grpo.group_advantages(jnp.asarray(r), 4, "none"))
    np.testing.assert_allclose(none, (groups - groups.mean(1, keepdims=True)).reshape(-1), rtol=1e-6)
    batch = np.asarray(grpo.group_advantages(jnp.asarray(r), 4, "batch"))
    np.testing.assert_allclose(batch, none / (r.std() + 1e-4), rtol=1e-6)


def test_token_weights_normalise_over_the_whole_batch():
    mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
    tm = np.asarray(grpo.token_weights(mask, "token_mean", 8))
    np.testing.assert_allclose(tm, np.asarray(mask) / 4)
    sm = np.asarray(grpo.token_weights(mask, "seq_mean_token_mean", 8))
    np.testing.assert_allclose(sm.sum(axis=1), [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(sm[0, :3], 1 / 6, rtol=1e-6)
    dr = np.asarray(grpo.token_weights(mask, "dr_grpo", 8))
    np.testing.assert_allclose(dr, np.asarray(mask) / 16)


def _loss(logp, old, adv, ref=None, beta=0.0):
    mask = jnp.ones_like(logp)
    w = mask / mask.size
    return grpo.policy_loss(logp, old, ref, adv, w, w, beta=beta, clip_eps_low=0.2, clip_eps_high=0.3)


def test_policy_gradient_raises_logp_of_positive_advantage_tokens():
    logp = jnp.log(jnp.full((2, 3), 0.5))
    adv = jnp.asarray([1.0, -1.0])
    g = jax.grad(lambda lp: _loss(lp, jax.lax.stop_gradient(lp), adv)[0])(logp)
    # Gradient descent on the loss moves logp along -g: up for A > 0, down for A < 0.
    np.testing.assert_allclose(np.asarray(g), -np.asarray(adv)[:, None] * np.ones((2, 3)) / 6, rtol=1e-6)


def test_clipping_stops_the_gradient_and_is_counted():
    old = jnp.zeros((2, 1))
    logp = jnp.log(jnp.asarray([[1.5], [0.7]]))  # ratios 1.5 (> 1 + 0.3) and 0.7 (< 1 - 0.2)
    adv = jnp.asarray([1.0, -1.0])
    (_, m), g = jax.value_and_grad(lambda lp: _loss(lp, old, adv), has_aux=True)(logp)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    assert float(m["clip_frac_high"]) == pytest.approx(0.5)
    assert float(m["clip_frac_low"]) == pytest.approx(0.5)
    # On the other side of 1 the ratio is not clipped: the gradient flows.
    g2 = jax.grad(lambda lp: _loss(lp, old, -adv)[0])(logp)
    assert np.all(np.asarray(g2) != 0.0)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = jnp.log(jnp.asarray([[0.5, 0.25]]))
    adv = jnp.zeros(1)
    _, same = _loss(logp, logp, adv, ref=logp, beta=0.1)
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-7)
    loss, other = _loss(logp, logp, adv, ref=jnp.log(jnp.asarray([[0.25, 0.5]])), beta=0.1)
    assert float(other["kl"]) > 0.0
    assert float(loss) == pytest.approx(0.1 * float(other["kl"]), rel=1e-6)


def test_pack_sequences_trims_to_the_longest_row_and_shifts_targets():
    prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 10]], np.int32)
    pmask = prompt != 0
    comp = np.array([[11, 12, 13, 0, 0, 0], [14, 0, 0, 0, 0, 0]], np.int32)
    cmask = comp != 0
    packed = grpo.pack_sequences(prompt, pmask, comp, cmask, seq_bucket=4)
    assert packed["tokens"].shape == (2, 8)  # longest row 2 + 3 = 5 tokens -> bucket 8, not 4 + 6
    np.testing.assert_array_equal(packed["tokens"][0, :5], [5, 6, 11, 12, 13])
    np.testing.assert_array_equal(packed["tokens"][1, :5], [7, 8, 9, 10, 14])
    # Targets at loss positions are exactly the completion tokens, in order.
    for i in range(2):
        sel = packed["loss_mask"][i] > 0
        np.testing.assert_array_equal(packed["targets"][i][sel], comp[i][cmask[i]])
    sampled = np.where(cmask, -comp.astype(np.float32), 0.0)
    placed = grpo.scatter_completion_values(sampled, packed["loss_mask"], cmask)
    np.testing.assert_array_equal(placed[packed["loss_mask"] > 0], sampled[cmask])


# ---------------------------------------------------------------------------------------------------------
# Gradients through the tiny model.

MODEL = Qwen2Config.tiny(vocab_size=96, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                         head_dim=8)
LOSS = grpo.LossConfig(group_size=4, compute_dtype=jnp.float32, max_completion_len=8)


@pytest.fixture(scope="module")
def batch_and_params():
    rng = np.random.default_rng(0)
    b, p, g = 8, 5, 8
    prompt = rng.integers(3, MODEL.vocab_size, size=(b, p)).astype(np.int32)
    pmask = np.ones((b, p), bool)
    pmask[::3, :2] = False  # some shorter prompts
    comp = rng.integers(3, MODEL.vocab_size, size=(b, g)).astype(np.int32)
    lengths = rng.integers(1, g + 1, size=b)
    cmask = np.arange(g)[None, :] < lengths[:, None]
    packed = grpo.pack_sequences(prompt, pmask, comp, cmask, seq_bucket=4)
    batch = {k: jnp.asarray(v) for k, v in packed.items()}
    batch["rewards"] = jnp.asarray(rng.uniform(0, 2, size=b).astype(np.float32))
    params = init_params(MODEL, jax.random.key(0))
    return batch, params


@pytest.fixture(scope="module")
def gradients():
    cache = {}
    step_gradients = jax.jit(grpo.step_gradients, static_argnums=(2, 4, 5))  # one compile per shape/config

    def compute(params, ref, batch, loss_cfg, num_micro):
        key = (id(params), id(ref), id(batch), loss_cfg, num_micro)
        if key not in cache:
            cache[key] = step_gradients(params, ref, MODEL, batch, loss_cfg, num_micro)
        return cache[key]

    return compute


def _max_rel(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)
    den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
    return num / den


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_accumulated_micro_batch_gradients_equal_the_full_batch_gradient(
    batch_and_params, gradients, aggregation
):
    batch, params = batch_and_params
    loss_cfg = dataclasses.replace(LOSS, aggregation=aggregation)
    full_g, full_m = gradients(params, None, batch, loss_cfg, 1)
    acc_g, acc_m = gradients(params, None, batch, loss_cfg, 4)
    assert _max_rel(acc_g, full_g) < 1e-5
    assert float(acc_m["loss"]) == pytest.approx(float(full_m["loss"]), rel=1e-5, abs=1e-7)
    assert float(acc_m["entropy"]) == pytest.approx(float(full_m["entropy"]), rel=1e-5)
    # The gradient is not dead: the advantages are non-zero and so is the gradient.
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(full_g)) > 1e-6


def test_beta_adds_a_real_kl_gradient(batch_and_params, gradients):
    batch, params = batch_and_params
    # The KL gradient vanishes where policy == reference, so take a reference that differs.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    ref = jax.tree.unflatten(treedef, noisy)
    g0, m0 = gradients(params, None, batch, LOSS, 2)
    g1, m1 = gradients(params, ref, batch, dataclasses.replace(LOSS, beta=0.5), 2)
    assert "kl" not in m0 and float(m1["kl"]) > 0
    assert _max_rel(g1, g0) > 1e-3
    # With beta > 0 but the reference equal to the policy, KL is 0 and so is its gradient.
    g_same, m_same = gradients(params, params, batch, dataclasses.replace(LOSS, beta=0.5), 2)
    assert float(m_same["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert _max_rel(g_same, g0) < 1e-5


def test_old_logprobs_equal_to_current_give_the_on_policy_gradient(batch_and_params, gradients):
    batch, params = batch_and_params
    logp = grpo.sequence_logprobs(params, MODEL, batch, LOSS).logp
    with_old = dict(batch, old_logp=logp)
    g_on, _ = gradients(params, None, batch, LOSS, 2)
    g_old, m_old = gradients(params, None, with_old, LOSS, 2)
    assert _max_rel(g_old, g_on) < 1e-5
    assert float(m_old["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Optimizer: unit-rate transformation x the step's learning rate == optax's scheduled optimizer.


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_unit_rate_optimizer_times_lr_equals_the_scheduled_optax_optimizer(name):
    import optax

    from trainer.config import OptimizerConfig
    from trainer.optim import lr_schedule, optimizer_for, scale_updates

    cfg = OptimizerConfig(name=name, lr=1e-2, warmup_frac=0.25, end_lr=1e-3, weight_decay=0.1, clip_norm=0.5)
    schedule = lr_schedule(cfg, total_steps=8)
    assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(1e-2)
    assert float(schedule(8)) == pytest.approx(1e-3)
    make = optax.lion if name == "lion" else optax.adamw
    reference = optax.chain(optax.clip_by_global_norm(0.5), make(schedule, b1=0.9, b2=0.99, weight_decay=0.1))
    ours = optimizer_for(cfg)
    p_ref = p_ours = {"w": jnp.arange(6.0).reshape(2, 3) / 7}
    s_ref, s_ours = reference.init(p_ref), ours.init(p_ours)
    for step in range(5):
        g = {"w": jnp.sin(p_ref["w"] * (step + 1))}
        u, s_ref = reference.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        u, s_ours = ours.update(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, scale_updates(u, schedule(step)))
    np.testing.assert_allclose(np.asarray(p_ours["w"]), np.asarray(p_ref["w"]), rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(p_ours["w"] - jnp.arange(6.0).reshape(2, 3) / 7))) > 1e-3


# Ratios between the two bounds tell the bounds apart: with eps_low 0.2 / eps_high 0.3, a ratio of 1.25 is
# inside the upper bound (1.3) but outside 1 + eps_low, and 0.75 is outside the lower bound (0.8) but inside
# 1 - eps_high. Ratios far out (1.5, 0.7) are clipped the same whichever eps a bound uses.
@pytest.mark.parametrize(
    ("ratio", "adv", "clipped", "side"),
    [
        (1.25, 1.0, False, "high"),  # 1.2 < r < 1.3: a swapped upper bound would clip here
        (1.35, 1.0, True, "high"),  # just past 1.3
        (0.75, -1.0, True, "low"),  # 0.7 < r < 0.8: a swapped lower bound would not clip here
        (0.85, -1.0, False, "low"),  # just inside 0.8
        (1.35, -1.0, False, "none"),  # past the upper bound with A < 0: min picks the unclipped term
        (0.75, 1.0, False, "none"),  # past the lower bound with A > 0: likewise
        (0.75, 0.0, False, "none"),  # A = 0: nothing to push back, so nothing counted as clipped
        (1.35, 0.0, False, "none"),
    ],
)
def test_clip_bounds_use_their_own_eps_on_each_side(ratio: float, adv: float, clipped: bool, side: str):
    old = jnp.zeros((1, 1))
    logp = jnp.log(jnp.asarray([[ratio]], jnp.float32))
    advantages = jnp.asarray([adv])
    (loss, m), g = jax.value_and_grad(lambda lp: _loss(lp, old, advantages), has_aux=True)(logp)
    bound = {"high": 1.3, "low": 0.8}.get(side, ratio)
    # loss = -min(r * A, clip(r) * A): the clipped value when clipped, the ratio itself otherwise.
    assert float(loss) == pytest.approx(-(bound if clipped else ratio) * adv, rel=1e-5)
    # d loss / d logp = -A * r when the ratio term is active, 0 when clipped.
    assert float(g[0, 0]) == pytest.approx(0.0 if clipped else -adv * ratio, rel=1e-5, abs=1e-7)
    assert float(m["clip_frac_high"]) == (1.0 if clipped and side == "high" else 0.0)
    assert float(m["clip_frac_low"]) == (1.0 if clipped and side == "low" else 0.0)
    assert float(m["ratio_mean"]) == pytest.approx(ratio, rel=1e-6)
    assert float(m["loss"]) == float(loss)


def test_pack_sequences_masks_positions_and_padding():
    prompt = np.array([[0, 0, 5, 6], [7, 8, 9, 10]], np.int32)
    comp = np.array([[11, 12, 13, 0, 0, 0], [14, 0, 0, 0, 0, 0]], np.int32)
    packed = grpo.pack_sequences(prompt, prompt != 0, comp, comp != 0, seq_bucket=4)
    # Real tokens (prompt + completion, left-packed) are attended to; the padding after them is not.
    np.testing.assert_array_equal(packed["attn_mask"], [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(packed["positions"], np.broadcast_to(np.arange(8), (2, 8)))
    # The loss is on the positions that predict completion tokens: t predicts tokens[t + 1].
    np.testing.assert_array_equal(packed["loss_mask"], [[0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]])


# prepare_batch and split_micro_batches are pure array plumbing; the model-gradient tests above reach them
# too, but only through a compile that costs a minute, so these check them on small arrays directly.


def test_prepare_batch_weights_and_advantages_come_from_the_whole_batch():
    rewards = jnp.asarray([1.0, 0.0, 2.0, 4.0, 1.0, 1.0], jnp.float32)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]], jnp.float32)
    cfg = grpo.LossConfig(group_size=3, aggregation="dr_grpo", advantage_scaling="none", max_completion_len=5)
    out = grpo.prepare_batch({"rewards": rewards, "loss_mask": mask, "tokens": jnp.zeros((6, 3))}, cfg)
    assert out["tokens"] is not None and out["rewards"] is rewards  # the inputs travel on unchanged
    # Groups of 3 (not the default 4), centred and not divided by the std ("none").
    np.testing.assert_allclose(out["advantages"], [0, -1, 1, 2, -1, -1], atol=1e-6)
    # dr_grpo with this config's constant: 1 / (max_completion_len 5 * 6 sequences) per completion token.
    np.testing.assert_allclose(out["weights"], np.asarray(mask) / 30, rtol=1e-6)
    # Metric weights: each completion token of the WHOLE batch counts 1 / 9 (9 tokens), so per-micro-batch
    # sums add up to whole-batch means.
    np.testing.assert_allclose(out["token_frac"], np.asarray(mask) / 9, rtol=1e-6)
    # A batch without completion tokens has zero weights, not NaN.
    empty = grpo.prepare_batch({"rewards": rewards, "loss_mask": jnp.zeros((6, 3))}, cfg)
    np.testing.assert_array_equal(empty["token_frac"], 0.0)


def test_split_micro_batches_deals_rows_round_robin_and_refuses_a_ragged_split():
    batch = {"x": jnp.arange(8 * 3).reshape(8, 3), "r": jnp.arange(8.0)}
    micro = grpo.split_micro_batches(batch, 4)
    assert micro["x"].shape == (4, 2, 3) and micro["r"].shape == (4, 2)
    # Row b goes to micro-batch b % 4: each micro-batch takes rows from both halves (both data shards).
    np.testing.assert_array_equal(micro["r"], [[0, 4], [1, 5], [2, 6], [3, 7]])
    np.testing.assert_array_equal(micro["x"][1], np.asarray(batch["x"])[[1, 5]])
    np.testing.assert_array_equal(grpo.split_micro_batches(batch, 1)["r"], [np.arange(8.0)])
    with pytest.raises(ValueError, match="batch of 8 rows does not split into 3 micro-batches"):
        grpo.split_micro_batches(batch, 3)
