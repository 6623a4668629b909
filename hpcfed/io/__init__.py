"""HDF5 files of a run: traces (:mod:`.trace`) and checkpoints (:mod:`.checkpoint`).

This package module holds the two helpers both share: HDF5 attributes restricted to
plain scalars and strings, so any HDF5 reader (h5py, h5dump, pandas) understands them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcfed.errors import HpcfedError

AttrValue = str | int | float | bool
# HDF5 1.10 file format exactly: SWMR and metadata checksums need >= 1.10, and the cap keeps
# files readable by HDF5 1.10 libraries and tools (Debian 12's h5dump is 1.10.8).
LIBVER = ("v110", "v110")
MAX_STR_BYTES = 60_000  # an attribute must fit in one 64 KiB object-header message


def write_attrs(obj: Any, attrs: Mapping[str, Any], what: str) -> None:
    """Store ``attrs`` on an h5py object; only str/int/float/bool (numpy scalars too) are allowed.

    Strings are stored as fixed-length UTF-8 (h5py reads them back as bytes): variable-length
    strings live in HDF5's unchecksummed global heap, where one flipped byte can hang the reader.
    """
    for key, value in attrs.items():
        if not isinstance(key, str) or not key:
            raise HpcfedError(f"{what}: attribute name {key!r} must be a non-empty string")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, int, float, bool)):
            raise HpcfedError(
                f"{what}: attribute {key!r} has type {type(value).__name__}; allowed: str, int, "
                "float, bool (store structures as JSON text)"
            )
        if isinstance(value, str):  # fixed length: kept in the checksummed object header, not the global heap
            data = value.encode("utf-8")
            if len(data) > MAX_STR_BYTES:
                raise HpcfedError(f"{what}: attribute {key!r} is {len(data)} bytes of text; at most "
                                  f"{MAX_STR_BYTES} (store large data as an array)")
            value = np.array(data, dtype=h5py.string_dtype("utf-8", max(1, len(data))))
        obj.attrs[key] = value


def read_attrs(obj: Any) -> dict[str, AttrValue]:
    """An h5py object's attributes as plain Python values."""
    out: dict[str, AttrValue] = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync the file, rename it to ``path``, fsync the folder.

    The one atomic-write helper of hpcfed: readers never see half a file, and a failed write
    leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync_path(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)
