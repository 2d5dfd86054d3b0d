"""The tile sizes of the loss kernels: plain data without jax, so that the config schema (trainer/config.py)
can check `train.kernel_blocks` on a laptop that has no jax."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
    """Tile sizes of the memory-efficient providers (configs as data: the trainer passes these through).

    block_tokens / block_vocab: the Pallas tile [block_tokens, block_vocab] of the logits, which lives only
    in VMEM. TPU wants block_tokens % 8 == 0 and block_vocab % 128 == 0 (multiples of 256 feed the v6e MXU
    best); a block larger than its axis is shrunk to the full axis. chunk_vocab: vocabulary columns per step
    of the pure-JAX `chunked` provider (its [N, chunk_vocab] float32 tile is the temporary that bounds its
    memory). vmem_limit_bytes: scoped-VMEM limit handed to Mosaic (v6e has 128 MiB of VMEM per core).
    """

    block_tokens: int = 512
    block_vocab: int = 1024
    chunk_vocab: int = 4096
    vmem_limit_bytes: int = 96 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.block_tokens <= 0 or self.block_tokens % 8:
            raise ValueError(f"block_tokens must be a positive multiple of 8, got {self.block_tokens}")
        if self.block_vocab <= 0 or self.block_vocab % 128:
            raise ValueError(f"block_vocab must be a positive multiple of 128, got {self.block_vocab}")
        if self.chunk_vocab <= 0:
            raise ValueError(f"chunk_vocab must be positive, got {self.chunk_vocab}")
        if self.vmem_limit_bytes <= 0:
            raise ValueError(f"vmem_limit_bytes must be positive, got {self.vmem_limit_bytes}")
