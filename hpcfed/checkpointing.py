"""Checkpoints of a whole job: state gathered from every rank to rank 0, and scattered back on resume.

A checkpoint holds the global state every rank shares (parameters, optimizer state) once,
plus each rank's own state (codec residual and kernel, RNG states, per-client optimizer
state) under ``rank<R>/``. Rank 0 writes it with :func:`hpcfed.io.checkpoint.write_checkpoint`
(temporary name, fsync, rename, ``latest`` pointer). On resume the config may change only in
keys that do not alter what a step computes (:data:`MUTABLE`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from hpcfed.config import Config
from hpcfed.errors import HpcfedError
from hpcfed.io.checkpoint import find_resume_checkpoint, read_checkpoint, write_checkpoint
from hpcfed.optim import export_state, import_state
from hpcfed.runtime.comm import SERVER
from hpcfed.session import Session

MUTABLE = ("train.steps", "train.eval_every", "train.threads", "federated.rounds", "checkpoint", "faults",
           "output.dir", "device", "server_device", "mpi")


@dataclass
class LocalState:
    """One rank's own state: named arrays plus small JSON-able values."""

    arrays: dict[str, np.ndarray]
    values: dict[str, object]


def save(session: Session, step: int, local: LocalState) -> Path | None:
    """Collective: gather every rank's state; rank 0 writes the checkpoint and returns its path."""
    comm = session.channel.comm
    gathered = comm.gather(local, root=SERVER)
    if not session.is_server:
        return None
    state = export_state(session.model, session.optimizer).cpu().numpy()
    arrays = {"model/params": state[:session.model.size], "optimizer/state": state[session.model.size:]}
    values = {}
    for rank, state in enumerate(gathered):
        arrays.update({f"rank{rank}/{name}": np.asarray(a) for name, a in state.arrays.items()})
        values[f"rank{rank}"] = state.values
    attrs = {"config": session.cfg.to_yaml(), "config_digest": session.cfg.digest(), "world_size": comm.Get_size(),
             "algorithm": session.cfg.algorithm, "rank_values": json.dumps(values)}
    return write_checkpoint(session.run_dir, step, arrays, attrs, session.cfg.checkpoint.keep)


def locate(source: str) -> tuple[Path, Path, list[str]]:
    """(run folder, checkpoint file, warnings) for ``--resume RUN_DIR`` or ``--resume FILE``."""
    path, warnings = find_resume_checkpoint(source)
    return path.parent.parent, path, warnings


def check_compatible(stored_yaml: str, cfg: Config, world_size: int, stored_world: int) -> None:
    """Refuse (one line) a resume whose config changes what a step computes."""
    if world_size != stored_world:
        raise HpcfedError(f"--resume: the checkpoint was written by {stored_world} ranks; this job has "
                          f"{world_size} (launch with mpiexec -n {stored_world})")
    before, after = _flatten(yaml.safe_load(stored_yaml)), _flatten(cfg.model_dump())
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key) and not any(key == m or key.startswith(m + ".") for m in MUTABLE):
            raise HpcfedError(f"--resume: config key '{key}' differs from the checkpoint ({before.get(key)!r} -> "
                              f"{after.get(key)!r}); only {', '.join(MUTABLE)} may change")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def restore(session: Session, checkpoint: Path | None) -> tuple[int, LocalState]:
    """Collective: every rank takes the shared state and its own from rank 0's checkpoint.

    Returns the checkpoint's step and this rank's :class:`LocalState`.
    """
    comm = session.channel.comm
    shared, parts = None, None
    if session.is_server:
        arrays, attrs = read_checkpoint(checkpoint)
        values = json.loads(attrs["rank_values"])
        shared = (int(attrs["step"]), np.concatenate([arrays["model/params"], arrays["optimizer/state"]]))
        parts = [LocalState({name.split("/", 1)[1]: a for name, a in arrays.items() if name.startswith(f"rank{r}/")},
                            values[f"rank{r}"]) for r in range(comm.Get_size())]
    step, flat = comm.bcast(shared, root=SERVER)
    import_state(session.model, session.optimizer, torch.from_numpy(flat).to(session.model.params.device))
    return step, comm.scatter(parts, root=SERVER)
