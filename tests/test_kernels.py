"""token_logprobs providers against a float64 NumPy reference: values and gradients, ragged shapes, bf16.

Relative error of an array a against the float64 reference b: max|a - b| / max|b| (one number per array,
so entries near zero do not blow it up). Bounds: float32 inputs 1e-5 for values, 1e-4 for gradients;
bfloat16 inputs 2e-2 (the reference then sees the same bf16-rounded inputs in float64).
Gradients are of L = sum(c_logp * logp + c_lse * lse + c_ent * entropy) with random per-token c.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from trainer.kernels import KernelBlocks, TokenStats, token_logprobs
from trainer.kernels.mesh import token_axes, token_mesh
from trainer.kernels.pallas import token_logprobs_pallas


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int
    vocab: int
    width: int
    temperature: float
    dtype: str
    blocks: dict
    seed: int


def _inputs(case: Case):
    rng = np.random.default_rng(case.seed)
    hidden = rng.standard_normal((case.tokens, case.width))
    # Logits with a spread like a trained LM head (std ~ 3), so the softmax is neither flat nor one-hot.
    lm_head = rng.standard_normal((case.vocab, case.width)) * 3.0 / np.sqrt(case.width)
    targets = rng.integers(0, case.vocab, case.tokens)
    targets[0], targets[-1] = 0, case.vocab - 1  # the first column and the ragged tail's last column
    coeffs = rng.standard_normal((3, case.tokens))
    h = jnp.asarray(hidden, case.dtype)
    w = jnp.asarray(lm_head, case.dtype)
    return h, w, jnp.asarray(targets, jnp.int32), coeffs


def numpy_reference(hidden, lm_head, targets, temperature, coeffs):
    """float64: (logp, lse, entropy) and dL/dhidden, dL/dlm_head for L = sum(coeffs * stats)."""
    h = np.asarray(hidden, np.float64)
    w = np.asarray(lm_head, np.float64)
    t = np.asarray(targets)
    z = h @ w.T / temperature
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    log_p = z - lse[:, None]
    p = np.exp(log_p)
    rows = np.arange(len(t))
    logp = log_p[rows, t]
    entropy = -(p * log_p).sum(axis=1)
    c_logp, c_lse, c_ent = (c[:, None] for c in coeffs)
    onehot = np.zeros_like(z)
    onehot[rows, t] = 1.0
    mean_z = (p * z).sum(axis=1, keepdims=True)
    dz = c_logp * (onehot - p) + c_lse * p - c_ent * p * (z - mean_z)
    draw = dz / temperature
    return (logp, lse, entropy), (draw @ w, draw.T @ h)


def _loss_and_grads(impl_fn, h, w, t, temperature, coeffs):
    c = jnp.asarray(coeffs, jnp.float32)

    def loss(h, w):
        s = impl_fn(h, w, t, temperature)
        return jnp.sum(c[0] * s.logp + c[1] * s.lse + c[2] * s.entropy), s

    (_, stats), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
    return stats, grads


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _assert_parity(stats: TokenStats, grads, ref, dtype: str) -> None:
    (logp, lse, ent), (dh, dw) = ref
    value_tol, grad_tol = (1e-5, 1e-4) if dtype == "float32" else (2e-2, 2e-2)
    errors = {
        "logp": rel_err(stats.logp, logp),
        "lse": rel_err(stats.lse, lse),
        "entropy": rel_err(stats.entropy, ent),
        "dhidden": rel_err(grads[0], dh),
        "dlm_head": rel_err(grads[1], dw),
    }
    for name, err in errors.items():
        tol = grad_tol if name.startswith("d") else value_tol
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e} (all: {errors})"
    assert stats.logp.dtype == jnp.float32 and grads[0].dtype == grads[1].dtype == jnp.dtype(dtype)


# Small blocks make every shape multi-tile: 8-row token blocks, 128-column vocabulary blocks/chunks.
SMALL = dict(block_tokens=8, block_vocab=128, chunk_vocab=128)
CASES = {
    # N = 20: ragged last token block; V = 300: ragged last vocab block (and a 44-column tail chunk).
    "ragged-f32-T0.7": Case(20, 300, 64, 0.7, "float32", SMALL, 0),
    # V smaller than the vocabulary block: one whole-axis vocabulary block / one chunk.
    "single-vocab-block-f32": Case(16, 200, 32, 1.0, "float32", dict(block_tokens=8, block_vocab=256,
                                                                       chunk_vocab=256), 1),
    "ragged-bf16-T1.3": Case(24, 400, 128, 1.3, "bfloat16", SMALL, 2),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case_and_reference(request):
    case = CASES[request.param]
    h, w, t, coeffs = _inputs(case)
    ref = numpy_reference(h.astype(jnp.float32), w.astype(jnp.float32), t, case.temperature, coeffs)
    return case, (h, w, t, coeffs), ref


@pytest.mark.parametrize("impl", ["jax", "chunked", "pallas"])
def test_matches_float64_reference(case_and_reference, impl):
    case, (h, w, t, coeffs), ref = case_and_reference
    fn = lambda h, w, t, T: token_logprobs(h, w, t, T, impl=impl, **case.blocks)
    stats, grads = _loss_and_grads(fn, h, w, t, case.temperature, coeffs)
    _assert_parity(stats, grads, ref, case.dtype)


def test_pallas_under_tpu_interpret_params():
    """TPU memory semantics: ragged-block reads and scratch start as NaN, so any unmasked garbage shows."""
    case = Case(20, 300, 128, 0.8, "float32", {}, 3)
    h, w, t, coeffs = _inputs(case)
    blocks = KernelBlocks(block_tokens=8, block_vocab=128)
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    fn = lambda h, w, t, T: token_logprobs_pallas(h, w, t, T, blocks, interpret=params)
    stats, grads = _loss_and_grads(fn, h, w, t, case.temperature, coeffs)
    _assert_parity(stats, grads, numpy_reference(h, w, t, case.temperature, coeffs), case.dtype)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("ambient", [False, True], ids=["mesh-from-input-sharding", "jax.set_mesh"])
def test_on_a_device_mesh_each_device_takes_its_tokens(ambient, impl):
    """8 CPU devices, (dp, fsdp) = (2, 4): the provider runs per device on 1/8 of the tokens (mesh found from
    the inputs' shardings, as the trainer places them, or from jax.set_mesh); same values and gradients,
    so the lm_head gradient is summed over the devices."""
    case = Case(64, 300, 128, 1.0, "float32", SMALL, 6)
    h, w, t, coeffs = _inputs(case)
    mesh = jax.make_mesh((2, 4, 1), ("dp", "fsdp", "tp"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:8])
    h = jax.device_put(h, NamedSharding(mesh, PartitionSpec(("dp", "fsdp"))))
    w = jax.device_put(w, NamedSharding(mesh, PartitionSpec("fsdp")))  # vocab-sharded, as FSDP keeps it
    seen_axes = []

    def fn(h, w, t, temperature):
        seen_axes.append(token_axes(token_mesh(h), h.shape[0]))
        return token_logprobs(h, w, t, temperature, impl=impl, **case.blocks)

    with contextlib.ExitStack() as stack:
        if ambient:
            stack.enter_context(jax.set_mesh(mesh))
        stats, grads = _loss_and_grads(fn, h, w, t, case.temperature, coeffs)
    assert seen_axes == [("dp", "fsdp")]
    _assert_parity(stats, grads, numpy_reference(h, w, t, case.temperature, coeffs), case.dtype)


def test_inside_a_callers_shard_map_it_runs_on_the_local_tokens():
    """Mesh axes that are already manual (the caller's own shard_map) are not split again."""
    mesh = jax.make_mesh((2, 4, 1), ("dp", "fsdp", "tp"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:8])
    case = Case(64, 50, 16, 1.0, "float32", SMALL, 7)
    h, w, t, coeffs = _inputs(case)
    (logp, _, _), _ = numpy_reference(h, w, t, 1.0, coeffs)
    rows = PartitionSpec(("dp", "fsdp"))
    for impl in ("chunked", "pallas"):
        local = lambda h, w, t, impl=impl: token_logprobs(h, w, t, impl=impl, **SMALL).logp
        got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, PartitionSpec(), rows),
                                    out_specs=rows, check_vma=False))(h, w, t)
        assert rel_err(got, logp) <= 1e-5, impl


