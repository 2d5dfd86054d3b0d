"""Batched autoregressive sampling: one prefill, then a jitted `lax.while_loop` over single-token decode
steps against a static KV cache, stopping as soon as every row has emitted a stop token.

Prompts are left-padded (so every row's next token lands in the same cache slot) and padded further to a
length bucket, so a run compiles one program per bucket instead of one per prompt length.

Each sampled token records two log-probs:
  * `logprobs`: under the distribution actually sampled from (temperature, then top-k, then top-p,
    renormalised) -- the behaviour policy, 0 for greedy;
  * `full_logprobs`: `log_softmax(logits / temperature)` without truncation -- what the training loss
    recomputes (temperature 1 for greedy), so training can check rollout and update agree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trainer.config import RolloutConfig
from trainer.model import Params, Qwen2Config, forward, hidden_to_logits, init_cache, positions_from_mask
from trainer.sharding import BATCH_AXES, param_partition_specs


class SampleOutput(NamedTuple):
    completion: jax.Array  # [B, T] int32, pad_id after the stop token
    completion_mask: jax.Array  # [B, T] int32, 1 up to and including the stop token
    logprobs: jax.Array  # [B, T] f32, sampling distribution (0 where masked, 0 for greedy)
    full_logprobs: jax.Array  # [B, T] f32, full softmax at the temperature (0 where masked)
    lengths: jax.Array  # [B] int32, number of completion tokens (stop token included)


_DEFAULTS = RolloutConfig()  # the config declares each setting's one default; the sampler takes it over


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The one sampling-settings object, from the config to the compiled program: `programs.rollout_settings`
    builds it from `rollout.*` and `compute_dtype` (the only place the keys are read), `Sampler.sample` and
    `generate` run it, the preflight compiles it. Hashable: a static jit argument, so every field shapes
    the program. Defaults are the config's (trainer/config.py RolloutConfig)."""

    max_new_tokens: int = _DEFAULTS.max_length_sample  # rollout.max_length_sample: the decode budget
    temperature: float = _DEFAULTS.temperature  # rollout.temperature; 0 = greedy (the full eval sweep)
    top_k: int = _DEFAULTS.top_k  # rollout.top_k; 0 = off
    top_p: float = _DEFAULTS.top_p  # rollout.top_p; 1.0 = off
    prompt_bucket: int = _DEFAULTS.global_length  # rollout.global_length: prompts pad to a power of 2 >= it
    dtype: Any = jnp.bfloat16  # compute_dtype
    cache_dtype: Any = None  # the KV cache's; None = `dtype` (a bf16 cache under f32 compute drifts)

    def __post_init__(self) -> None:
        if self.cache_dtype is None:  # resolved here, so equal settings compare (and hash) equal
            object.__setattr__(self, "cache_dtype", self.dtype)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.prompt_bucket < 1:
            raise ValueError(f"prompt_bucket must be >= 1, got {self.prompt_bucket}")

    def greedy(self) -> SamplingSettings:
        """The full sweep's settings: the same budget, bucket and dtypes, argmax decoding."""
        return dataclasses.replace(self, temperature=0.0, top_k=0, top_p=1.0)


