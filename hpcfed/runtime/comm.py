"""Roles, framed buffer messages and byte counting: the one place that talks MPI.

A message is one contiguous uint8 buffer: a fixed 48-byte header (step, kind,
sender, block, kernel version, payload length, one float metric, flags) followed by the
payload. Frames are allocated once and reused, travel with upper-case mpi4py calls
(no pickling on the hot path), and every byte is counted by the rank that sends it.
A frame lives where its :class:`~hpcfed.runtime.memory.Memory` says (host, pinned host
staging, or device memory for CUDA-aware MPI).
The MPI tag is the direction (uplink, downlink, ...); the header says what the frame
carries and for which step, so receivers can drop stale messages.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Any, Callable, TypeVar

import numpy as np
from mpi4py import MPI

from hpcfed.errors import HpcfedError
from hpcfed.xp import array_module, copy_into
from hpcfed.runtime.memory import HOST, Memory

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


class Channel:
    """Point-to-point and broadcast transfers of frames over one communicator, with byte counts."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.bytes_sent = 0

    @staticmethod
    def _message(frame: Frame, nbytes: int | None = None) -> list:
        """The MPI buffer spec of a frame (its first ``nbytes``, or all of it to receive)."""
        frame.memory.ready()
        view = frame.buffer if nbytes is None else frame.buffer[:nbytes]
        return [frame.memory.for_mpi(view), MPI.BYTE]

    def send(self, frame: Frame, nbytes: int, dest: int) -> None:
        self.comm.Send(self._message(frame, nbytes), dest=dest, tag=self._tag(frame))
        self.bytes_sent += nbytes

    def isend(self, frame: Frame, nbytes: int, dest: int) -> MPI.Request:
        """Non-blocking send; the frame must not change until the request completes."""
        self.bytes_sent += nbytes
        return self.comm.Isend(self._message(frame, nbytes), dest=dest, tag=self._tag(frame))

    def recv(self, frame: Frame, source: int, tag: Tag) -> None:
        self.comm.Recv(self._message(frame), source=source, tag=int(tag))
        frame.arrived()

    def irecv(self, frame: Frame, source: int, tag: Tag) -> MPI.Request:
        """Non-blocking receive; call ``frame.arrived()`` once it completes (:class:`Inbox` does)."""
        return self.comm.Irecv(self._message(frame), source=source, tag=int(tag))

    @staticmethod
    def _tag(frame: Frame) -> int:
        return int(TAG_OF[Kind(frame.field("kind"))])

    def bcast(self, frame: Frame, nbytes: int, root: int = SERVER) -> None:
        """Collective broadcast of the first ``nbytes`` of ``frame``; the root counts one copy per receiver."""
        self.comm.Bcast(self._message(frame, nbytes), root=root)
        frame.arrived()
        if self.rank == root:
            self.bytes_sent += nbytes * (self.size - 1)

    def send_arrays(self, arrays: dict[str, np.ndarray], dest: int) -> int:
        """Start-up transfer of named arrays (shapes by a small pickle, data as raw buffers)."""
        self.comm.send({k: (a.dtype.str, a.shape) for k, a in arrays.items()}, dest=dest, tag=int(Tag.DATA))
        sent = 0
        for array in arrays.values():
            contiguous = np.ascontiguousarray(array)
            self.comm.Send([contiguous.reshape(-1).view(np.uint8), MPI.BYTE], dest=dest, tag=int(Tag.DATA))
            sent += contiguous.nbytes
        return sent

    def recv_arrays(self, source: int, memory: Memory = HOST) -> dict[str, Any]:
        """The arrays of :meth:`send_arrays`, received where ``memory`` keeps data (device memory when direct)."""
        layout = self.comm.recv(source=source, tag=int(Tag.DATA))
        arrays = {}
        for name, (dtype, shape) in layout.items():
            raw = memory.data_buffer(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.comm.Recv([memory.for_mpi(raw), MPI.BYTE], source=source, tag=int(Tag.DATA))
            arrays[name] = raw.view(np.dtype(dtype)).reshape(shape)
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