def test_numpy_reference_gradient_matches_finite_differences():
    """The float64 reference's hand-derived gradient (incl. the entropy term) against central differences."""
    case = Case(5, 11, 4, 0.9, "float32", {}, 4)
    h, w, t, coeffs = _inputs(case)
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)

    def loss(h, w):
        stats, _ = numpy_reference(h, w, t, case.temperature, coeffs)
        return sum(float(np.sum(c * s)) for c, s in zip(coeffs, stats, strict=True))

    _, (dh, dw) = numpy_reference(h, w, t, case.temperature, coeffs)
    eps = 1e-6
    for arr, grad in ((h, dh), (w, dw)):
        numeric = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            orig = arr[idx]
            arr[idx] = orig + eps
            up = loss(h, w)
            arr[idx] = orig - eps
            down = loss(h, w)
            arr[idx] = orig
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_chunk_larger_than_vocab_and_batch_dims():
    """hidden [B, T, H] / targets [B, T] give [B, T] outputs; a chunk wider than V is clamped to V."""
    case = Case(12, 50, 16, 1.0, "float32", {}, 5)
    h, w, t, _ = _inputs(case)
    (logp, lse, ent), _ = numpy_reference(h, w, t, 1.0, np.zeros((3, 12)))
    stats = token_logprobs(h.reshape(3, 4, 16), w, t.reshape(3, 4), impl="chunked", chunk_vocab=4096)
    assert stats.logp.shape == (3, 4)
    assert rel_err(stats.logp.reshape(-1), logp) <= 1e-5
    assert rel_err(stats.entropy.reshape(-1), ent) <= 1e-5


