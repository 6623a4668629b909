"""Resuming a run: find its checkpoint, and refuse a config that changes what a step computes."""

from __future__ import annotations

from pathlib import Path

import yaml

from hpcfed.config import Config
from hpcfed.errors import HpcfedError
from hpcfed.io.checkpoint import find_resume_checkpoint

MUTABLE = ("train.steps", "train.eval_every", "train.eval_batch_size", "train.threads", "federated.rounds", "checkpoint", "faults",
           "output.dir", "device", "server_device", "mpi")


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
