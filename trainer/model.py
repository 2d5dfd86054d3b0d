"""Qwen2 decoder as Flax NNX modules, driven through a plain nested-dict params pytree.

The modules (`Attention`, `MLP`, `DecoderLayer`, `Qwen2`) hold the weights and the math. The rest of the
trainer (sampler, loss kernels, optimizer, checkpoints, HF loader, sharding) works on the state pytree as a
pure dict, so the jit boundaries are `nnx.split` / `nnx.merge`: `forward(params, cfg, ...)` merges the
module graph with `params` inside the trace and calls it; `init_params` builds the modules and returns
their state as that dict. Nothing outside this file handles module objects.

Layers are created with `nnx.vmap` (stacked on a leading axis) and run under `jax.lax.scan`: one compiled
layer body instead of `num_layers` copies, which keeps compile time flat for the 36-layer 3B model.

Every weight names the logical role of each of its axes (`out_sharding` metadata: `vocab`, `embed`,
`heads`, `mlp`, `layers`); trainer/sharding.py maps those names onto the device mesh (`param_axes`).

Params (L = num_layers, H = hidden, I = intermediate, Dq = heads*head_dim, Dkv = kv_heads*head_dim):

    embed/embedding              [V, H]
    layers/attn_norm/scale       [L, H]
    layers/q/kernel  [L, H, Dq]  layers/q/bias [L, Dq]      (k, v: Dkv; q/k/v have biases in Qwen2)
    layers/o/kernel  [L, Dq, H]
    layers/mlp_norm/scale        [L, H]
    layers/gate/kernel [L, H, I] layers/up/kernel [L, H, I] layers/down/kernel [L, I, H]
    final_norm/scale             [H]
    lm_head/kernel               [V, H]   (only when the head is not tied to the embedding)

The dict is the module state with the layer's `attn` / `mlp` sub-module level folded away (`_fold`), so
checkpoints, HF name maps and sharding tests written against the functional model keep their keys.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Params = dict[str, Any]

# Large negative instead of -inf: a fully masked row (a left-pad query) then softmaxes to finite garbage
# rather than NaN, and NaN can never leak into gradients through a `where`.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Logical axis names carried by every weight (trainer/sharding.py gives them mesh axes).
VOCAB, EMBED, HEADS, MLP_AXIS, LAYERS = "vocab", "embed", "heads", "mlp", "layers"
# The layer's sub-modules whose weights sit directly under `layers/` in the params dict.
_FOLDED = ("attn", "mlp")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Qwen2Config:
        """Reads a HF `config.json` dict (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r} (only the default RoPE is implemented)")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    @classmethod
    def tiny(cls, vocab_size: int = 512, **overrides: Any) -> Qwen2Config:
        """A CPU-sized config with every feature of the real one (GQA 4:2, biases, tied head)."""
        base = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10_000.0,
        )
        return cls(**{**base, **overrides})


class KVCache(NamedTuple):
    """Static preallocated cache. Slot s of every row holds the token written at step s (left-padded rows
    hold padding in their first slots); `valid` marks the slots that hold real tokens."""

    k: jax.Array  # [L, B, S, kv_heads, head_dim]
    v: jax.Array  # [L, B, S, kv_heads, head_dim]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32: the next slot to write