def bucket_length(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum): few distinct shapes, at most 2x padding."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [B, length] int32, mask [B, length] bool), real tokens flush right."""
    length = max(len(s) for s in seqs) if length is None else length
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for row, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit in length {length}")
        if seq:
            tokens[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = True
    return tokens, mask


def sample_token(
    logits: jax.Array, rng: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, V] f32 -> (token [B] int32, sampling log-prob [B], full-softmax log-prob [B])."""
    scaled = logits / temperature if temperature else logits  # greedy records the temperature-1 softmax
    full = jax.nn.log_softmax(scaled, axis=-1)
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return token, jnp.zeros(token.shape, jnp.float32), _take(full, token)
    if top_k == 0 and top_p >= 1.0:
        token = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
        lp = _take(full, token)
        return token, lp, lp
    # Candidates sorted by logit, descending: top_k of them, or the whole vocabulary for top-p alone.
    k = top_k if top_k else scaled.shape[-1]
    values, indices = jax.lax.top_k(scaled, k)
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)  # the top candidate always survives
    choice = jax.random.categorical(rng, values, axis=-1)
    token = _take(indices, choice).astype(jnp.int32)
    return token, _take(jax.nn.log_softmax(values, axis=-1), choice), _take(full, token)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


class _LoopState(NamedTuple):
    step: jax.Array  # next column to write
    cache: Any
    last_token: jax.Array  # [B]
    position: jax.Array  # [B] position of last_token
    done: jax.Array  # [B] bool
    out: SampleOutput


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Where the loop state lives: every per-row array (KV cache included, its batch axis is 1) split over
    the batch like the prompts, scalars replicated. Pinned at every step, so GSPMD can neither gather the
    cache nor pick another layout inside the loop, and a decode step compiled alone (the preflight) gets
    the layout the while-loop runs."""

    def spec(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
        if leaf.ndim == 0:
            return NamedSharding(mesh, PartitionSpec())
        if names[-1] in ("k", "v"):  # [L, B, S, kv_heads, head_dim]
            return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
        return NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    return jax.tree_util.tree_map_with_path(spec, state)


def _pin(state: _LoopState, mesh: Mesh | None) -> _LoopState:
    if mesh is None:
        return state
    return jax.lax.with_sharding_constraint(state, state_shardings(state, mesh))


# Matrices a decode step multiplies the (batch-split) activations by, and the axis they contract over.
_CONTRACTED = {("q", "kernel"): 1, ("k", "kernel"): 1, ("v", "kernel"): 1, ("gate", "kernel"): 1,
               ("up", "kernel"): 1}  # fmt: skip


def decode_param_shardings(params: Any, mesh: Mesh) -> Any:
    """Where the sampler's weights live: the training layout, except a matrix split along the axis the
    decode step contracts would be all-gathered at every step, so its decode copy is whole on every chip.

    On an fsdp mesh the training layout splits every matrix on its widest side: the MLP hidden, the query
    heads, the vocabulary, i.e. the tensor-parallel layout a decode step wants (each chip reads 1/n of
    them, only activations cross the links). GQA's k/v projections are narrower than the model, so fsdp
    splits their input side: gathered per step that is 2 x H x kv_heads x head_dim per layer over the
    links (72 MiB per step for Qwen2.5-3B), where a whole copy costs the same bytes from HBM, which is
    ~4x faster than a v6e chip's ICI (BENCHMARKS.md, "Decode step")."""
    specs = param_partition_specs(params, mesh)

    def place(path: tuple[Any, ...], spec: PartitionSpec) -> NamedSharding:
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)[-2:]
        axis = _CONTRACTED.get(names)
        if axis is not None and len(spec) > axis and spec[axis] is not None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def decode_params(params: Params, dtype: Any, mesh: Mesh | None = None) -> Params:
    """The weights the sampler reads, once per rollout: cast to the compute dtype outside the loop (decode
    is bound by reading them, and a cast inside the loop body would re-read the f32 copy at every step; a
    no-op when they already have it), and on a mesh laid out by `decode_param_shardings`."""
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    if mesh is None:
        return params
    return jax.lax.with_sharding_constraint(params, decode_param_shardings(params, mesh))


def _emit(
    state: _LoopState, logits: jax.Array, rng: jax.Array, stop_ids: jax.Array, pad_id: jax.Array,
    s: SamplingSettings,
) -> _LoopState:
    """Samples column `state.step` from `logits` and records it; finished rows get padding."""
    key = jax.random.fold_in(rng, state.step)
    token, lp, full_lp = sample_token(logits, key, s.temperature, s.top_k, s.top_p)
    live = ~state.done
    token = jnp.where(live, token, pad_id)
    col = state.step
    out = state.out._replace(
        completion=state.out.completion.at[:, col].set(token),
        completion_mask=state.out.completion_mask.at[:, col].set(live.astype(jnp.int32)),
        logprobs=state.out.logprobs.at[:, col].set(jnp.where(live, lp, 0.0)),
        full_logprobs=state.out.full_logprobs.at[:, col].set(jnp.where(live, full_lp, 0.0)),
    )
    done = state.done | (live & jnp.isin(token, stop_ids))
    return state._replace(step=col + 1, last_token=token, position=state.position + 1, done=done, out=out)


def prefill(
    params: Params,
    cfg: Qwen2Config,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    settings: SamplingSettings,
    mesh: Mesh | None,
) -> _LoopState:
    """The whole (bucketed) prompt at once, then the first sampled column: the decode loop's first state.

    The cache holds the prompt and every new token but the last, which is sampled and never fed back.
    `params` are already `decode_params`. The preflight compiles this very function."""
    s = settings
    batch, prompt_len = prompt_tokens.shape
    steps = s.max_new_tokens
    cache = init_cache(cfg, batch, prompt_len + steps - 1, s.cache_dtype)
    if mesh is not None:  # pin the cache to the batch split so GSPMD never gathers or replicates it
        kv = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
        cache = cache._replace(
            k=jax.lax.with_sharding_constraint(cache.k, kv), v=jax.lax.with_sharding_constraint(cache.v, kv)
        )
    positions = positions_from_mask(prompt_mask)
    hidden, cache = forward(params, cfg, prompt_tokens, positions, prompt_mask, cache, s.dtype)
    zeros_f = jnp.zeros((batch, steps), jnp.float32)
    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        last_token=prompt_tokens[:, -1],
        position=jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32) - 1,
        done=jnp.zeros((batch,), bool),
        out=SampleOutput(
            completion=jnp.full((batch, steps), pad_id, jnp.int32),
            completion_mask=jnp.zeros((batch, steps), jnp.int32),
            logprobs=zeros_f,
            full_logprobs=zeros_f,
            lengths=jnp.zeros((batch,), jnp.int32),
        ),
    )
    state = _emit(state, hidden_to_logits(params, cfg, hidden[:, -1]), rng, stop_ids, pad_id, s)
    return _pin(state, mesh)


