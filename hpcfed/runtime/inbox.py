"""Rank 0's receive side: buffers kept pre-posted for every worker, served in batches of arrivals."""

from __future__ import annotations

from typing import Any, Iterable

from hpcfed.runtime.comm import Frame, Tag
from hpcfed.runtime.memory import HOST, Memory


class Inbox:
    """``per_worker`` posted receives per worker; a frame stays untouched until :meth:`repost`.

    Works over any transport with ``irecv``/``wait_some``/``test_some``/``cancel_all`` (MPI or
    loopback). One wait returns every receive that has completed, so a step costs one wait per
    batch of arrivals instead of one per message.
    """

    def __init__(self, transport: Any, workers: Iterable[int], per_worker: int, capacity: int, tag: Tag,
                 memory: Memory = HOST) -> None:
        self.transport = transport
        self.tag = tag
        self.sources = [w for w in workers for _ in range(per_worker)]
        self.frames = [Frame(capacity, memory) for _ in self.sources]
        self.requests = [transport.irecv(f, src, tag) for f, src in zip(self.frames, self.sources)]

    def _arrived(self, done: list[int]) -> list[int]:
        for index in done:
            self.frames[index].arrived()
        return sorted(done)

    def wait(self) -> list[int]:
        """Block until some posted receives complete; their indices (ascending)."""
        return self._arrived(self.transport.wait_some(self.requests))

    def ready(self) -> list[int]:
        """Indices of receives that have already completed (no waiting)."""
        return self._arrived(self.transport.test_some(self.requests))

    def repost(self, index: int) -> None:
        """Hand a frame back for the next message from the same worker."""
        self.requests[index] = self.transport.irecv(self.frames[index], self.sources[index], self.tag)

    def close(self) -> None:
        """Cancel what is still posted (nothing more will be sent)."""
        self.transport.cancel_all(self.requests)
