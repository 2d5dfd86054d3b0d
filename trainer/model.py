"""Qwen2 decoder in plain JAX over a nested-dict params pytree.

Pure functions, no module objects: `forward(params, cfg, ...)` is what training and sampling call, so the
params pytree is the only state and is easy to shard (trainer/sharding.py) and checkpoint (orbax).

Layers are stacked on a leading axis and run under `jax.lax.scan`: one compiled layer body instead of
`num_layers` copies, which keeps compile time flat for the 36-layer 3B model.

Params (L = num_layers, H = hidden, I = intermediate, Dq = heads*head_dim, Dkv = kv_heads*head_dim):

    embed/embedding              [V, H]
    layers/attn_norm/scale       [L, H]
    layers/q/kernel  [L, H, Dq]  layers/q/bias [L, Dq]      (k, v: Dkv; q/k/v have biases in Qwen2)
    layers/o/kernel  [L, Dq, H]
    layers/mlp_norm/scale        [L, H]
    layers/gate/kernel [L, H, I] layers/up/kernel [L, H, I] layers/down/kernel [L, I, H]
    final_norm/scale             [H]
    lm_head/kernel               [V, H]   (only when the head is not tied to the embedding)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = dict[str, Any]

# Large negative instead of -inf: a fully masked row (a left-pad query) then softmaxes to finite garbage
# rather than NaN, and NaN can never leak into gradients through a `where`.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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


@functools.partial(jax.jit, static_argnames=("cfg", "param_dtype", "std"))
def init_params(
    cfg: Qwen2Config, rng: jax.Array, param_dtype: Any = jnp.float32, std: float = 0.02
) -> Params:
    """Random init: weights normal(0, std) (HF's `initializer_range`), biases zero, norm scales one."""
    L, H, I = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size  # noqa: E741
    dq, dkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    keys = iter(jax.random.split(rng, 9))

    def normal(*shape: int) -> jax.Array:
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(param_dtype)

    def ones(*shape: int) -> jax.Array:
        return jnp.ones(shape, param_dtype)

    def zeros(*shape: int) -> jax.Array:
        return jnp.zeros(shape, param_dtype)

    params: Params = {
        "embed": {"embedding": normal(cfg.vocab_size, H)},
        "layers": {
            "attn_norm": {"scale": ones(L, H)},
            "q": {"kernel": normal(L, H, dq), "bias": zeros(L, dq)},
            "k": {"kernel": normal(L, H, dkv), "bias": zeros(L, dkv)},
            "v": {"kernel": normal(L, H, dkv), "bias": zeros(L, dkv)},
            "o": {"kernel": normal(L, dq, H)},
            "mlp_norm": {"scale": ones(L, H)},
            "gate": {"kernel": normal(L, H, I)},
            "up": {"kernel": normal(L, H, I)},
            "down": {"kernel": normal(L, I, H)},
        },
        "final_norm": {"scale": ones(H)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": normal(cfg.vocab_size, H)}
    return params


def lm_head_weight(params: Params, cfg: Qwen2Config) -> jax.Array:
    """[V, H]: the embedding table when tied, the separate head otherwise."""
    return params["embed"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"]


def positions_from_mask(attn_mask: jax.Array) -> jax.Array:
    """Left-padded rows: the first real token gets position 0; padding gets 0 too (it is masked anyway)."""
    return jnp.maximum(jnp.cumsum(attn_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


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


def _dense(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    y = x @ p["kernel"].astype(x.dtype)
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S] bool.

    Query heads are grouped onto their shared kv head with a reshape, so k/v are never repeated."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq * d)


def _qkv(cfg: Qwen2Config, x: jax.Array, p: Params, positions: jax.Array) -> tuple[jax.Array, ...]:
    """Pre-norm q/k/v projections with RoPE applied: [B, T, heads, D]."""
    b, t, _ = x.shape
    h = rms_norm(x, p["attn_norm"]["scale"], cfg.rms_norm_eps)
    q = _dense(h, p["q"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = _dense(h, p["k"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _dense(h, p["v"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta), v


def _attn_out_and_mlp(cfg: Qwen2Config, x: jax.Array, p: Params, attn: jax.Array) -> jax.Array:
    x = x + _dense(attn, p["o"])
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
    return x + _dense(jax.nn.silu(_dense(h, p["gate"])) * _dense(h, p["up"]), p["down"])


def forward(
    params: Params,
    cfg: Qwen2Config,
    tokens: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    cache: KVCache | None = None,
    dtype: Any = jnp.bfloat16,
    *,
    remat: bool = False,
) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder. tokens/positions: [B, T] int32; attn_mask: [B, T] bool (False = padding).

    Without a cache the T tokens attend causally to each other. With a cache they are written at slots
    [cache.index, cache.index + T) and attend to every valid earlier slot (prefill: T = prompt length;
    decode: T = 1). Returns the final-normed hidden states [B, T, H] in `dtype` and the updated cache.
    `remat=True` recomputes each layer's activations in the backward pass (training memory)."""
    t = tokens.shape[1]
    x = params["embed"]["embedding"][tokens].astype(dtype)
    attn_mask = attn_mask.astype(bool)

    if cache is None:
        mask = jnp.tril(jnp.ones((t, t), bool))[None] & attn_mask[:, None, :]

        def body(x: jax.Array, p: Params) -> tuple[jax.Array, None]:
            q, k, v = _qkv(cfg, x, p, positions)
            return _attn_out_and_mlp(cfg, x, p, attention(q, k, v, mask)), None

        if remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        x, _ = jax.lax.scan(body, x, params["layers"])
        return rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps), None

    if t == 1:  # a decode step: each layer's cache read once (`_decode_forward`)
        return _decode_forward(params, cfg, x, positions, attn_mask, cache, dtype)
    index = cache.index
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attn_mask, index, axis=1)
    slots = jnp.arange(valid.shape[1])
    mask = (slots[None, :] <= (index + jnp.arange(t))[:, None])[None] & valid[:, None, :]  # [B, T, S]

    # The whole cache rides in the scan carry and each layer writes only its T new slots in place;
    # emitting per-layer caches as scan outputs would copy the entire cache on every decode step.
    def cached_body(
        carry: tuple[jax.Array, ...], xs: tuple[Params, jax.Array]
    ) -> tuple[tuple[jax.Array, ...], None]:
        x, ck, cv = carry
        p, layer = xs
        q, k, v = _qkv(cfg, x, p, positions)
        at = (layer, 0, index, 0, 0)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), at)
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), at)
        layer_k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False).astype(dtype)
        layer_v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False).astype(dtype)
        return (_attn_out_and_mlp(cfg, x, p, attention(q, layer_k, layer_v, mask)), ck, cv), None

    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, k, v), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v), (params["layers"], layers))
    hidden = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
    return hidden, KVCache(k=k, v=v, valid=valid, index=index + t)