def decode_step(
    params: Params,
    cfg: Qwen2Config,
    state: _LoopState,
    rng: jax.Array,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    settings: SamplingSettings,
    mesh: Mesh | None,
) -> _LoopState:
    """One token for every row: the body of the decode while-loop (and what the preflight compiles alone
    to measure a step: HBM bytes, collectives, estimated time)."""
    batch = state.last_token.shape[0]
    hidden, cache = forward(
        params,
        cfg,
        state.last_token[:, None],
        state.position[:, None],
        jnp.ones((batch, 1), bool),
        state.cache,
        settings.dtype,
    )
    state = state._replace(cache=cache)
    logits = hidden_to_logits(params, cfg, hidden[:, 0])
    return _pin(_emit(state, logits, rng, stop_ids, pad_id, settings), mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "mesh"))
def _generate(
    params: Params,
    cfg: Qwen2Config,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    settings: SamplingSettings,
    mesh: Mesh | None,
) -> SampleOutput:
    params = decode_params(params, settings.dtype, mesh)
    state = prefill(params, cfg, prompt_tokens, prompt_mask, rng, stop_ids, pad_id, settings, mesh)
    steps = settings.max_new_tokens

    def cond(state: _LoopState) -> jax.Array:
        return (state.step < steps) & ~jnp.all(state.done)

    def body(state: _LoopState) -> _LoopState:
        return decode_step(params, cfg, state, rng, stop_ids, pad_id, settings, mesh)

    state = jax.lax.while_loop(cond, body, state)
    return state.out._replace(lengths=jnp.sum(state.out.completion_mask, axis=-1, dtype=jnp.int32))


def generate(
    params: Params,
    cfg: Qwen2Config,
    prompt_tokens: jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray,
    rng: jax.Array,
    settings: SamplingSettings | None = None,
    *,
    stop_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    **fields: Any,
) -> SampleOutput:
    """Samples up to `settings.max_new_tokens` per left-padded prompt [B, P]; temperature 0 is greedy.

    `fields` (max_new_tokens=..., temperature=..., the names of SamplingSettings) build the settings
    when none are given: a shorthand for tests and benchmarks, with the same names and defaults. The
    prompt is left-padded further to `bucket_length(P, settings.prompt_bucket)` so that prompts of nearby
    lengths share one compiled program. With `mesh`, the KV cache is split over the batch like the
    prompts (the batch must then be a multiple of dp * fsdp)."""
    if settings is None:
        settings = SamplingSettings(**fields)
    elif fields:
        raise TypeError(f"generate: pass either settings or its fields, not both ({sorted(fields)})")
    prompt_len = prompt_tokens.shape[1]
    extra = bucket_length(prompt_len, settings.prompt_bucket) - prompt_len
    if extra:
        prompt_tokens = jnp.pad(jnp.asarray(prompt_tokens), ((0, 0), (extra, 0)), constant_values=pad_id)
        prompt_mask = jnp.pad(jnp.asarray(prompt_mask), ((0, 0), (extra, 0)), constant_values=False)
    # Stop ids are data, not part of the program: padded with -1 (never sampled) to a multiple of 4.
    slots = 4 * max(1, -(-len(stop_token_ids) // 4))
    stop = [int(t) for t in stop_token_ids] + [-1] * (slots - len(stop_token_ids))
    return _generate(
        params,
        cfg,
        jnp.asarray(prompt_tokens, jnp.int32),
        jnp.asarray(prompt_mask, bool),
        rng,
        jnp.asarray(stop, jnp.int32),
        jnp.asarray(pad_id, jnp.int32),
        settings,
        mesh,
    )
