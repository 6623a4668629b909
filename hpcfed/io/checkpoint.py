"""Atomic, self-verifying HDF5 checkpoints: RUN_DIR/checkpoints/step_XXXXXXXX.h5 and a `latest` pointer.

A checkpoint is a flat mapping of '/'-separated names to numpy arrays (stored as HDF5 datasets
under those paths) plus scalar/str root attributes; no pickle. Each dataset carries the CRC-32 of
its bytes. The root attribute ``hpcfed_complete``, the CRC-32 of a manifest of every array's name,
dtype, shape and CRC and of every other root attribute, is written last: a truncated, half-written
or bit-flipped file fails verification (the 1.10 file format also checksums HDF5's own metadata).
Files are written under a ``.tmp`` name, fsync'ed and renamed; the folder is fsync'ed after.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.io import LIBVER, read_attrs, write_atomically, write_attrs

FORMAT = "hpcfed-checkpoint"
FORMAT_VERSION = 1
FOLDER = "checkpoints"
LATEST = "latest"
NAME = re.compile(r"^step_(\d{8,})\.h5$")
CRC_ATTR = "crc32"
MARKER = "hpcfed_complete"
INTERNAL = {"hpcfed_format", "hpcfed_format_version", MARKER}
ARRAY_KINDS = "biufcS"  # bool, ints, floats, complex, bytes: what HDF5 stores natively


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.h5"


def _step_of(path: Path) -> int | None:
    match = NAME.match(path.name)
    return int(match.group(1)) if match else None


def _crc(array: np.ndarray) -> int:
    """CRC-32 of the values' little-endian bytes (so it does not depend on how a reader orders bytes)."""
    return zlib.crc32(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))


def _manifest_crc(entries: list[tuple[str, str, list[int], int]], attrs: Mapping[str, Any]) -> int:
    """CRC-32 of every array's (name, dtype, shape, CRC) and every root attribute but the marker."""
    return zlib.crc32(json.dumps([sorted(entries), sorted(attrs.items())]).encode())


def _check_array(name: str, value: Any) -> np.ndarray:
    if not isinstance(name, str) or not name or name.startswith("/") or name.endswith("/") or "//" in name:
        raise HpcfedError(f"checkpoint: array name {name!r}; use 'a/b/c' without leading, trailing or double '/'")
    array = np.asarray(value)
    if array.dtype.kind not in ARRAY_KINDS:
        raise HpcfedError(f"checkpoint: array {name!r} has dtype {array.dtype}; allowed: bool, int, uint, "
                          "float, complex, bytes (no objects, no pickle)")
    return array


