"""Host side of sampling: problems -> chat prompts -> the jitted sampler -> completion tokens and texts.

Used by training (n samples per prompt, temperature) and evaluation (greedy). With several processes each
one passes its own rows (`sharding.shard_batch`) and reads back only its own rows (`local_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from trainer import sharding
from trainer.data import Problem
from trainer.model import Qwen2Config
from trainer.sampler import SamplingSettings, bucket_length, generate, left_pad
from trainer.tokenizer import decode_batch, encode_prompts, pad_token_id, stop_token_ids


@dataclasses.dataclass
class Rollout:
    """This process's rows: prompts [B, P] (left-padded), completions [B, G], and their texts."""

    problems: list[Problem]  # one per row (each prompt repeated n times, contiguously)
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    completion: np.ndarray
    completion_mask: np.ndarray
    sample_logp: np.ndarray  # [B, G] full-softmax log-probs at the sampling temperature
    texts: list[str]

    @property
    def lengths(self) -> np.ndarray:
        return self.completion_mask.sum(axis=1)


def global_max(value: int) -> int:
    """The maximum of an int over all processes (identity with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([value]))))


def global_concat(x: np.ndarray) -> np.ndarray:
    """Rows of every process, concatenated in process order (identity with one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that belong to this process, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    seen: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        seen.setdefault(start, np.asarray(shard.data))
    return np.concatenate([seen[k] for k in sorted(seen)], axis=0)


class Sampler:
    """Binds the model, tokenizer and mesh; `sample(params, problems, n, rng, settings)` -> Rollout."""

    def __init__(self, model_cfg: Qwen2Config, tokenizer: Any, mesh: jax.sharding.Mesh):
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer)

    def local_slice(self, global_count: int) -> slice:
        """This process's share of `global_count` rows (contiguous blocks in process order)."""
        per = global_count // jax.process_count()
        start = jax.process_index() * per
        return slice(start, start + per)

    def sample(
        self,
        params: Any,
        problems: Sequence[Problem],
        n: int,
        rng: jax.Array,
        settings: SamplingSettings,
    ) -> Rollout:
        """`problems` are this process's prompts; each is sampled `n` times. Rows are padded up to the mesh's
        batch divisor with copies of the last prompt and dropped again afterwards."""
        rows = [p for p in problems for _ in range(n)]
        divisor = sharding.batch_divisor(self.mesh) // jax.process_count() or 1
        padded = rows + [rows[-1]] * (-len(rows) % divisor)
        ids = encode_prompts(self.tokenizer, [p.question for p in padded])
        # Pad straight to the sampler's bucket (a power of two >= prompt_bucket); every process uses the
        # widest bucket of all so their rows form one global batch.
        width = global_max(bucket_length(max(len(x) for x in ids), settings.prompt_bucket))
        tokens, mask = left_pad(ids, self.pad_id, width)
        prompt_tokens, prompt_mask = sharding.shard_batch((tokens, mask), self.mesh)
        out = generate(
            params,
            self.model_cfg,
            prompt_tokens,
            prompt_mask,
            rng,
            settings=settings,
            stop_token_ids=self.stop_ids,
            pad_id=self.pad_id,
            mesh=self.mesh,  # the KV cache is split over the batch like the prompts
        )
        keep = len(rows)
        completion = local_rows(out.completion)[:keep]
        completion_mask = local_rows(out.completion_mask)[:keep]
        return Rollout(
            problems=rows,
            prompt_tokens=tokens[:keep],
            prompt_mask=mask[:keep],
            completion=completion,
            completion_mask=completion_mask,
            sample_logp=local_rows(out.full_logprobs)[:keep],
            texts=decode_batch(self.tokenizer, completion),
        )
