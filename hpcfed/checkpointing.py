"""Checkpoints of a whole job: state gathered from every rank to rank 0, and scattered back on resume.

A checkpoint holds the global state every rank shares (parameters, buffers, optimizer state) once,
plus each rank's own state (codec residual and kernel, RNG states, per-client optimizer
state) under ``rank<R>/``. Rank 0 writes it with :func:`hpcfed.io.checkpoint.write_checkpoint`
(temporary name, fsync, rename, ``latest`` pointer). On resume the config may change only in
keys that do not alter what a step computes (:mod:`hpcfed.resume`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpcfed.io.checkpoint import read_checkpoint, write_checkpoint
from hpcfed.optim import export_state, import_state
from hpcfed.session import Session



@dataclass
class LocalState:
    """One rank's own state: named arrays plus small JSON-able values."""

    arrays: dict[str, np.ndarray]
    values: dict[str, object]


def save(session: Session, step: int, local: LocalState) -> Path | None:
    """Collective: gather every rank's state; rank 0 writes the checkpoint and returns its path."""
    transport = session.transport
    gathered = transport.gather(local)
    if not session.is_server:
        return None
    state = export_state(session.model, session.optimizer).cpu().numpy()
    arrays = {"model/params": state[:session.model.size], "optimizer/state": state[session.model.size:],
              "model/buffers": session.model.export_buffers().cpu().numpy()}
    values = {}
    for rank, state in enumerate(gathered):
        arrays.update({f"rank{rank}/{name}": np.asarray(a) for name, a in state.arrays.items()})
        values[f"rank{rank}"] = state.values
    attrs = {"config": session.cfg.to_yaml(), "config_digest": session.cfg.digest(), "world_size": transport.size,
             "algorithm": session.cfg.algorithm, "rank_values": json.dumps(values)}
    return write_checkpoint(session.run_dir, step, arrays, attrs, session.cfg.checkpoint.keep)


def restore(session: Session, checkpoint: Path | None) -> tuple[int, LocalState]:
    """Collective: every rank takes the shared state and its own from rank 0's checkpoint.

    Returns the checkpoint's step and this rank's :class:`LocalState`.
    """
    transport = session.transport
    shared, parts = None, None
    if session.is_server:
        arrays, attrs = read_checkpoint(checkpoint)
        values = json.loads(attrs["rank_values"])
        shared = (int(attrs["step"]), np.concatenate([arrays["model/params"], arrays["optimizer/state"]]),
                  arrays["model/buffers"])
        parts = [LocalState({name.split("/", 1)[1]: a for name, a in arrays.items() if name.startswith(f"rank{r}/")},
                            values[f"rank{r}"]) for r in range(transport.size)]
    step, flat, buffers = transport.bcast(shared)
    device = session.model.params.device
    import_state(session.model, session.optimizer, torch.from_numpy(flat).to(device))
    session.model.import_buffers(torch.from_numpy(buffers).to(device))
    return step, transport.scatter(parts)
