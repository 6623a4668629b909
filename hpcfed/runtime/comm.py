"""Roles and framed buffer messages (no MPI here: :mod:`hpcfed.runtime.transport` moves frames).

A message is one contiguous uint8 buffer: a fixed 48-byte header (step, kind,
sender, block, kernel version, payload length, one float metric, flags) followed by the
payload. Frames are allocated once and reused, travel as raw buffers (upper-case mpi4py
calls, no pickling on the hot path), and every byte is counted by the transport that sends it.
A frame lives where its :class:`~hpcfed.runtime.memory.Memory` says (host, pinned host
staging, or device memory for CUDA-aware MPI).
The MPI tag is the direction (uplink, downlink, ...); the header says what the frame
carries and for which step, so receivers can drop stale messages.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Any

import numpy as np
from hpcfed.xp import array_module, copy_into
from hpcfed.runtime.memory import HOST, Memory

HEADER = np.dtype([
    ("step", "<i8"), ("kind", "<i4"), ("sender", "<i4"), ("block", "<i4"),
    ("version", "<i4"), ("length", "<i8"), ("metric", "<f8"), ("flags", "<i8"),
])
SERVER = 0


class Kind(IntEnum):
    """What a frame carries (in its header)."""

    GRADIENT = 1   # worker -> rank 0: one block's gradient (or codec packet)
    UPDATE = 2     # rank 0 -> worker: the aggregate of one step
    RESYNC = 3     # rank 0 -> a late worker: parameters + optimizer state, to rejoin at the current step
    KERNEL = 4
    PLAN = 5       # rank 0 -> all (fedavg): the clients of a round
    MODEL = 6      # rank 0 -> worker (fedavg): the global parameters
    DELTA = 7      # worker -> rank 0 (fedavg): a client's trained parameters minus the global ones


class Flag(IntFlag):
    """Header flags. Uplink: the sender got a stop signal. Downlink: after applying this,
    join a checkpoint (CHECKPOINT), then exit to be resumed (STOP)."""

    STOP = 1
    CHECKPOINT = 2


class Tag(IntEnum):
    """MPI tags: one per direction, so messages of one direction never overtake each other."""

    UPLINK = 1
    DOWNLINK = 2
    KERNEL = 3
    DATA = 4


TAG_OF = {Kind.GRADIENT: Tag.UPLINK, Kind.DELTA: Tag.UPLINK, Kind.UPDATE: Tag.DOWNLINK, Kind.RESYNC: Tag.DOWNLINK,
          Kind.MODEL: Tag.DOWNLINK, Kind.PLAN: Tag.DOWNLINK, Kind.KERNEL: Tag.KERNEL}


class Frame:
    """A reusable message buffer: header + up to ``capacity`` payload bytes, in ``memory``.

    The header is read and written on the host: in place for host frames, through a
    48-byte mirror for device frames (copied in by :meth:`write`, out by :meth:`arrived`).
    """

    def __init__(self, capacity: int, memory: Memory = HOST, receives: bool = True) -> None:
        self.memory = memory
        self.buffer = memory.frame_buffer(HEADER.itemsize + capacity)
        self.twin = memory.twin(capacity) if receives else None   # send-only frames need no device twin
        self.head = (self.buffer[:HEADER.itemsize] if memory.host_frames else np.zeros(HEADER.itemsize, np.uint8)
                     ).view(HEADER)

    @property
    def capacity(self) -> int:
        return self.buffer.size - HEADER.itemsize

    def write(self, payload: Any, *, step: int, kind: Kind, sender: int,
              block: int = 0, version: int = 0, metric: float = 0.0, flags: int = 0) -> int:
        """Copy the payload (one array, or parts laid end to end; host or device) in behind a filled header.

        Returns the message size in bytes.
        """
        parts = list(payload) if isinstance(payload, (list, tuple)) else [payload]
        end = HEADER.itemsize
        for part in parts:
            raw = array_module(part).ascontiguousarray(part).reshape(-1).view(np.uint8)
            if end + raw.size > self.buffer.size:
                raise ValueError(f"payload exceeds the frame capacity {self.capacity}")
            copy_into(self.buffer[end:end + raw.size], raw)
            end += raw.size
        self.head[0] = (step, int(kind), sender, block, version, end - HEADER.itemsize, metric, int(flags))
        if not self.memory.host_frames:
            copy_into(self.buffer[:HEADER.itemsize], self.head.view(np.uint8))
        return end

    def arrived(self) -> None:
        """After a receive completed: refresh the host header of a device frame."""
        if not self.memory.host_frames:
            copy_into(self.head.view(np.uint8), self.buffer[:HEADER.itemsize])

    def payload(self, dtype: np.dtype | type = np.uint8) -> Any:
        """The received payload (a view in the frame's memory), as ``dtype``."""
        length = int(self.head["length"][0])
        return self.buffer[HEADER.itemsize:HEADER.itemsize + length].view(dtype)

    def data(self) -> Any:
        """The received payload bytes where the compute side works (staged: copied into the device twin)."""
        return self.memory.to_compute(self.payload(), self.twin)

    def field(self, name: str) -> int | float:
        return self.head[name][0].item()
