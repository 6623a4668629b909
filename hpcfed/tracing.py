"""Open the run's HDF5 trace on rank 0 with the attributes every analysis wants."""

from __future__ import annotations

import json
import platform
import socket
import time

import h5py
import numpy as np
import torch

from hpcfed import __version__
from hpcfed.codec import dct
from hpcfed.io.trace import TraceWriter
from hpcfed.session import Session


def open_trace(session: Session, step_columns: list[str], worker_columns: list[str],
               resume_step: int | None) -> TraceWriter | None:
    """Collective (host names, devices); rank 0 creates RUN_DIR/trace.h5, or reopens it
    on resume, truncated to the checkpoint's step."""
    transport = session.transport
    hosts = transport.gather(socket.gethostname())
    devices = transport.gather(f"{session.placement.device} ({session.placement.reason}; transfer "
                               f"{session.memory.transfer}; wait {session.waiting}; cpu dct {dct.fused_kind()})")
    if not session.is_server:
        return None
    path = session.run_dir / "trace.h5"
    if resume_step is not None and path.exists():
        trace = TraceWriter.reopen(path, resume_step)
        trace.event(resume_step, "resume", f"from {session.checkpoint.name}")
        return trace
    attrs = {
        "config": session.cfg.to_yaml(),
        "algorithm": session.cfg.algorithm,
        "hpcfed_version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "mpi4py": transport.binding_version(),
        "mpi_library": transport.library_version(),
        "cuda_aware_mpi": session.cuda_aware.cuda_aware,
        "cuda_aware_reason": session.cuda_aware.reason,
        "hosts": json.dumps(hosts),
        "devices": json.dumps(devices),
        "world_size": transport.size,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return TraceWriter.create(path, attrs, step_columns, worker_columns, session.n_workers)
