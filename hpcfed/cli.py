"""Command line: ``hpcfed run | align | report | info`` (under mpiexec, or alone for ``report``/``info``/``--help``).

User errors (HpcfedError) print one line and exit with status 2: cleanly on every
rank when all ranks raised together, through MPI_Abort when only one rank did.
Any other exception prints its traceback and aborts the whole job, so no rank hangs.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import traceback

from hpcfed import __version__
from hpcfed.errors import HpcfedError

EXIT_USAGE = 2
FORWARD_S = 1.0  # under hydra: time for the launcher to forward what the ranks printed before rank 0 aborts
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
    run.add_argument("config", nargs="?", help="YAML config (default: the built-in quickstart; with --resume: "
                                               "the run's own config.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.lr=0.1 (repeatable)")
    run.add_argument("--resume", metavar="RUN_DIR|CHECKPOINT",
                     help="continue a run from its latest good checkpoint (or the given file)")
    run.set_defaults(handler=cmd_run)

    align = commands.add_parser("align", help="private sample alignment for vertical FL (one party per rank)")
    align.add_argument("config", help="YAML align config (see configs/align-example.yaml)")
    align.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    align.set_defaults(handler=cmd_align)

    report = commands.add_parser("report", help="summary table and plots of one or more run folders")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="folder for the PNG plots (default: RUN_DIR/report, or ./report for several)")
    report.set_defaults(handler=cmd_report)

    info = commands.add_parser("info", help="versions, MPI library, world size, CUDA-aware decision")
    info.set_defaults(handler=cmd_info)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from hpcfed.algorithms import fedavg, sync_ps
    from hpcfed.runtime.transport import Transport
    from hpcfed.session import start_session

    session = start_session(args.config, args.overrides, Transport(), resume=args.resume)
    outcome = {"sync": sync_ps, "fedavg": fedavg}[session.cfg.algorithm].run(session)
    if isinstance(outcome, dict):
        unit = "rounds" if "rounds" in outcome else "steps"
        session.log.info("done: %d %s, test accuracy %.2f%%, %.1f s, %s/summary.json", outcome["steps"], unit,
                         100 * outcome["final_accuracy"], outcome["wall_time_s"], session.run_dir)
    return outcome if isinstance(outcome, int) else 0


def cmd_align(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from hpcfed.psi.align import main as align_main

    return align_main(args.config, args.overrides, MPI.COMM_WORLD)


def cmd_report(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from hpcfed.analysis.report import main as report_main

    return report_main(args.run_dirs, args.out) if MPI.COMM_WORLD.Get_rank() == 0 else 0


def cmd_info(args: argparse.Namespace) -> int:
    import h5py
    import mpi4py
    import numpy
    import torch
    from mpi4py import MPI

    from hpcfed.codec import dct
    from hpcfed.config import Config
    from hpcfed.runtime.device import cupy_or_none, visible_gpus
    from hpcfed.runtime.transport import Transport
    from hpcfed.session import place_rank

    comm = MPI.COMM_WORLD
    placement, memory, cuda_aware = place_rank(Config(), Transport(comm))   # what a run with the defaults would do
    placements = comm.gather(f"rank {comm.Get_rank()}: {placement.device}, {memory.transfer} ({placement.reason})")
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
        ("CPU block DCT", dct.fused_kind()),
        ("CUDA-aware MPI", f"{'yes' if cuda_aware.cuda_aware else 'no'} ({cuda_aware.reason})"),
        ("GPUs (rank 0)", f"{visible_gpus()[0]} visible to torch"),
        *(("device: auto" if i == 0 else "", line) for i, line in enumerate(placements)),
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
        status = args.handler(args)
    except HpcfedError as err:
        return _fail(err, comm, log)
    except SystemExit:  # --help / --version
        raise
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
        raise
    if status:   # every rank returns the same status here (e.g. EXIT_RESUMABLE after a stop signal)
        _exit_everywhere(comm, status)
    return status


def _exit_everywhere(comm, status: int) -> int:
    """End every rank with ``status``; called by all ranks together, after the message was printed.

    Under MPICH's mpiexec (hydra), a non-zero exit after MPI_Finalize races with the launcher, which
    kills (signal 9, reported as status 9) ranks still exiting; there MPI_Abort from rank 0 alone gives
    the status deterministically, with rank 0's output silenced first so MPI adds no lines. Other
    launchers (srun, Open MPI's mpirun) report a plain exit status, while an abort would read as a
    cancelled step, so there every rank finalizes and exits with the status.
    """
    from mpi4py import MPI

    sys.stdout.flush()
    sys.stderr.flush()
    if comm.Get_size() == 1 and "mpi4py.run" not in sys.modules:
        return status
    comm.Barrier()                       # everybody has flushed its output
    if "HYDI_CONTROL_FD" not in os.environ:
        MPI.Finalize()
        os._exit(status)
    if comm.Get_rank() == 0:
        time.sleep(FORWARD_S)            # the launcher forwards output asynchronously; the abort would cut it
        silent = os.open(os.devnull, os.O_WRONLY)
        os.dup2(silent, 1)
        os.dup2(silent, 2)
        comm.Abort(status)
    comm.Barrier()                       # never completes: the abort ends this rank
    return status


def _fail(err: HpcfedError, comm, log: logging.Logger) -> int:
    """Print the error once and end every rank with status 2, without hanging or traceback spam."""
    if err.everywhere:
        if comm.Get_rank() == 0:
            print(f"hpcfed: error: {err}", file=sys.stderr, flush=True)
        return _exit_everywhere(comm, EXIT_USAGE)
    log.error("hpcfed: error: %s", err)
    sys.stdout.flush()
    sys.stderr.flush()
    comm.Abort(EXIT_USAGE)
    return EXIT_USAGE
