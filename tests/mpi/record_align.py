"""Test program: runs ``hpcfed.psi.align.main`` as ``hpcfed align`` does, recording what is sent.

usage: python -m mpi4py tests/mpi/record_align.py CONFIG [--set KEY=VALUE ...] --record DIR

``--record DIR`` hands ``main`` a communicator whose send functions (and those of every
communicator split from it) keep a copy of each buffer or pickled object they send;
each rank saves its list to ``DIR/rank_R.pkl`` for the test to search.
"""

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcfed.cli import _fail
from hpcfed.errors import HpcfedError
from hpcfed.psi.align import main
from hpcfed.runtime.log import setup_logging

SENT: list[bytes] = []


def _payload(buf) -> bytes:
    """The bytes of an mpi4py buffer argument: an array, or [array, counts, ...]."""
    if isinstance(buf, (list, tuple)):
        buf = buf[0]
    return b"" if buf is None else np.ascontiguousarray(buf).tobytes()


class RecordingComm(MPI.Intracomm):
    """COMM_WORLD (or a split of it) that records every outgoing buffer before sending it."""

    def Split(self, color=0, key=0):
        return RecordingComm(super().Split(color, key))

    def Isend(self, buf, dest, tag=0):
        SENT.append(_payload(buf))
        return super().Isend(buf, dest, tag)

    def Bcast(self, buf, root=0):
        if self.Get_rank() == root:
            SENT.append(_payload(buf))
        return super().Bcast(buf, root)

    def Scatterv(self, sendbuf, recvbuf, root=0):
        if self.Get_rank() == root:
            SENT.append(_payload(sendbuf))
        return super().Scatterv(sendbuf, recvbuf, root)

    def Gatherv(self, sendbuf, recvbuf, root=0):
        SENT.append(_payload(sendbuf))
        return super().Gatherv(sendbuf, recvbuf, root)

    def send(self, obj, dest, tag=0):
        SENT.append(pickle.dumps(obj))
        return super().send(obj, dest, tag)

    def sendrecv(self, sendobj, dest, sendtag=0, recvbuf=None, source=MPI.ANY_SOURCE, recvtag=MPI.ANY_TAG,
                 status=None):
        SENT.append(pickle.dumps(sendobj))
        return super().sendrecv(sendobj, dest, sendtag, recvbuf, source, recvtag, status)

    def bcast(self, obj, root=0):
        if self.Get_rank() == root:
            SENT.append(pickle.dumps(obj))
        return super().bcast(obj, root)

    def gather(self, sendobj, root=0):
        SENT.append(pickle.dumps(sendobj))
        return super().gather(sendobj, root)

    def allgather(self, sendobj):
        SENT.append(pickle.dumps(sendobj))
        return super().allgather(sendobj)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--record", type=Path)
    args = parser.parse_args(argv)
    world = MPI.COMM_WORLD
    comm = RecordingComm(world) if args.record else world
    log = setup_logging(world.Get_rank())
    try:
        status = main(args.config, args.overrides, comm)
    except HpcfedError as err:
        return _fail(err, world, log)
    if args.record:
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / f"rank_{world.Get_rank()}.pkl").write_bytes(pickle.dumps(SENT))
    return status


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
