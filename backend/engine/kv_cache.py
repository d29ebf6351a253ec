"""A paged KV cache: fixed-size blocks of token rows, handed to sequences by an allocator."""

from __future__ import annotations

import math
from collections import deque

import torch

from quiver.backend.engine.model import ModelArgs

__all__ = ["KVCache"]


class KVCache:
    """``k[layer]`` and ``v[layer]`` are ``[num_blocks * block_size, kv_heads, head_dim]``.

    Memory is allocated once; sequences own whole blocks, listed in their block tables.
    """

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (args.num_layers, num_blocks * block_size, args.num_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._free: deque[int] = deque(range(num_blocks))

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return 2 * args.num_layers * args.num_kv_heads * args.head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` free blocks, or ``None`` (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
