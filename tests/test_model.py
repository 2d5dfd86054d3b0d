"""Qwen2 model: logits parity with transformers' PyTorch Qwen2ForCausalLM through our safetensors loader,
KV-cache decode == full forward, masking, and the loader's errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer import hf_io
from trainer.model import (
    Qwen2Config,
    forward,
    hidden_to_logits,
    init_cache,
    init_params,
    lm_head_weight,
    positions_from_mask,
)
from trainer.model import logits as _logits
from trainer.sampler import left_pad

HF_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
# Jitted once for the module: tests that share shapes share one compiled program.
jit_forward = jax.jit(forward, static_argnames=("cfg", "dtype", "remat"))
logits = jax.jit(_logits, static_argnames=("cfg", "dtype"))
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31, 32, 33, 34, 35]]  # ragged: left padding varies


def _save_random_hf_model(folder, tie: bool):
    """A transformers Qwen2ForCausalLM with EVERY tensor random (HF zero-inits biases and one-inits norms,
    which would hide a swapped or dropped mapping), saved with save_pretrained as safetensors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        **HF_TINY, tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}
    )
    torch.manual_seed(0 if tie else 1)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    # Two shards, so the index.json path of the loader is exercised too.
    model.save_pretrained(folder, max_shard_size="150KB")
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    torch_model = _save_random_hf_model(folder, tie=request.param)
    cfg, params = hf_io.load_model(str(folder))
    return torch_model, cfg, params, folder


def test_logits_match_transformers(hf_pair):
    import torch

    torch_model, cfg, params, folder = hf_pair
    assert (folder / "model.safetensors.index.json").exists()  # the sharded layout was really loaded
    assert cfg.tie_word_embeddings == torch_model.config.tie_word_embeddings
    assert cfg.rope_theta == 5000.0 and cfg.num_kv_heads == 2
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)

    tokens, mask = left_pad(PROMPTS, pad_id=0)
    positions = np.asarray(positions_from_mask(mask))
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()
    ours = np.asarray(logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), dtype=jnp.float32))
    # Compare real tokens only (padding rows are garbage in both). Error relative to the logit scale.
    rel_err = np.abs(ours - ref)[mask].max() / np.abs(ref[mask]).max()
    assert rel_err <= 1e-4, rel_err
    assert np.abs(ref[mask]).max() > 1.0  # a non-degenerate model: the comparison means something


def test_tied_head_is_the_embedding(hf_pair):
    _, cfg, params, _ = hf_pair
    w = lm_head_weight(params, cfg)
    assert w.shape == (cfg.vocab_size, cfg.hidden_size)
    assert (w is params["embed"]["embedding"]) == cfg.tie_word_embeddings


def test_load_onto_a_mesh(hf_pair):
    """With a mesh, every tensor goes straight to its fsdp shards and holds the same values."""
    from trainer.sharding import make_mesh

    _, cfg, params, folder = hf_pair
    _, sharded = hf_io.load_model(str(folder), mesh=make_mesh("1,8,1"))
    embed = sharded["embed"]["embedding"]
    assert len(embed.addressable_shards) == 8
    assert embed.addressable_shards[0].data.shape == (cfg.vocab_size // 8, cfg.hidden_size)
    jax.tree.map(np.testing.assert_array_equal, sharded, params)


@pytest.fixture(scope="module")
def tiny():
    cfg = Qwen2Config.tiny(vocab_size=256)
    return cfg, init_params(cfg, jax.random.key(0), std=0.1)


def test_kv_cache_decode_equals_full_forward(tiny):
    """Prefill a ragged left-padded batch, then decode the rest one token at a time: the logits at every
    real position equal the uncached forward over the whole sequence."""
    cfg, params = tiny
    tokens, mask = left_pad([p + [40 + i, 50 + i, 60 + i] for i, p in enumerate(PROMPTS)], pad_id=0)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    positions = positions_from_mask(mask)
    full_hidden, _ = jit_forward(params, cfg, tokens, positions, mask, dtype=jnp.float32)
    full = hidden_to_logits(params, cfg, full_hidden)

    prefill = tokens.shape[1] - 3
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1] + 2, dtype=jnp.float32)
    h, cache = jit_forward(
        params, cfg, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache, jnp.float32
    )
    pieces = [h]
    for t in range(prefill, tokens.shape[1]):
        sl = slice(t, t + 1)
        h, cache = jit_forward(params, cfg, tokens[:, sl], positions[:, sl], mask[:, sl], cache, jnp.float32)
        pieces.append(h)
    assert int(cache.index) == tokens.shape[1]
    cached = hidden_to_logits(params, cfg, jnp.concatenate(pieces, axis=1))
    np.testing.assert_allclose(np.asarray(cached)[mask], np.asarray(full)[mask], atol=2e-5, rtol=1e-5)


