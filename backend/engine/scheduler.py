"""Request state and the waiting queue: one FIFO per adapter, served round-robin.

Round-robin over adapters means a request for a rarely used adapter waits for at most one
admission per other adapter with queued work, however many requests a popular adapter has.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from quiver.backend.engine.types import SamplingParams

__all__ = ["Sequence", "FairQueue"]


@dataclass
class Sequence:
    """One request inside the engine."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    generator: torch.Generator | None = None
    slot: int = -1                      # adapter slot, -1 for the base model
    row: int = -1                       # row in the engine's block table while running
    blocks: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0               # tokens whose K/V are in the cache
    text: str = ""                      # decoded completion text
    emitted: int = 0                    # characters of ``text`` already streamed
    reserved_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]


class FairQueue:
    """Waiting sequences: a FIFO per adapter key, admitted round-robin across keys."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str | None, deque[Sequence]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, seq: Sequence) -> None:
        self._queues.setdefault(seq.adapter, deque()).append(seq)
        self._size += 1

    def push_front(self, seq: Sequence) -> None:
        self._queues.setdefault(seq.adapter, deque()).appendleft(seq)
        self._queues.move_to_end(seq.adapter, last=False)
        self._size += 1

    def peek(self) -> Sequence | None:
        for q in self._queues.values():
            return q[0]
        return None

    def pop(self) -> Sequence:
        """The head of the next adapter's FIFO; that adapter then goes to the back."""
        key, q = next(iter(self._queues.items()))
        seq = q.popleft()
        if q:
            self._queues.move_to_end(key)
        else:
            del self._queues[key]
        self._size -= 1
        return seq

    def remove(self, request_id: str) -> Sequence | None:
        for key, q in self._queues.items():
            for seq in q:
                if seq.request_id == request_id:
                    q.remove(seq)
                    if not q:
                        del self._queues[key]
                    self._size -= 1
                    return seq
        return None

    def count(self, adapter: str | None) -> int:
        return len(self._queues.get(adapter, ()))

    def drain(self) -> list[Sequence]:
        out = [s for q in self._queues.values() for s in q]
        self._queues.clear()
        self._size = 0
        return out
