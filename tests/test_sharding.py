"""Mesh parsing, partition rules at Qwen2.5-3B shapes, and an 8-device fsdp mesh computing exactly what one
device computes (conftest gives 8 CPU devices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from trainer.model import Qwen2Config, forward, hidden_to_logits, init_params, positions_from_mask
from trainer.sampler import generate, left_pad
from trainer.sharding import (
    batch_divisor,
    make_mesh,
    param_partition_specs,
    parse_mesh_shape,
    shard_batch,
    shard_params,
)

QWEN25_3B = Qwen2Config(
    vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_layers=36,
    num_heads=16, num_kv_heads=2, head_dim=128, tie_word_embeddings=True,
)  # fmt: skip


def test_parse_mesh_shape():
    assert parse_mesh_shape("auto", 8) == (1, 8, 1)
    assert parse_mesh_shape("auto", 16, n_processes=4) == (4, 4, 1)  # dp over hosts, fsdp within
    assert parse_mesh_shape("1,4,2", 8) == (1, 4, 2)
    with pytest.raises(ValueError, match="needs 12 devices but 8"):
        parse_mesh_shape("2,2,3", 8)
    with pytest.raises(ValueError, match="mesh_shape: expected"):
        parse_mesh_shape("8", 8)


def test_make_mesh_uses_all_devices():
    mesh = make_mesh("auto")
    assert dict(mesh.shape) == {"dp": 1, "fsdp": 8, "tp": 1} and batch_divisor(mesh) == 8
    assert dict(make_mesh("2,2,2").shape) == {"dp": 2, "fsdp": 2, "tp": 2}


def _specs(mesh_shape: str):
    abstract = jax.eval_shape(lambda: init_params(QWEN25_3B, jax.random.key(0)))
    mesh = make_mesh(mesh_shape)
    return abstract, param_partition_specs(abstract, mesh), mesh


def test_fsdp_rules_at_3b_shapes():
    abstract, specs, _ = _specs("1,8,1")
    assert specs["embed"]["embedding"] == P("fsdp", None)  # vocab 151936 = 8 * 18992
    assert specs["layers"]["q"]["kernel"] == P(None, None, "fsdp")
    assert specs["layers"]["down"]["kernel"] == P(None, "fsdp", None)  # the 11008 side
    assert specs["final_norm"]["scale"] == P("fsdp")
    _assert_valid(abstract, specs, {"fsdp": 8, "tp": 1})


def test_tp_rules_split_heads_and_mlp():
    abstract, specs, _ = _specs("1,2,4")
    layers = specs["layers"]
    assert layers["q"]["kernel"] == P(None, "fsdp", "tp")  # column-parallel: heads on tp
    assert layers["q"]["bias"] == P(None, "tp")
    assert layers["o"]["kernel"] == P(None, "tp", "fsdp")  # row-parallel
    assert layers["gate"]["kernel"] == P(None, "fsdp", "tp")
    assert layers["down"]["kernel"] == P(None, "tp", "fsdp")
    assert specs["embed"]["embedding"] == P("tp", "fsdp")
    _assert_valid(abstract, specs, {"fsdp": 2, "tp": 4})


def _assert_valid(abstract, specs, sizes):
    """Every sharded dimension divides; the stacked layer axis (scanned) is never split; big tensors shard."""
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, spec), leaf in zip(flat_specs, jax.tree.leaves(abstract), strict=True):
        for dim, axis in zip(leaf.shape, spec, strict=False):
            assert axis is None or dim % sizes[axis] == 0, (path, spec)
        if path[0].key == "layers":
            assert spec[0] is None, path
        if leaf.size > 1_000_000:
            assert "fsdp" in spec, path


@pytest.fixture(scope="module")
def tiny():
    cfg = Qwen2Config.tiny(vocab_size=256)
    return cfg, init_params(cfg, jax.random.key(0), std=0.2)


def test_fsdp8_mesh_matches_one_device(tiny):
    """Params split 8 ways (fsdp=8), batch split 8 ways: hidden states and greedy samples equal the
    single-device run."""
    cfg, params = tiny
    prompts = [[i + 1] * (1 + i % 5) + [40 + i] for i in range(8)]
    steps = 4
    width = max(map(len, prompts)) + steps  # one shape for every single-device forward below
    tokens, mask = left_pad(prompts, pad_id=0, length=width)
    fwd = jax.jit(lambda p, t, m: forward(p, cfg, t, positions_from_mask(m), m, dtype=jnp.float32)[0])
    expected = fwd(params, jnp.asarray(tokens), jnp.asarray(mask))

    mesh = make_mesh("1,8,1")
    sharded = shard_params(params, mesh)
    q = sharded["layers"]["q"]["kernel"]
    assert q.addressable_shards[0].data.shape == (cfg.num_layers, cfg.hidden_size, q.shape[2] // 8)
    batch = shard_batch({"tokens": tokens, "mask": mask}, mesh)
    assert (
        len(batch["tokens"].addressable_shards) == 8
        and batch["tokens"].addressable_shards[0].data.shape[0] == 1
    )
    got = fwd(sharded, batch["tokens"], batch["mask"])
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(expected)[mask], atol=2e-5, rtol=1e-5)

    # Greedy decode on the mesh == argmax of the single-device full forward, step by step.
    eight = generate(
        sharded, cfg, batch["tokens"], batch["mask"], jax.random.key(0), max_new_tokens=steps,
        temperature=0.0, dtype=jnp.float32, cache_dtype=jnp.float32, mesh=mesh,
    )  # fmt: skip
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        t, m = left_pad(seqs, pad_id=0, length=width)
        last = hidden_to_logits(params, cfg, fwd(params, jnp.asarray(t), jnp.asarray(m))[:, -1])
        seqs = [s + [int(x)] for s, x in zip(seqs, jnp.argmax(last, axis=-1), strict=True)]
    np.testing.assert_array_equal(np.asarray(eight.completion), np.array([s[-steps:] for s in seqs]))
