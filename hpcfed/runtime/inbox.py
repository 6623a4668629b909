"""Rank 0's receive side: buffers kept pre-posted for every worker, served by Waitany."""

from __future__ import annotations

from typing import Iterable

from mpi4py import MPI

from hpcfed.runtime.comm import Channel, Frame, Tag
from hpcfed.runtime.memory import HOST, Memory


class Inbox:
    """``per_worker`` posted receives per worker; a frame stays untouched until :meth:`repost`."""

    def __init__(self, channel: Channel, workers: Iterable[int], per_worker: int, capacity: int, tag: Tag,
                 memory: Memory = HOST) -> None:
        self.channel = channel
        self.tag = tag
        self.sources = [w for w in workers for _ in range(per_worker)]
        self.frames = [Frame(capacity, memory) for _ in self.sources]
        self.requests = [channel.irecv(f, src, tag) for f, src in zip(self.frames, self.sources)]

    def wait(self) -> int:
        """Block until some posted receive completes; returns its index."""
        index = MPI.Request.Waitany(self.requests)
        self.frames[index].arrived()
        return index

    def ready(self) -> list[int]:
        """Indices of receives that have already completed (no waiting)."""
        done = list(MPI.Request.Testsome(self.requests) or [])
        for index in done:
            self.frames[index].arrived()
        return done

    def repost(self, index: int) -> None:
        """Hand a frame back to MPI for the next message from the same worker."""
        self.requests[index] = self.channel.irecv(self.frames[index], self.sources[index], self.tag)

    def close(self) -> None:
        """Cancel what is still posted (nothing more will be sent)."""
        for request in self.requests:
            if request != MPI.REQUEST_NULL:
                request.Cancel()
        MPI.Request.Waitall(self.requests)