def init_cache(cfg: Qwen2Config, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------------------------- modules


@dataclasses.dataclass(frozen=True)
class _Init:
    """How fresh weights are drawn (HF's `initializer_range`); not kept on the modules, so the module
    graph (and with it `forward`'s trace) does not depend on it."""

    rngs: nnx.Rngs
    param_dtype: Any = jnp.float32
    std: float = 0.02

    def normal(self, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
        value = self.std * jax.random.normal(self.rngs.params(), shape, jnp.float32)
        return _param(value.astype(self.param_dtype), axes)

    def const(self, fill: float, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
        return _param(jnp.full(shape, fill, self.param_dtype), axes)


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    # eager_sharding=False: the names are logical, not mesh axes; trainer/sharding.py places the arrays.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
    """x @ kernel (+ bias), computed in the input's dtype (bf16 activations over f32 master weights)."""

    def __init__(
        self, din: int, dout: int, axes: tuple[str | None, str | None], init: _Init, bias: bool = False
    ):
        self.kernel = init.normal((din, dout), axes)
        if bias:
            self.bias = init.const(0.0, (dout,), axes[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        return y + self.bias[...].astype(x.dtype) if hasattr(self, "bias") else y


class RMSNorm(nnx.Module):
    """HF Qwen2's RMSNorm: normalize in f32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, init: _Init):
        self.eps = eps
        self.scale = init.const(1.0, (dim,), (EMBED,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v biases and RoPE. Split in two halves (`qkv`, `out`) so the
    KV-cache path can write k/v into the cache between them (`_cached_layers`)."""

    def __init__(self, cfg: Qwen2Config, init: _Init):
        self.cfg = cfg
        h, dq, dkv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q = Dense(h, dq, (EMBED, HEADS), init, bias=True)
        self.k = Dense(h, dkv, (EMBED, HEADS), init, bias=True)
        self.v = Dense(h, dkv, (EMBED, HEADS), init, bias=True)
        self.o = Dense(dq, h, (HEADS, EMBED), init)

    def qkv(self, h: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Normed input [B, T, H] -> q [B, T, heads, D], k and v [B, T, kv_heads, D], RoPE applied."""
        cfg, (b, t, _) = self.cfg, h.shape
        q = self.q(h).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        return checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")

    def out(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        return self.o(attention(q, k, v, mask))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2Config, init: _Init):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate = Dense(h, i, (EMBED, MLP_AXIS), init)
        self.up = Dense(h, i, (EMBED, MLP_AXIS), init)
        self.down = Dense(i, h, (MLP_AXIS, EMBED), init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Qwen2Config, init: _Init):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, init)
        self.attn = Attention(cfg, init)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, init)
        self.mlp = MLP(cfg, init)

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.attn.qkv(self.attn_norm(x), positions)

    def finish(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """The rest of the block once k/v (this step's, or the cache's) are known."""
        x = x + self.attn.out(q, k, v, mask)
        return x + self.mlp(self.mlp_norm(x))

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        return self.finish(x, *self.qkv(x, positions), mask)


class Embed(nnx.Module):
    """The [V, H] token table (also the LM head when the head is tied)."""

    def __init__(self, cfg: Qwen2Config, init: _Init):
        self.embedding = init.normal((cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.embedding[...][tokens]


class LMHead(nnx.Module):
    """An untied [V, H] output head; applied by `hidden_to_logits` (or fused into the loss kernels)."""

    def __init__(self, cfg: Qwen2Config, init: _Init):
        self.kernel = init.normal((cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED))


class Qwen2(nnx.Module):
    def __init__(self, cfg: Qwen2Config, init: _Init):
        self.cfg = cfg
        self.embed = Embed(cfg, init)

        # One DecoderLayer per layer, its weights stacked on a leading `layers` axis: each layer draws its
        # own keys (split_rngs) and the sharding metadata gains the `layers` name at axis 0.
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def stacked(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dataclasses.replace(init, rngs=rngs))

        self.layers = stacked(init.rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, init)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg, init)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attn_mask: jax.Array,
        cache: KVCache | None,
        dtype: Any,
        remat: bool | str,
    ) -> tuple[jax.Array, KVCache | None]:
        x = self.embed(tokens).astype(dtype)
        attn_mask = attn_mask.astype(bool)
        layer_def, layer_state = nnx.split(self.layers)
        if cache is None:
            x = _layers(layer_def, layer_state, x, positions, attn_mask, remat)
        elif x.shape[1] == 1:  # a decode step: each layer's cache read once
            x, cache = _decode_layers(layer_def, layer_state, x, positions, attn_mask, cache, dtype)
        else:
            x, cache = _cached_layers(layer_def, layer_state, x, positions, attn_mask, cache, dtype)
        return self.final_norm(x), cache


def _layers(
    layer_def: nnx.GraphDef[DecoderLayer],
    layer_state: nnx.State,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    remat: bool | str,
) -> jax.Array:
    """Uncached: the T tokens attend causally to each other, one scanned layer body."""
    mask = CausalMask(attn_mask)
    gather = _fsdp_gather(positions, x.dtype)

    def body(x: jax.Array, state: nnx.State) -> tuple[jax.Array, None]:
        x, state = gather(x, state)
        return nnx.merge(layer_def, state)(x, positions, mask), None

    if remat:
        body = jax.checkpoint(body, policy=remat_policy(remat))
    x, _ = jax.lax.scan(body, x, layer_state)
    return x


# train.remat_policy (trainer/config.py declares the key and its values): what a remat'd layer keeps for
# the backward pass instead of recomputing it. Names are tagged with checkpoint_name in the layer code.
REMAT_POLICIES: dict[str, Any] = {
    # Only each layer's input (the scan carry): the whole layer is recomputed in the backward pass.
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    # Every weight matmul's output (q/k/v/o, gate/up/down): only elementwise work and attention recomputed.
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The attention block's q/k/v and context (the attention's inputs and output): the backward recomputes
    # the MLP and the attention probabilities, not the q/k/v projections or the context.
    "save_attention": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_context"),
    # The weight matmuls' outputs as dots_with_no_batch_dims_saveable, kept in host memory, not HBM.
    "offload_dots_to_host": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def remat_policy(remat: bool | str) -> Any:
    """True -> nothing_saveable (the default); a name -> that policy of REMAT_POLICIES."""
    return REMAT_POLICIES["nothing_saveable" if remat is True else remat]


def _fsdp_gather(positions: jax.Array, dtype: Any) -> Any:
    """FSDP for the training forward: each layer's weights, cast to the compute dtype, gathered whole, and
    the activations kept split over the batch axes. Left alone, GSPMD serves the fsdp-sharded weights by
    all-gathering the ACTIVATIONS of the whole micro-batch (several times a layer, and their gradients
    back): at 3B on a v6e-8 that moved ~790 GB per chip per update step, ~10x what gathering the bf16
    weights moves. Only on a mesh with an fsdp axis and no tp axis (tp keeps GSPMD's own choices)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(jax.typeof(positions).sharding, "mesh", None)
    shape = {} if mesh is None or mesh.empty else dict(mesh.shape)
    if shape.get("fsdp", 1) == 1 or shape.get("tp", 1) != 1:
        return lambda x, state: (x, state)
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("dp", "fsdp")))

    def weight(w: jax.Array) -> jax.Array:
        w = w.astype(dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w  # the layers use it as dtype
        return jax.lax.with_sharding_constraint(w, whole)

    def gather(x: jax.Array, state: nnx.State) -> tuple[jax.Array, nnx.State]:
        if x.shape[0] % (shape.get("dp", 1) * shape["fsdp"]):
            return x, state
        return jax.lax.with_sharding_constraint(x, rows), jax.tree.map(weight, state)

    return gather


def _cached_layers(
    layer_def: nnx.GraphDef[DecoderLayer],
    layer_state: nnx.State,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    cache: KVCache,
    dtype: Any,
) -> tuple[jax.Array, KVCache]:
    """KV-cache path of a prefill: the T prompt tokens are written at slots [cache.index, cache.index + T)
    and attend to every valid earlier slot (a decode step, T = 1, takes `_decode_layers`)."""
    t = x.shape[1]
    index = cache.index
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attn_mask, index, axis=1)
    slots = jnp.arange(valid.shape[1])
    mask = (slots[None, :] <= (index + jnp.arange(t))[:, None])[None] & valid[:, None, :]  # [B, T, S]

    # The whole cache rides in the scan carry and each layer writes only its T new slots in place;
    # emitting per-layer caches as scan outputs would copy the entire cache on every decode step.
    def body(
        carry: tuple[jax.Array, ...], xs: tuple[nnx.State, jax.Array]
    ) -> tuple[tuple[jax.Array, ...], None]:
        x, ck, cv = carry
        state, layer_index = xs
        layer = nnx.merge(layer_def, state)
        q, k, v = layer.qkv(x, positions)
        at = (layer_index, 0, index, 0, 0)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
        layer_k = jax.lax.dynamic_index_in_dim(ck, layer_index, keepdims=False).astype(dtype)
        layer_v = jax.lax.dynamic_index_in_dim(cv, layer_index, keepdims=False).astype(dtype)
        return (layer.finish(x, q, layer_k, layer_v, mask), ck, cv), None

    layers = jnp.arange(cache.k.shape[0], dtype=jnp.int32)
    (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (layer_state, layers))
    return x, KVCache(k=k, v=v, valid=valid, index=index + t)


def cached_attention(
    q: jax.Array, ck: jax.Array, cv: jax.Array, cache_mask: jax.Array, k: jax.Array, v: jax.Array,
    new_mask: jax.Array,
) -> jax.Array:
    """Grouped-query attention of T new tokens over the cache as it was before them plus themselves, as
    one softmax over both key sets. q, k, v: [B, T, heads, D]; ck, cv: [B, S, Hkv, D] (one layer's cache,
    read once, never copied or rewritten here); cache_mask: [B, S]; new_mask: [B, T, T] bool.

    The new tokens' keys/values are attended separately rather than written into the cache first: a
    decode step then reads each layer's cache exactly once and writes only its new slot afterwards."""
    b, t, hq, d = q.shape
    hkv = ck.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    old = jnp.einsum("btkgd,bskd->bkgts", q, ck, preferred_element_type=jnp.float32) * scale
    old = jnp.where(cache_mask[:, None, None, None, :], old, _MASK_VALUE)
    new = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    new = jnp.where(new_mask[:, None, None], new, _MASK_VALUE)
    top = jnp.maximum(jnp.max(old, axis=-1, keepdims=True), jnp.max(new, axis=-1, keepdims=True))
    old, new = jnp.exp(old - top), jnp.exp(new - top)
    total = jnp.sum(old, axis=-1, keepdims=True) + jnp.sum(new, axis=-1, keepdims=True)
    old, new = (old / total).astype(cv.dtype), (new / total).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", old, cv, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bkgts,bskd->btkgd", new, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype).reshape(b, t, hq * d)


def _decode_layers(
    layer_def: nnx.GraphDef[DecoderLayer],
    layer_state: nnx.State,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    cache: KVCache,
    dtype: Any,
) -> tuple[jax.Array, KVCache]:
    """KV-cache path of a decode step (any T works; a prefill compiles to a better-sharded program on
    `_cached_layers`' carried cache, BENCHMARKS.md "Decode step").

    Each layer's cache slice is a scan input, read once by `cached_attention`; the layers emit only their
    T new keys/values, written into the cache in one update after the scan (in place when the cache
    buffer is donated or a loop carry). Carrying the whole cache through the scan and updating it per
    layer made XLA copy the whole cache into another layout and back at every decode step."""
    t = x.shape[1]
    index = cache.index
    slots = jnp.arange(cache.valid.shape[1])
    cache_mask = cache.valid & (slots < index)[None, :]  # [B, S]: the slots written before this call
    new_mask = jnp.tril(jnp.ones((t, t), bool))[None] & attn_mask[:, None, :]  # [B, T, T]

    def body(
        x: jax.Array, xs: tuple[nnx.State, jax.Array, jax.Array]
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        state, ck, cv = xs
        layer = nnx.merge(layer_def, state)
        q, k, v = layer.qkv(x, positions)
        k, v = k.astype(ck.dtype).astype(dtype), v.astype(cv.dtype).astype(dtype)  # as read back from cache
        attn = cached_attention(q, ck.astype(dtype), cv.astype(dtype), cache_mask, k, v, new_mask)
        x = x + layer.attn.o(attn)
        return x + layer.mlp(layer.mlp_norm(x)), (k.astype(ck.dtype), v.astype(cv.dtype))

    x, (new_k, new_v) = jax.lax.scan(body, x, (layer_state, cache.k, cache.v))
    at = (0, 0, index, 0, 0)
    k = jax.lax.dynamic_update_slice(cache.k, new_k, at)
    v = jax.lax.dynamic_update_slice(cache.v, new_v, at)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attn_mask, index, axis=1)
    return x, KVCache(k=k, v=v, valid=valid, index=index + t)

# ------------------------------------------------------------------------ the state pytree <-> modules


def _fold(state: Params) -> Params:
    """Module state -> params dict: `layers/attn/q/...` becomes `layers/q/...` (see the module doc)."""
    layers = {k: v for k, v in state["layers"].items() if k not in _FOLDED}
    for group in _FOLDED:
        layers.update(state["layers"][group])
    return {**state, "layers": layers}


@functools.cache
def _abstract(cfg: Qwen2Config) -> tuple[nnx.GraphDef[Qwen2], nnx.State]:
    """The module graph and its abstract state for `cfg` (no arrays allocated)."""
    model = nnx.eval_shape(lambda: Qwen2(cfg, _Init(nnx.Rngs(params=0))))
    return nnx.split(model)


def _unfold(params: Params, cfg: Qwen2Config) -> Params:
    """Params dict -> module state: the inverse of `_fold`, grouping by the module's own layout."""
    layer_state = _abstract(cfg)[1]["layers"]
    layers = {k: v for k, v in params["layers"].items() if k in layer_state}
    for group in _FOLDED:
        layers[group] = {k: params["layers"][k] for k in layer_state[group]}
    return {**params, "layers": layers}


def module(params: Params, cfg: Qwen2Config) -> Qwen2:
    """The Qwen2 module over `params` (arrays or tracers): `nnx.merge` of the graph and the state."""
    return nnx.merge(_abstract(cfg)[0], _unfold(params, cfg))


def param_axes(cfg: Qwen2Config | None = None) -> Params:
    """The params dict's tree with each leaf's logical axis names, e.g. layers/q/kernel ->
    ('layers', 'embed', 'heads'): the sharding metadata on the module's weights. The names do not
    depend on sizes, so without `cfg` a tiny untied config (which has every leaf) answers."""
    cfg = cfg or Qwen2Config.tiny(tie_word_embeddings=False)
    state = _abstract(cfg)[1]
    axes = jax.tree.map(
        lambda v: v.get_metadata()["out_sharding"], state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return _fold(nnx.to_pure_dict(axes))


@functools.partial(jax.jit, static_argnames=("cfg", "param_dtype", "std"))
def init_params(
    cfg: Qwen2Config, rng: jax.Array, param_dtype: Any = jnp.float32, std: float = 0.02
) -> Params:
    """Random init: weights normal(0, std) (HF's `initializer_range`), biases zero, norm scales one."""
    model = Qwen2(cfg, _Init(nnx.Rngs(params=rng), param_dtype, std))
    return _fold(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------- what the trainer calls


def lm_head_weight(params: Params, cfg: Qwen2Config) -> jax.Array:
    """[V, H]: the embedding table when tied, the separate head otherwise."""
    return params["embed"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"]


def positions_from_mask(attn_mask: jax.Array) -> jax.Array:
    """Left-padded rows: the first real token gets position 0; padding gets 0 too (it is masked anyway)."""
    return jnp.maximum(jnp.cumsum(attn_mask.astype(jnp.int32), axis=-1) - 1, 0)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, heads, D]; positions: [B, T]. Angles in f32 (positions reach 32k)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class CausalMask(NamedTuple):
    """The training forward's mask, kept implicit: causal over the T tokens, keys at padding masked."""

    valid: jax.Array  # [B, T] bool (False = padding)

    def dense(self) -> jax.Array:
        t = self.valid.shape[1]
        return jnp.tril(jnp.ones((t, t), bool))[None] & self.valid[:, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | CausalMask) -> jax.Array:
    """Grouped-query attention. q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S] bool, or a
    CausalMask (then, lowered for TPU, the Pallas flash-attention kernels: no [T, S] scores in HBM).

    Query heads are grouped onto their shared kv head with a reshape, so k/v are never repeated."""
    if isinstance(mask, CausalMask):
        if q.shape[1] % FLASH_BLOCK or q.shape[-1] % 128:  # the kernels' tiling; tiny test shapes
            return attention(q, k, v, mask.dense())
        dense = lambda q, k, v, valid: attention(q, k, v, CausalMask(valid).dense())
        return jax.lax.platform_dependent(q, k, v, mask.valid, tpu=flash_attention, default=dense)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return checkpoint_name(out.reshape(b, t, hq * d), "attn_context")


FLASH_BLOCK = 128  # the flash kernels' default tile (BlockSizes.get_default); T must be a multiple


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Causal attention with padded keys masked, by jax's Pallas TPU flash-attention kernels, per device on
    its own rows (a Pallas kernel is opaque to GSPMD, which would gather every row to every device).

    Padding is a segment of its own (segment id 0): real queries see only real keys, as with the dense
    mask; a padding query sees padding keys instead of real ones, which changes nothing the loss reads
    (its position carries no loss and no later real query attends to it). k/v heads are repeated to the
    query heads (the kernels take one kv head per query head)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    from trainer.kernels.mesh import token_axes, token_mesh

    def local(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
        b, t, hq, d = q.shape
        group = hq // k.shape[2]
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, D] -> [B, H, T, D]
        kk, vv = (heads_first(jnp.repeat(x, group, axis=2)) for x in (k, v))
        seg = valid.astype(jnp.int32)
        out = fa.flash_attention(
            heads_first(q), kk, vv, segment_ids=fa.SegmentIds(seg, seg), causal=True, sm_scale=d**-0.5
        )
        return checkpoint_name(jnp.swapaxes(out, 1, 2).reshape(b, t, hq * d), "attn_context")

    mesh = token_mesh(valid)
    axes = token_axes(mesh, valid.shape[0])
    if not axes:
        return local(q, k, v, valid)
    rows = jax.sharding.PartitionSpec(axes)
    per_device = jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows, check_vma=False)
    return per_device(q, k, v, valid)


def forward(
    params: Params,
    cfg: Qwen2Config,
    tokens: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    cache: KVCache | None = None,
    dtype: Any = jnp.bfloat16,
    *,
    remat: bool | str = False,
) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder. tokens/positions: [B, T] int32; attn_mask: [B, T] bool (False = padding).

    Without a cache the T tokens attend causally to each other. With a cache they are written at slots
    [cache.index, cache.index + T) and attend to every valid earlier slot (prefill: T = prompt length;
    decode: T = 1). Returns the final-normed hidden states [B, T, H] in `dtype` and the updated cache.
    `remat=True` recomputes each layer's activations in the backward pass (training memory); a
    REMAT_POLICIES name picks what each layer keeps instead."""
    return module(params, cfg)(tokens, positions, attn_mask, cache, dtype, remat)


def logits(
    params: Params,
    cfg: Qwen2Config,
    tokens: jax.Array,
    attn_mask: jax.Array,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Full [B, T, V] f32 logits of an uncached forward; a reference for tests, not for the training loss."""
    hidden, _ = forward(params, cfg, tokens, positions_from_mask(attn_mask), attn_mask, dtype=dtype)
    return hidden_to_logits(params, cfg, hidden)


def hidden_to_logits(params: Params, cfg: Qwen2Config, hidden: jax.Array) -> jax.Array:
    w = lm_head_weight(params, cfg).astype(hidden.dtype)
    return jnp.einsum("...h,vh->...v", hidden, w, preferred_element_type=jnp.float32)
