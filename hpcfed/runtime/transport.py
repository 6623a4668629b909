"""The one owner of MPI: frames point to point, waits, collectives, start-up data, aborts.

Algorithm code talks to a :class:`Transport` and never imports ``mpi4py``; the step cores
(:mod:`hpcfed.algorithms.sync_core`) use only the point-to-point part, which
:class:`~hpcfed.runtime.loopback.LoopbackTransport` also implements, so the same step logic
runs in one process for tests and benchmarks. Every byte a rank sends is counted here, where
it is sent. Frames travel with upper-case (buffer) calls; lower-case (pickle) calls carry only
small control objects between the ranks of one job (one organisation). What crosses between
the parties of ``hpcfed align`` uses the integer and byte-buffer calls only (no pickles).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from mpi4py import MPI

from hpcfed.errors import HpcfedError
from hpcfed.runtime.comm import SERVER, TAG_OF, Frame, Kind, Tag
from hpcfed.runtime.memory import HOST, Memory

T = TypeVar("T")
Request = Any   # an MPI.Request here; the loopback transport has its own


class Transport:
    """Frames and collectives over one communicator (``MPI.COMM_WORLD`` unless given)."""

    def __init__(self, comm: Any = None) -> None:
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.bytes_sent = 0
        self.sleep_wait = False   # poll with short sleeps instead of MPI's busy wait (see wait_mode)

    def wait_mode(self, setting: str) -> str:
        """Collective: set how this rank waits for frames, ``busy`` (MPI's own wait: the lowest latency,
        but a waiting rank holds its core) or ``sleep`` (test, sleep 10 us doubling to 1 ms, test again:
        waiting ranks leave the CPU to the ranks that compute); ``auto`` sleeps where the node runs more
        ranks than the CPUs they may use. Returns the decision with its reason."""
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        cpus = set().union(*local.allgather(sorted(os.sched_getaffinity(0))))
        ranks = local.Get_size()
        local.Free()
        crowded = ranks > len(cpus)
        self.sleep_wait = setting == "sleep" or (setting == "auto" and crowded)
        why = f"{ranks} ranks on {len(cpus)} CPUs of this node" if setting == "auto" else "set"
        return f"{'sleep' if self.sleep_wait else 'busy'} ({why})"

    @staticmethod
    def _until(test: Callable[[], T | None]) -> T:
        """Sleep-poll ``test`` until it returns something other than None; returns that."""
        pause = 1e-5
        while (result := test()) is None:
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        return result

    # ---- frames, point to point ------------------------------------------------------------

    @staticmethod
    def _message(frame: Frame, nbytes: int | None = None) -> list:
        """The MPI buffer spec of a frame (its first ``nbytes``, or all of it to receive)."""
        frame.memory.ready()
        view = frame.buffer if nbytes is None else frame.buffer[:nbytes]
        return [frame.memory.for_mpi(view), MPI.BYTE]

    @staticmethod
    def _tag(frame: Frame) -> int:
        return int(TAG_OF[Kind(frame.field("kind"))])

    def send(self, frame: Frame, nbytes: int, dest: int) -> None:
        self.comm.Send(self._message(frame, nbytes), dest=dest, tag=self._tag(frame))
        self.bytes_sent += nbytes

    def isend(self, frame: Frame, nbytes: int, dest: int) -> Request:
        """Non-blocking send; the frame must not change until the request completes."""
        self.bytes_sent += nbytes
        return self.comm.Isend(self._message(frame, nbytes), dest=dest, tag=self._tag(frame))

    def recv(self, frame: Frame, source: int, tag: Tag) -> None:
        if self.sleep_wait:
            request = self.comm.Irecv(self._message(frame), source=source, tag=int(tag))
            self._until(lambda: request.Test() or None)
        else:
            self.comm.Recv(self._message(frame), source=source, tag=int(tag))
        frame.arrived()

    def irecv(self, frame: Frame, source: int, tag: Tag) -> Request:
        """Non-blocking receive; call ``frame.arrived()`` once it completes (:class:`Inbox` does)."""
        return self.comm.Irecv(self._message(frame), source=source, tag=int(tag))

    def wait_some(self, requests: list[Request]) -> list[int]:
        """Block until at least one request completes; the indices of all that have (Waitsome)."""
        if self.sleep_wait:   # Testsome: [] while none has completed, None when none is active
            return self._until(lambda: None if (done := MPI.Request.Testsome(requests)) == [] else list(done or []))
        return list(MPI.Request.Waitsome(requests) or [])

    def test_some(self, requests: list[Request]) -> list[int]:
        """Indices of requests that have completed, without waiting (Testsome)."""
        return list(MPI.Request.Testsome(requests) or [])

    def wait_all(self, requests: Sequence[Request]) -> None:
        if self.sleep_wait:
            self._until(lambda: MPI.Request.Testall(list(requests)) or None)
        else:
            MPI.Request.Waitall(list(requests))

    def cancel_all(self, requests: list[Request]) -> None:
        """Cancel posted receives nobody will match, then complete them."""
        for request in requests:
            if request != MPI.REQUEST_NULL:
                request.Cancel()
        MPI.Request.Waitall(requests)

    def bcast_frame(self, frame: Frame, nbytes: int, root: int = SERVER) -> None:
        """Collective broadcast of the first ``nbytes`` of ``frame``; the root counts one copy per receiver."""
        self.comm.Bcast(self._message(frame, nbytes), root=root)
        frame.arrived()
        if self.rank == root:
            self.bytes_sent += nbytes * (self.size - 1)

    # ---- start-up data ---------------------------------------------------------------------

    def send_arrays(self, arrays: dict[str, np.ndarray], dest: int) -> int:
        """Named arrays to ``dest``: a small layout (names, dtypes, shapes), then raw buffers. Returns bytes."""
        self.comm.send({k: (a.dtype.str, a.shape) for k, a in arrays.items()}, dest=dest, tag=int(Tag.DATA))
        sent = 0
        for array in arrays.values():
            contiguous = np.ascontiguousarray(array)
            self.comm.Send([contiguous.reshape(-1).view(np.uint8), MPI.BYTE], dest=dest, tag=int(Tag.DATA))
            sent += contiguous.nbytes
        return sent   # reported as the start-up data bytes, apart from the training traffic

    def recv_arrays(self, source: int, memory: Memory = HOST) -> dict[str, Any]:
        """The arrays of :meth:`send_arrays`, received where ``memory`` keeps data (device memory when direct)."""
        layout = self.comm.recv(source=source, tag=int(Tag.DATA))
        arrays = {}
        for name, (dtype, shape) in layout.items():
            raw = memory.data_buffer(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.comm.Recv([memory.for_mpi(raw), MPI.BYTE], source=source, tag=int(Tag.DATA))
            arrays[name] = raw.view(np.dtype(dtype)).reshape(shape)
        return arrays

    # ---- control collectives (small objects, one job) ----------------------------------------

    def bcast(self, obj: T, root: int = SERVER) -> T:
        return self.comm.bcast(obj, root=root)

    def gather(self, obj: T, root: int = SERVER) -> list[T] | None:
        return self.comm.gather(obj, root=root)

    def allgather(self, obj: T) -> list[T]:
        return self.comm.allgather(obj)

    def scatter(self, objs: list[T] | None, root: int = SERVER) -> T:
        return self.comm.scatter(objs, root=root)

    def allreduce_max(self, value: int) -> int:
        return int(self.comm.allreduce(int(value), op=MPI.MAX))

    def allreduce_min(self, value: int) -> int:
        return int(self.comm.allreduce(int(value), op=MPI.MIN))

    def bcast_array(self, array: np.ndarray, root: int = SERVER) -> None:
        """In-place broadcast of a contiguous host array (same shape and dtype on every rank)."""
        self.comm.Bcast(array, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def agree(self, action: Callable[[], T], root: int = SERVER) -> T | None:
        """Run ``action`` on ``root``; if it raises HpcfedError, every rank raises it together.

        Returns the action's result on ``root`` and None elsewhere. Used for start-up work
        (config, data, run directory) so a bad input ends all ranks cleanly with status 2.
        """
        result, problem = None, None
        if self.rank == root:
            try:
                result = action()
            except HpcfedError as err:
                problem = str(err)
        problem = self.bcast(problem, root=root)
        if problem is not None:
            raise HpcfedError(problem, everywhere=True)
        return result

    def agree_everywhere(self, problem: str | None) -> None:
        """Collective: if any rank has a problem, every rank raises the first one (lowest rank)."""
        problems = [p for p in self.allgather(problem) if p]
        if problems:
            raise HpcfedError(problems[0], everywhere=True)

    # ---- integers and byte buffers (no pickles: safe between organisations) -----------------------

    def split(self, color: int, key: int) -> "Transport":
        """A transport over the sub-communicator of the ranks with the same ``color``."""
        return Transport(self.comm.Split(color, key))

    def free(self) -> None:
        """Release a communicator made by :meth:`split`."""
        self.comm.Free()

    def send_ints(self, values: Sequence[int], dest: int, tag: int) -> None:
        array = np.asarray(values, dtype=np.int64)
        self.comm.Send(array, dest=dest, tag=tag)
        self.bytes_sent += array.nbytes

    def recv_ints(self, count: int, source: int, tag: int) -> np.ndarray:
        array = np.empty(count, dtype=np.int64)
        self.comm.Recv(array, source=source, tag=tag)
        return array

    def sendrecv_ints(self, values: Sequence[int], dest: int, source: int, tag: int) -> np.ndarray:
        """Send ``values`` to ``dest`` while receiving as many int64 from ``source``."""
        out = np.asarray(values, dtype=np.int64)
        into = np.empty_like(out)
        self.comm.Sendrecv(out, dest=dest, sendtag=tag, recvbuf=into, source=source, recvtag=tag)
        self.bytes_sent += out.nbytes
        return into

    def bcast_ints(self, values: Sequence[int] | None, count: int, root: int = 0) -> np.ndarray:
        """Broadcast ``count`` int64 from ``root`` (``values`` are only read there)."""
        array = np.asarray(values, dtype=np.int64) if self.rank == root else np.empty(count, dtype=np.int64)
        self.comm.Bcast(array, root=root)
        if self.rank == root:
            self.bytes_sent += array.nbytes * (self.size - 1)
        return array

    def allgather_ints(self, values: Sequence[int]) -> np.ndarray:
        """Every rank's ``values`` (the same count everywhere), as a (size, count) int64 array."""
        mine = np.asarray(values, dtype=np.int64).reshape(-1)
        out = np.empty((self.size, mine.size), dtype=np.int64)
        self.comm.Allgather(mine, out)
        self.bytes_sent += mine.nbytes * (self.size - 1)
        return out

    def send_bytes(self, data: np.ndarray, dest: int, tag: int) -> Request:
        """Non-blocking send of a contiguous uint8 buffer; the buffer must not change until done."""
        self.bytes_sent += data.nbytes
        return self.comm.Isend([data, MPI.BYTE], dest=dest, tag=tag)

    def recv_bytes(self, out: np.ndarray, source: int, tag: int) -> None:
        self.comm.Recv([out, MPI.BYTE], source=source, tag=tag)

    def bcast_bytes(self, data: np.ndarray, root: int = 0) -> None:
        self.comm.Bcast([data, MPI.BYTE], root=root)
        if self.rank == root:
            self.bytes_sent += data.nbytes * (self.size - 1)

    def gatherv_bytes(self, mine: np.ndarray, counts: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Concatenate every rank's uint8 buffer at ``root`` (``counts``: bytes per rank, known everywhere)."""
        out = np.empty(int(counts.sum()), dtype=np.uint8) if self.rank == root else None
        self.comm.Gatherv([np.ascontiguousarray(mine).reshape(-1), MPI.BYTE],
                          [out, counts, MPI.BYTE] if out is not None else None, root=root)
        if self.rank != root:
            self.bytes_sent += mine.nbytes
        return out

    def scatterv_bytes(self, data: np.ndarray | None, counts: np.ndarray, root: int = 0) -> np.ndarray:
        """Rank r receives ``counts[r]`` bytes of ``data`` (read at ``root`` only), in rank order."""
        mine = np.empty(int(counts[self.rank]), dtype=np.uint8)
        self.comm.Scatterv([data, counts, MPI.BYTE] if self.rank == root else None, [mine, MPI.BYTE], root=root)
        if self.rank == root:
            self.bytes_sent += int(counts.sum() - counts[root])
        return mine

    # ---- the job ------------------------------------------------------------------------------

    def node_local_rank(self) -> tuple[int, str]:
        """This rank's index on its node (collective; see :func:`hpcfed.runtime.device.node_local_rank`)."""
        from hpcfed.runtime.device import node_local_rank

        return node_local_rank(self.comm)

    @staticmethod
    def binding_version() -> str:
        """mpi4py's version."""
        import mpi4py

        return mpi4py.__version__

    @staticmethod
    def library_version() -> str:
        """The MPI library's first version line (for traces and ``hpcfed info``)."""
        return MPI.Get_library_version().splitlines()[0].strip()

    def abort(self, status: int) -> None:
        self.comm.Abort(status)
