"""A loopback twin of the transport's point-to-point part: every rank in one process.

:class:`LoopbackHub` holds one :class:`LoopbackTransport` per rank. Sends copy the frame's
bytes into the receiver's queue at once (MPI's eager protocol) and match posted receives in
MPI order: per (source, tag) messages never overtake each other, and a receive takes the first
matching message. Bytes are counted where they are sent, as over MPI. When a rank waits and
nothing it waits for has arrived, the hub calls its ``pump`` (set by the test or benchmark
that drives the other ranks) until something does; a wait that nothing can satisfy is an error,
not a hang. No threads, no sleeps: the order of events is exactly what the driver chooses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from hpcfed.runtime.comm import TAG_OF, Frame, Kind, Tag
from hpcfed.xp import copy_into


@dataclass
class LoopbackRequest:
    """A posted receive or a (completed at once) send."""

    frame: Frame | None = None
    source: int = -1
    tag: int = -1
    done: bool = False
    cancelled: bool = False


@dataclass
class _Mailbox:
    posted: list[LoopbackRequest] = field(default_factory=list)     # receives not yet matched, in order
    unexpected: deque = field(default_factory=deque)                 # (source, tag, bytes) not yet received


class LoopbackHub:
    """The in-process 'network' of ``size`` ranks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.boxes = [_Mailbox() for _ in range(size)]
        self.endpoints = [LoopbackTransport(self, rank) for rank in range(size)]
        self.pump: Callable[[int], bool] | None = None   # pump(waiting_rank) -> whether anything happened

    def deliver(self, data: np.ndarray, source: int, dest: int, tag: int) -> None:
        box = self.boxes[dest]
        for request in box.posted:
            if request.source == source and request.tag == tag:
                box.posted.remove(request)
                _fill(request, data)
                return
        box.unexpected.append((source, tag, data))

    def post(self, rank: int, request: LoopbackRequest) -> None:
        box = self.boxes[rank]
        for message in box.unexpected:
            source, tag, data = message
            if source == request.source and tag == request.tag:
                box.unexpected.remove(message)
                _fill(request, data)
                return
        box.posted.append(request)

    def progress(self, rank: int) -> None:
        """Let the driver run other ranks; raise if it cannot (the wait would never end)."""
        if self.pump is None or not self.pump(rank):
            raise RuntimeError(f"loopback: rank {rank} waits for a message that no rank will send")


def _fill(request: LoopbackRequest, data: np.ndarray) -> None:
    frame = request.frame
    if data.size > frame.buffer.size:
        raise RuntimeError(f"loopback: message of {data.size} bytes for a frame of {frame.buffer.size}")
    copy_into(frame.buffer[:data.size], data)
    request.done = True


class LoopbackTransport:
    """One rank's end of a :class:`LoopbackHub`, with the methods the step cores use."""

    def __init__(self, hub: LoopbackHub, rank: int) -> None:
        self.hub, self.rank, self.size = hub, rank, hub.size
        self.bytes_sent = 0

    def _send(self, frame: Frame, nbytes: int, dest: int) -> LoopbackRequest:
        tag = int(TAG_OF[Kind(frame.field("kind"))])
        data = np.empty(nbytes, dtype=np.uint8)
        copy_into(data, frame.buffer[:nbytes])
        self.bytes_sent += nbytes
        self.hub.deliver(data, self.rank, dest, tag)
        return LoopbackRequest(done=True)

    def send(self, frame: Frame, nbytes: int, dest: int) -> None:
        self._send(frame, nbytes, dest)

    def isend(self, frame: Frame, nbytes: int, dest: int) -> LoopbackRequest:
        return self._send(frame, nbytes, dest)

    def irecv(self, frame: Frame, source: int, tag: Tag) -> LoopbackRequest:
        request = LoopbackRequest(frame, source, int(tag))
        self.hub.post(self.rank, request)
        return request

    def recv(self, frame: Frame, source: int, tag: Tag) -> None:
        request = self.irecv(frame, source, tag)
        while not request.done:
            self.hub.progress(self.rank)
        frame.arrived()

    @staticmethod
    def _completed(requests: list[LoopbackRequest | None]) -> list[int]:
        done = [i for i, r in enumerate(requests) if r is not None and r.done and not r.cancelled]
        for i in done:
            requests[i] = None   # like MPI.REQUEST_NULL after completion
        return done

    def test_some(self, requests: list) -> list[int]:
        return self._completed(requests)

    def wait_some(self, requests: list) -> list[int]:
        while not (done := self._completed(requests)):
            self.hub.progress(self.rank)
        return done

    def wait_all(self, requests: Sequence) -> None:
        while not all(r is None or r.done for r in requests):
            self.hub.progress(self.rank)

    def cancel_all(self, requests: list) -> None:
        box = self.hub.boxes[self.rank]
        for request in requests:
            if request is not None and not request.done:
                request.cancelled = True
                box.posted.remove(request)
