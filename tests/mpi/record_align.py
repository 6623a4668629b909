"""Test program: runs ``hpcfed.psi.align.main`` as ``hpcfed align`` does, recording what is sent.

usage: python -m mpi4py tests/mpi/record_align.py CONFIG [--set KEY=VALUE ...] --record DIR

``--record DIR`` hands ``main`` a :class:`RecordingTransport` (and every transport split from
it is one too) that keeps a copy of each buffer its sending methods send, and refuses, by
raising :class:`PickleCall` before anything is sent, every method that would pickle (or that
it does not record). The communicator under it is a :class:`GuardedComm` whose lower-case
(pickle) mpi4py methods raise the same way, so a pickle cannot slip past the transport either.
Each rank saves ``{"sent": [bytes, ...], "calls": {method: count}, "refused": [name, ...],
"guarded": [name, ...]}`` to ``DIR/rank_R.pkl`` (written by the rank itself and read by the
test: a local file, not a message), also when the run ends in an HpcfedError; ``refused``
lists the guarded names that were probed after the run and did raise. A pickle call during
the run ends the job with a PickleCall traceback (mpi4py aborts all ranks), never status 0 or 2.
"""

import argparse
import pickle
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcfed.cli import _fail
from hpcfed.errors import HpcfedError
from hpcfed.psi.align import main
from hpcfed.runtime.log import setup_logging
from hpcfed.runtime.transport import Transport

SENT: list[bytes] = []
CALLS: Counter = Counter()


class PickleCall(AssertionError):
    """align called something that would send a pickle (or an unrecorded send)."""


def _refuse(owner: str, name: str):
    def refused(self, *args, **kwargs):
        raise PickleCall(f"align called {owner}.{name}, which sends a pickle or an unrecorded message")
    refused.__name__ = name
    return refused


class GuardedComm(MPI.Intracomm):
    """COMM_WORLD (or a split of it) whose lower-case (pickle-based) methods all raise."""

    def Split(self, color=0, key=0):
        return GuardedComm(super().Split(color, key))


# mpi4py's lower-case communication methods pickle their objects; none may be called.
COMM_PICKLE = ["allgather", "allreduce", "alltoall", "bcast", "bsend", "exscan", "gather", "ibsend", "improbe",
               "irecv", "isend", "issend", "mprobe", "recv", "reduce", "scan", "scatter", "send", "sendrecv", "ssend"]
for _name in COMM_PICKLE:
    setattr(GuardedComm, _name, _refuse("comm", _name))


class RecordingTransport(Transport):
    """A transport that records every buffer it sends; every other sending method raises."""

    def split(self, color, key):
        CALLS["split"] += 1
        return RecordingTransport(self.comm.Split(color, key))

    def send_ints(self, values, dest, tag):
        CALLS["send_ints"] += 1
        SENT.append(np.asarray(values, dtype=np.int64).tobytes())
        return super().send_ints(values, dest, tag)

    def sendrecv_ints(self, values, dest, source, tag):
        CALLS["sendrecv_ints"] += 1
        SENT.append(np.asarray(values, dtype=np.int64).tobytes())
        return super().sendrecv_ints(values, dest, source, tag)

    def bcast_ints(self, values, count, root=0):
        CALLS["bcast_ints"] += 1
        if self.rank == root:
            SENT.append(np.asarray(values, dtype=np.int64).tobytes())
        return super().bcast_ints(values, count, root)

    def allgather_ints(self, values):
        CALLS["allgather_ints"] += 1
        SENT.append(np.asarray(values, dtype=np.int64).tobytes())
        return super().allgather_ints(values)

    def send_bytes(self, data, dest, tag):
        CALLS["send_bytes"] += 1
        SENT.append(np.ascontiguousarray(data).tobytes())
        return super().send_bytes(data, dest, tag)

    def bcast_bytes(self, data, root=0):
        CALLS["bcast_bytes"] += 1
        if self.rank == root:
            SENT.append(np.ascontiguousarray(data).tobytes())
        return super().bcast_bytes(data, root)

    def gatherv_bytes(self, mine, counts, root=0):
        CALLS["gatherv_bytes"] += 1
        SENT.append(np.ascontiguousarray(mine).tobytes())   # the root's own part too (it stays home)
        return super().gatherv_bytes(mine, counts, root)

    def scatterv_bytes(self, data, counts, root=0):
        CALLS["scatterv_bytes"] += 1
        if self.rank == root:
            SENT.append(np.ascontiguousarray(data).tobytes())
        return super().scatterv_bytes(data, counts, root)


# Receives, waits, barrier and free carry nothing out; everything else public on Transport that
# communicates is either a pickle (bcast, gather, allgather, scatter, agree, agree_everywhere,
# allreduce_*, send_arrays / recv_arrays' layout) or a send this recorder does not record
# (frames, bcast_array): refused.
ALLOWED = {"split", "free", "send_ints", "recv_ints", "sendrecv_ints", "bcast_ints", "allgather_ints",
           "send_bytes", "recv_bytes", "bcast_bytes", "gatherv_bytes", "scatterv_bytes", "wait_all", "barrier",
           "binding_version", "library_version", "abort"}
TRANSPORT_REFUSED = sorted(name for name, value in vars(Transport).items()
                           if not name.startswith("_") and callable(value) and name not in ALLOWED)
for _name in TRANSPORT_REFUSED:
    setattr(RecordingTransport, _name, _refuse("Transport", _name))


def probe_guards(transport: RecordingTransport) -> list[str]:
    """Call every guarded method once (each raises before it communicates); the names that raised."""
    refused = []
    for target, names in ((transport, TRANSPORT_REFUSED), (transport.comm, COMM_PICKLE)):
        for name in names:
            try:
                getattr(target, name)(None, 0)
            except PickleCall:
                refused.append(f"{'Transport' if target is transport else 'comm'}.{name}")
    return refused


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--record", type=Path)
    args = parser.parse_args(argv)
    world = MPI.COMM_WORLD
    transport = RecordingTransport(GuardedComm(world)) if args.record else None
    log = setup_logging(world.Get_rank())
    try:
        status = main(args.config, args.overrides, transport if transport is not None else world)
    except HpcfedError as err:
        save(args.record, transport)   # what was sent before the error, too
        return _fail(err, world, log)
    save(args.record, transport)
    return status


def save(folder: Path | None, transport: RecordingTransport | None) -> None:
    if transport is None:
        return
    record = {"sent": SENT, "calls": dict(CALLS), "refused": probe_guards(transport),
              "guarded": [f"Transport.{n}" for n in TRANSPORT_REFUSED] + [f"comm.{n}" for n in COMM_PICKLE]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank_{MPI.COMM_WORLD.Get_rank()}.pkl").write_bytes(pickle.dumps(record))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