def write_checkpoint(run_dir: str | os.PathLike, step: int, arrays: Mapping[str, np.ndarray],
                     attrs: Mapping[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, point `latest` at it, keep the newest ``keep`` files.

    Checkpoints with a step above ``step`` are removed too: they belong to the timeline abandoned
    when the run was resumed from an earlier step.
    """
    if keep < 1:
        raise HpcfedError(f"checkpoint.keep={keep}; need at least 1")
    if step < 0:
        raise HpcfedError(f"checkpoint: step={step}; need 0 or more")
    clash = sorted(set(attrs) & (INTERNAL | {"step"}))
    if clash:
        raise HpcfedError(f"checkpoint: attribute {clash[0]!r} is reserved; rename it")
    checked = {name: _check_array(name, value) for name, value in arrays.items()}
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step)

    def write(tmp: Path) -> None:
        entries = []
        root = {**attrs, "step": step, "hpcfed_format": FORMAT, "hpcfed_format_version": FORMAT_VERSION}
        with h5py.File(tmp, "w", libver=LIBVER) as file:
            write_attrs(file, root, f"checkpoint {path}")
            root = read_attrs(file)  # as stored (numpy scalars become Python values)
            for name, array in checked.items():
                try:
                    dataset = file.create_dataset(name, data=array)
                except (ValueError, TypeError) as exc:
                    raise HpcfedError(f"checkpoint: cannot store array {name!r} ({exc})") from None
                crc = _crc(array)
                dataset.attrs[CRC_ATTR] = crc
                entries.append((name, array.dtype.newbyteorder("<").str, list(array.shape), crc))
            file.attrs[MARKER] = _manifest_crc(entries, root)  # last: its presence means the file is complete

    write_atomically(path, write)
    write_atomically(folder / LATEST, lambda tmp: tmp.write_text(path.name + "\n"))
    _prune(folder, step, keep)
    return path


def _prune(folder: Path, step: int, keep: int) -> None:
    """Delete leftover temp files, checkpoints newer than ``step``, and all but the newest ``keep``."""
    for tmp in folder.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    files = sorted((s, p) for p in folder.iterdir() if (s := _step_of(p)) is not None)
    current = [p for s, p in files if s <= step]
    for p in current[:-keep] + [p for s, p in files if s > step]:
        p.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays by name, attrs incl. ``step``) of a verified checkpoint; HpcfedError if bad."""
    path = Path(path)
    if not path.is_file():
        raise HpcfedError(f"checkpoint {path} not found")
    arrays: dict[str, np.ndarray] = {}
    entries = []
    try:
        with h5py.File(path, "r") as file:
            attrs = read_attrs(file)
            if MARKER not in attrs or attrs.get("hpcfed_format") != FORMAT:
                raise ValueError("no completion marker")

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    array = arrays[name] = obj[...]
                    crc = int(obj.attrs[CRC_ATTR])
                    if _crc(array) != crc:
                        raise ValueError(f"checksum mismatch in {name!r}")
                    entries.append((name, array.dtype.newbyteorder("<").str, list(array.shape), crc))

            file.visititems(visit)
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HpcfedError(f"checkpoint {path} is corrupt or incomplete ({reason})") from None
    if _manifest_crc(entries, {k: v for k, v in attrs.items() if k != MARKER}) != attrs[MARKER]:
        raise HpcfedError(f"checkpoint {path} is corrupt or incomplete (manifest checksum mismatch)")
    return arrays, {k: v for k, v in attrs.items() if k not in INTERNAL}


def _folder_of(target: Path) -> Path:
    if (target / FOLDER).is_dir():
        return target / FOLDER
    if (target / LATEST).exists() or any(_step_of(p) is not None for p in target.iterdir()):
        return target
    raise HpcfedError(f"no checkpoints in {target} (expected {target / FOLDER})")


def find_resume_checkpoint(run_dir_or_file: str | os.PathLike) -> tuple[Path, list[str]]:
    """The checkpoint to resume from and one warning line per bad file or pointer skipped.

    A file is used as given (HpcfedError if bad). For a run folder (or its checkpoints folder)
    the newest checkpoint that verifies wins; `latest` is checked against it.
    """
    target = Path(run_dir_or_file)
    if not target.exists():
        raise HpcfedError(f"resume: {target} does not exist; give a run folder or a checkpoint file")
    if target.is_file():
        read_checkpoint(target)
        return target, []
    folder = _folder_of(target)
    warnings: list[str] = []
    latest = folder / LATEST
    pointed = latest.read_text().strip() if latest.is_file() else None
    if pointed is None:
        warnings.append(f"checkpoint pointer {latest} is missing; using the newest good checkpoint")
    elif not NAME.match(pointed):
        warnings.append(f"checkpoint pointer {latest} holds {pointed!r}, not a checkpoint name; ignored")
    files = sorted((p for p in folder.iterdir() if _step_of(p) is not None), key=_step_of, reverse=True)
    for path in files:
        try:
            read_checkpoint(path)
        except HpcfedError as exc:
            warnings.append(f"{exc}; skipped")
            continue
        if pointed is not None and NAME.match(pointed) and pointed != path.name:
            warnings.append(f"checkpoint pointer {latest} names {pointed}; resuming from newer good {path.name}"
                            if _step_of(Path(pointed)) < _step_of(path) else
                            f"checkpoint pointer {latest} names {pointed}, which is missing or bad; "
                            f"resuming from {path.name}")
        return path, warnings
    raise HpcfedError(f"no good checkpoint in {folder} ({len(files)} found, all corrupt or incomplete)")
