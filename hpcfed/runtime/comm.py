"""Roles, framed buffer messages and byte counting: the one place that talks MPI.

A message is one contiguous uint8 buffer: a fixed 48-byte header (step, kind,
sender, block, kernel version, payload length, one float metric, flags) followed by the
payload. Frames are allocated once and reused, travel with upper-case mpi4py calls
(no pickling on the hot path), and every byte is counted by the rank that sends it.
The MPI tag is the direction (uplink, downlink, ...); the header says what the frame
carries and for which step, so receivers can drop stale messages.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Callable, Sequence, TypeVar

import numpy as np
from mpi4py import MPI

from hpcfed.errors import HpcfedError

HEADER = np.dtype([
    ("step", "<i8"), ("kind", "<i4"), ("sender", "<i4"), ("block", "<i4"),
    ("version", "<i4"), ("length", "<i8"), ("metric", "<f8"), ("flags", "<i8"),
])
SERVER = 0
T = TypeVar("T")


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
    """A reusable message buffer: header + up to ``capacity`` payload bytes."""

    def __init__(self, capacity: int) -> None:
        self.buffer = np.zeros(HEADER.itemsize + capacity, dtype=np.uint8)
        self.head = self.buffer[:HEADER.itemsize].view(HEADER)

    @property
    def capacity(self) -> int:
        return self.buffer.size - HEADER.itemsize

    def write(self, payload: np.ndarray | Sequence[np.ndarray], *, step: int, kind: Kind, sender: int,
              block: int = 0, version: int = 0, metric: float = 0.0, flags: int = 0) -> int:
        """Copy the payload (one array, or parts laid end to end) in behind a filled header.

        Returns the message size in bytes.
        """
        parts = [payload] if isinstance(payload, np.ndarray) else list(payload)
        end = HEADER.itemsize
        for part in parts:
            raw = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            if end + raw.size > self.buffer.size:
                raise ValueError(f"payload exceeds the frame capacity {self.capacity}")
            self.buffer[end:end + raw.size] = raw
            end += raw.size
        self.head[0] = (step, int(kind), sender, block, version, end - HEADER.itemsize, metric, int(flags))
        return end

    def payload(self, dtype: np.dtype | type = np.uint8) -> np.ndarray:
        """The received payload (a view), as ``dtype``."""
        length = int(self.head["length"][0])
        return self.buffer[HEADER.itemsize:HEADER.itemsize + length].view(dtype)

    def field(self, name: str) -> int | float:
        return self.head[name][0].item()


class Channel:
    """Point-to-point and broadcast transfers of frames over one communicator, with byte counts."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.bytes_sent = 0

    def send(self, frame: Frame, nbytes: int, dest: int) -> None:
        self.comm.Send([frame.buffer[:nbytes], MPI.BYTE], dest=dest, tag=self._tag(frame))
        self.bytes_sent += nbytes

    def isend(self, frame: Frame, nbytes: int, dest: int) -> MPI.Request:
        """Non-blocking send; the frame must not change until the request completes."""
        self.bytes_sent += nbytes
        return self.comm.Isend([frame.buffer[:nbytes], MPI.BYTE], dest=dest, tag=self._tag(frame))

    def recv(self, frame: Frame, source: int, tag: Tag) -> None:
        self.comm.Recv([frame.buffer, MPI.BYTE], source=source, tag=int(tag))

    def irecv(self, frame: Frame, source: int, tag: Tag) -> MPI.Request:
        return self.comm.Irecv([frame.buffer, MPI.BYTE], source=source, tag=int(tag))

    @staticmethod
    def _tag(frame: Frame) -> int:
        return int(TAG_OF[Kind(frame.field("kind"))])

    def bcast(self, frame: Frame, nbytes: int, root: int = SERVER) -> None:
        """Collective broadcast of the first ``nbytes`` of ``frame``; the root counts one copy per receiver."""
        self.comm.Bcast([frame.buffer[:nbytes], MPI.BYTE], root=root)
        if self.rank == root:
            self.bytes_sent += nbytes * (self.size - 1)

    def send_arrays(self, arrays: dict[str, np.ndarray], dest: int) -> int:
        """Start-up transfer of named arrays (shapes by a small pickle, data as raw buffers)."""
        self.comm.send({k: (a.dtype.str, a.shape) for k, a in arrays.items()}, dest=dest, tag=int(Tag.DATA))
        sent = 0
        for array in arrays.values():
            contiguous = np.ascontiguousarray(array)
            self.comm.Send(contiguous, dest=dest, tag=int(Tag.DATA))
            sent += contiguous.nbytes
        return sent

    def recv_arrays(self, source: int) -> dict[str, np.ndarray]:
        layout = self.comm.recv(source=source, tag=int(Tag.DATA))
        arrays = {}
        for name, (dtype, shape) in layout.items():
            arrays[name] = np.empty(shape, dtype=np.dtype(dtype))
            self.comm.Recv(arrays[name], source=source, tag=int(Tag.DATA))
        return arrays


def agree(comm: MPI.Comm, action: Callable[[], T], root: int = SERVER) -> T | None:
    """Run ``action`` on ``root``; if it raises HpcfedError, every rank raises it together.

    Returns the action's result on ``root`` and None elsewhere. Used for start-up work
    (config, data, run directory) so a bad input ends all ranks cleanly with status 2.
    """
    result, problem = None, None
    if comm.Get_rank() == root:
        try:
            result = action()
        except HpcfedError as err:
            problem = str(err)
    problem = comm.bcast(problem, root=root)
    if problem is not None:
        raise HpcfedError(problem, everywhere=True)
    return result