def cached_attention(
    q: jax.Array,
    ck: jax.Array,
    cv: jax.Array,
    cache_mask: jax.Array,
    k: jax.Array,
    v: jax.Array,
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


def _decode_forward(
    params: Params,
    cfg: Qwen2Config,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    cache: KVCache,
    dtype: Any,
) -> tuple[jax.Array, KVCache]:
    """The cached branch of `forward` for a decode step (x: the embedded tokens [B, T, H] in `dtype`; any T
    works, but a prefill (T = prompt length) compiles to a better-sharded program on the carried cache).

    Each layer's cache slice is a scan input, read once by `cached_attention`; the layers emit only their
    T new keys/values, written into the cache in one update after the scan (in place when the cache
    buffer is donated or a loop carry). Carrying the whole cache through the scan instead and updating it
    per layer made XLA copy and re-read each layer's slice (BENCHMARKS.md, "Decode step")."""
    t = x.shape[1]
    index = cache.index
    slots = jnp.arange(cache.valid.shape[1])
    cache_mask = cache.valid & (slots < index)[None, :]  # [B, S]: the slots written before this call
    new_mask = jnp.tril(jnp.ones((t, t), bool))[None] & attn_mask[:, None, :]  # [B, T, T]

    def body(
        x: jax.Array, xs: tuple[Params, jax.Array, jax.Array]
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        p, ck, cv = xs
        q, k, v = _qkv(cfg, x, p, positions)
        k, v = k.astype(ck.dtype).astype(dtype), v.astype(cv.dtype).astype(dtype)  # as read back from cache
        attn = cached_attention(q, ck.astype(dtype), cv.astype(dtype), cache_mask, k, v, new_mask)
        return _attn_out_and_mlp(cfg, x, p, attn), (k.astype(ck.dtype), v.astype(cv.dtype))

    x, (new_k, new_v) = jax.lax.scan(body, x, (params["layers"], cache.k, cache.v))
    at = (0, 0, index, 0, 0)
    k = jax.lax.dynamic_update_slice(cache.k, new_k, at)
    v = jax.lax.dynamic_update_slice(cache.v, new_v, at)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attn_mask, index, axis=1)
    hidden = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)
    return hidden, KVCache(k=k, v=v, valid=valid, index=index + t)


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