def test_padding_is_invisible(tiny):
    """Changing what sits under the padding, or how much padding there is, leaves real-token outputs alone."""
    cfg, params = tiny
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    base = logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    junk = np.where(mask, tokens, 199)
    np.testing.assert_allclose(
        logits(params, cfg, jnp.asarray(junk), jnp.asarray(mask))[mask], base[mask], atol=1e-5
    )
    more_tokens, more_mask = left_pad(PROMPTS, pad_id=0, length=tokens.shape[1] + 4)
    more = logits(params, cfg, jnp.asarray(more_tokens), jnp.asarray(more_mask))
    np.testing.assert_allclose(more[:, 4:][mask], base[mask], atol=1e-5)
    assert np.isfinite(np.asarray(more)).all()  # fully masked pad rows give finite values, never NaN


def test_bf16_compute_with_f32_params_stays_close(tiny):
    cfg, params = tiny
    tokens, mask = (jnp.asarray(a) for a in left_pad(PROMPTS, pad_id=0))
    f32 = np.asarray(logits(params, cfg, tokens, mask, dtype=jnp.float32))[np.asarray(mask)]
    bf16 = np.asarray(logits(params, cfg, tokens, mask, dtype=jnp.bfloat16))[np.asarray(mask)]
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert 0 < np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()  # rounded, not broken
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_remat_wraps_each_layer_in_a_checkpoint(tiny):
    """remat=True really puts the layer body under jax.checkpoint (the gradient itself is JAX's business)."""
    cfg, params = tiny
    tokens, mask = (jnp.asarray(a) for a in left_pad(PROMPTS, pad_id=0))
    pos = positions_from_mask(mask)

    def grad_jaxpr(remat: bool) -> str:
        loss = lambda p: forward(p, cfg, tokens, pos, mask, dtype=jnp.float32, remat=remat)[0].sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(params))

    with_remat, without = grad_jaxpr(True), grad_jaxpr(False)
    assert "checkpoint" in with_remat or "remat" in with_remat
    assert "checkpoint" not in without and "remat" not in without


def test_from_hf_reads_both_rope_spellings():
    v4 = {**HF_TINY, "rope_theta": 1e6, "tie_word_embeddings": True}
    v5 = {**HF_TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert Qwen2Config.from_hf(v4).rope_theta == Qwen2Config.from_hf(v5).rope_theta == 1e6
    assert Qwen2Config.from_hf(v4).head_dim == 16
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        Qwen2Config.from_hf({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_loader_errors_are_one_line(tmp_path):
    with pytest.raises(hf_io.CheckpointError, match="no such folder"):
        hf_io.resolve_checkpoint(str(tmp_path / "missing"))
    # HF_HUB_OFFLINE=1 (conftest): an uncached hub id fails at once with a hint.
    with pytest.raises(hf_io.CheckpointError) as err:
        hf_io.resolve_checkpoint("grpoctl-test/not-a-model")
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({**HF_TINY, "tie_word_embeddings": True}))
    with pytest.raises(hf_io.CheckpointError, match="no \\*.safetensors"):
        hf_io.load_model(str(tmp_path))


def test_f32_greedy_decode_equals_transformers_generate(hf_pair):
    """20 greedy tokens through our KV-cache sampler == transformers' generate(do_sample=False) on an f32
    model, and the log-prob of each token agrees to 1e-4. The sampler is called without a cache dtype: the
    cache must follow the compute dtype. A bfloat16 cache under f32 compute rounds every key and value
    (log-probs off by ~1e-3 here; on larger models greedy tokens drift within a few steps)."""
    import torch

    from trainer.sampler import generate

    torch_model, cfg, params, _ = hf_pair
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        ref = torch_model.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=0, eos_token_id=None,
            return_dict_in_generate=True, output_logits=True,
        )
    ref_tokens = ref.sequences[:, tokens.shape[1]:]
    ref_logp = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in ref.logits], dim=1)
    ref_logp = torch.gather(ref_logp, 2, ref_tokens[..., None])[..., 0].numpy()
    out = generate(params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=20, temperature=0.0,
                   dtype=jnp.float32)
    assert ref_tokens.shape == (len(PROMPTS), 20)
    np.testing.assert_array_equal(np.asarray(out.completion), ref_tokens.numpy())
    np.testing.assert_allclose(np.asarray(out.full_logprobs), ref_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_params_dict_is_the_nnx_modules_state_and_every_axis_is_named(tie):
    """The dict the trainer holds round-trips through the NNX modules (nnx.merge -> nnx.state), and the
    sharding metadata names every axis of every leaf (sharding.py reads nothing else)."""
    from flax import nnx

    from trainer.model import DecoderLayer, Qwen2, module, param_axes

    cfg = Qwen2Config.tiny(tie_word_embeddings=tie)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))  # structure only: no compile
    model = module(params, cfg)
    assert isinstance(model, Qwen2) and isinstance(model.layers, DecoderLayer)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert state["layers"]["attn"]["q"]["kernel"] is params["layers"]["q"]["kernel"]
    assert state["layers"]["mlp"]["down"]["kernel"] is params["layers"]["down"]["kernel"]
    axes = param_axes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple))
    for (path, leaf), names in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
        strict=True,
    ):
        assert len(names) == leaf.ndim, path
        assert (names[0] == "layers") == (path[0].key == "layers"), path