def test_bad_arguments_say_what_is_wrong():
    h, w, t = jnp.zeros((4, 8)), jnp.zeros((16, 8)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="unknown token_logprobs impl 'triton'"):
        token_logprobs(h, w, t, impl="triton")
    with pytest.raises(ValueError, match="block_vocab must be a positive multiple of 128"):
        token_logprobs(h, w, t, impl="pallas", block_vocab=100)
    with pytest.raises(ValueError, match="block_tokens must be a positive multiple of 8"):
        KernelBlocks(block_tokens=12)
    with pytest.raises(TypeError, match="chunk_size"):
        token_logprobs(h, w, t, impl="chunked", chunk_size=128)  # a misspelt block key is not ignored
    with pytest.raises(ValueError, match="temperature must be positive"):
        token_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, w, t[:3])


def test_trainer_config_passes_kernel_blocks_and_rejects_bad_ones():
    """train.kernel_blocks reaches KernelBlocks; a misspelt key or illegal size is a config error (exit 2)."""
    from trainer import config as C

    cfg = C.load(None, ["train.policy_loss_impl=pallas", "train.kernel_blocks.block_vocab=2048"], {})
    assert KernelBlocks(**cfg.train.kernel_blocks).block_vocab == 2048
    for bad, message in (("block_token=256", "unexpected keyword"), ("block_vocab=100", "multiple of 128")):
        with pytest.raises(C.ConfigError, match=f"train.kernel_blocks: .*{message}") as err:
            C.load(None, [f"train.kernel_blocks.{bad}"], {})
        assert err.value.exit_code == 2
