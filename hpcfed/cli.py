"""Command line: ``hpcfed run | info`` (launched under mpiexec, or alone for ``info``/``--help``).

User errors (HpcfedError) print one line and exit with status 2: cleanly on every
rank when all ranks raised together, through MPI_Abort when only one rank did.
Any other exception prints its traceback and aborts the whole job, so no rank hangs.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import sys
import time
import traceback

from hpcfed import __version__
from hpcfed.errors import HpcfedError

EXIT_USAGE = 2
SETTLE_S = 0.2  # extra margin for ranks on other hosts to exit before rank 0 exits with an error status
DESCRIPTION = """Communication-efficient, straggler-tolerant distributed and federated learning over MPI.

Launch the training job (rank 0 = server, ranks 1.. = workers):
  mpiexec -n 4 python -m mpi4py -m hpcfed run [CONFIG] [--set KEY=VALUE ...]"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors follow the one-line, status-2 rule (printed by rank 0 only)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise HpcfedError(f"{message} (see '{self.prog} --help')", everywhere=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpcfed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hpcfed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="train (rank 0 = server, ranks 1.. = workers)")
    run.add_argument("config", nargs="?", help="YAML config (default: the built-in quickstart)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.lr=0.1 (repeatable)")
    run.set_defaults(handler=cmd_run)

    info = commands.add_parser("info", help="versions, MPI library, world size, CUDA-aware decision")
    info.set_defaults(handler=cmd_info)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from hpcfed.algorithms import fedavg, sync_ps
    from hpcfed.session import start_session

    session = start_session(args.config, args.overrides, MPI.COMM_WORLD)
    summary = {"sync": sync_ps, "fedavg": fedavg}[session.cfg.algorithm].run(session)
    if summary is not None:
        session.log.info("done: %d steps, test accuracy %.2f%%, %.1f s, %s/summary.json",
                         summary["steps"], 100 * summary["final_accuracy"], summary["wall_time_s"], session.run_dir)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import h5py
    import mpi4py
    import numpy
    import torch
    from mpi4py import MPI

    from hpcfed.runtime.device import cuda_aware_decision, cupy_or_none

    comm = MPI.COMM_WORLD
    decision = cuda_aware_decision()
    agreed = comm.allreduce(int(decision.cuda_aware), op=MPI.MIN) == 1
    if comm.Get_rank() != 0:
        return 0
    cupy = cupy_or_none()
    rows = [
        ("hpcfed", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("mpi4py", mpi4py.__version__),
        ("MPI library", MPI.Get_library_version().splitlines()[0].strip()),
        ("MPI standard", "%d.%d" % MPI.Get_version()),
        ("world size", str(comm.Get_size())),
        ("numpy", numpy.__version__),
        ("torch", f"{torch.__version__} (CUDA available: {torch.cuda.is_available()})"),
        ("h5py", f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})"),
        ("cupy", f"{cupy.__version__}" if cupy else "not available"),
        ("CUDA-aware MPI", f"{'yes' if agreed else 'no'} ({decision.reason}"
                           f"{'' if agreed == decision.cuda_aware else '; not every rank agrees'})"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hpcfed`` and ``python -m hpcfed``."""
    from mpi4py import MPI

    from hpcfed.runtime.log import setup_logging

    comm = MPI.COMM_WORLD
    log = setup_logging(comm.Get_rank())
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except HpcfedError as err:
        return _fail(err, comm, log)
    except SystemExit:  # --help / --version
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
        raise


def _wait_until_gone(pids: list[int], limit_s: float = 30.0) -> None:
    """Wait (bounded) until these local processes have exited (or are zombies awaiting their parent)."""
    deadline = time.monotonic() + limit_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        break
            except OSError:
                break
            time.sleep(0.01)
    time.sleep(SETTLE_S)


def _fail(err: HpcfedError, comm, log: logging.Logger) -> int:
    """Print the error once and end every rank with status 2, without hanging or traceback spam."""
    from mpi4py import MPI

    if err.everywhere:
        root = comm.Get_rank() == 0
        if root:
            print(f"hpcfed: error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if comm.Get_size() == 1 and "mpi4py.run" not in sys.modules:
            return EXIT_USAGE
        # A plain exit(2) under `python -m mpi4py` becomes MPI_Abort (extra lines), and MPICH's launcher
        # kills (signal 9, reported as status 9) ranks still running when rank 0 exits with an error.
        # So: all ranks finalize, the others exit at once, and rank 0 a moment later, when they are gone.
        ranks = comm.gather((socket.gethostname(), os.getpid()), root=0)
        MPI.Finalize()
        if root:
            _wait_until_gone([pid for host, pid in ranks[1:] if host == socket.gethostname()])
        os._exit(EXIT_USAGE)
    log.error("hpcfed: error: %s", err)
    sys.stdout.flush()
    sys.stderr.flush()
    comm.Abort(EXIT_USAGE)
    return EXIT_USAGE
