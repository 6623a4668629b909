"""The run trace, RUN_DIR/trace.h5: one row per step, flushed every step, readable while written.

Rank 0 is the only writer. The file is in HDF5 SWMR mode (single writer, multiple readers):
every dataset is created up front, so the column lists are fixed at :meth:`TraceWriter.create`,
and any process may read it at any time with ``h5py.File(path, "r", swmr=True)``. The file
format is bounded to HDF5 1.10 so that older libraries and tools (Debian's h5dump) open it.

Layout (documented in the README; readers never need hpcfed):

    /                attrs: whatever the caller passes (str/int/float/bool) + format, format_version, n_workers
    /steps/<col>     1-D float64 (``step`` int64), one entry per step
    /workers/<col>   2-D (step x worker) float64 (``used`` int8, -1 when not given); row i <-> /steps row i
    /events          compound (step int64, kind str[32], detail str[512]), fixed-length UTF-8
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.io import LIBVER, fsync_path, read_attrs, write_attrs

FORMAT = "hpcfed-trace"
FORMAT_VERSION = 1
CHUNK_ROWS = 1024
KIND_BYTES = 32
DETAIL_BYTES = 512
RESERVED_ATTRS = ("format", "format_version", "n_workers")
INT_COLUMNS = {"step": np.int64, "used": np.int8}
EVENT_DTYPE = np.dtype([
    ("step", np.int64),
    ("kind", h5py.string_dtype("utf-8", KIND_BYTES)),
    ("detail", h5py.string_dtype("utf-8", DETAIL_BYTES)),
])


def _column_dtype(name: str) -> type:
    return INT_COLUMNS.get(name, np.float64)


def _missing(name: str) -> float | int:
    return -1 if name in INT_COLUMNS else np.nan


def _clip_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes without splitting a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def _append_row(dataset: h5py.Dataset, values: Any) -> None:
    """Grow ``dataset`` by one row holding ``values``.

    Low-level calls: about 6x faster than ``resize`` + ``dataset[n] = values`` with h5py 3.16,
    which matters because every step writes one row to every column.
    """
    n, *rest = dataset.id.shape
    dataset.id.set_extent((n + 1, *rest))
    data = np.empty((1, *rest), dtype=dataset.dtype)
    data[0] = values  # broadcasts a scalar fill value over the workers
    space = dataset.id.get_space()
    space.select_hyperslab((n, *(0,) * len(rest)), data.shape)
    dataset.id.write(h5py.h5s.create_simple(data.shape), space, data, mtype=dataset.id.get_type())


def _check_columns(columns: list[str], table: str) -> list[str]:
    for name in columns:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise HpcfedError(f"trace: {table} column name {name!r}; use a non-empty name without '/'")
    if len(set(columns)) != len(columns):
        raise HpcfedError(f"trace: {table} columns {columns} repeat a name")
    return list(columns)


class TraceWriter:
    """Appends step rows, per-worker rows and events to an open SWMR trace file."""

    def __init__(self, file: h5py.File) -> None:
        self._file = file
        self._steps = dict(file["steps"].items())
        self._workers = dict(file["workers"].items())
        self._events = file["events"]
        self.n_workers = int(file.attrs["n_workers"])

    @classmethod
    def create(cls, path: str | os.PathLike, attrs: Mapping[str, Any], step_columns: list[str],
               worker_columns: list[str], n_workers: int) -> TraceWriter:
        """Create (or overwrite) a trace with these columns; ``step`` is added first if absent."""
        steps = _check_columns(step_columns, "step")
        if "step" not in steps:
            steps.insert(0, "step")
        workers = _check_columns(worker_columns, "worker")
        if n_workers < 1:
            raise HpcfedError(f"trace: n_workers={n_workers}; need at least 1")
        clash = sorted(set(attrs) & set(RESERVED_ATTRS))
        if clash:
            raise HpcfedError(f"trace: attribute {clash[0]!r} is reserved; rename it")
        file = cls._new_file(Path(path), attrs, steps, workers, n_workers)
        file.swmr_mode = True
        return cls(file)

    @classmethod
    def reopen(cls, path: str | os.PathLike, resume_step: int) -> TraceWriter:
        """Continue a trace after a resume: keep rows and events with step <= resume_step, append after.

        The kept contents are read with a SWMR reader (which also opens the file of a writer that
        was killed) and copied into a fresh file that atomically replaces the old one.
        """
        path = Path(path)
        trace = read_trace(path)
        keep = trace["steps"]["step"] <= resume_step
        events = trace["events"]
        keep_events = events["step"] <= resume_step
        attrs = {k: v for k, v in trace["attrs"].items() if k not in RESERVED_ATTRS}
        tmp = path.with_name(path.name + ".tmp")
        file = cls._new_file(tmp, attrs, list(trace["steps"]), list(trace["workers"]),
                             int(trace["attrs"]["n_workers"]))
        n = int(keep.sum())
        for table in ("steps", "workers"):
            for name, values in trace[table].items():
                dataset = file[table][name]
                dataset.resize(n, axis=0)
                dataset[...] = values[keep]
        file.swmr_mode = True
        writer = cls(file)
        for step, kind, detail in zip(*(events[k][keep_events] for k in ("step", "kind", "detail"))):
            writer.event(int(step), kind, detail)
        file.flush()
        os.replace(tmp, path)
        fsync_path(path.parent)
        return writer

    @staticmethod
    def _new_file(path: Path, attrs: Mapping[str, Any], steps: list[str], workers: list[str],
                  n_workers: int) -> h5py.File:
        """A new trace file with every dataset created (SWMR forbids creating objects later)."""
        try:
            file = h5py.File(path, "w", libver=LIBVER)
        except OSError as exc:
            raise HpcfedError(f"trace: cannot create {path} ({str(exc).splitlines()[0]})") from None
        write_attrs(file, attrs, f"trace {path}")
        write_attrs(file, dict(zip(RESERVED_ATTRS, (FORMAT, FORMAT_VERSION, n_workers))), f"trace {path}")
        for table in ("steps", "workers"):  # creation order kept: readers list columns as given
            file.create_group(table, track_order=True)
        for name in steps:
            file.create_dataset(f"steps/{name}", shape=(0,), maxshape=(None,), chunks=(CHUNK_ROWS,),
                                dtype=_column_dtype(name), fillvalue=_missing(name))
        for name in workers:
            file.create_dataset(f"workers/{name}", shape=(0, n_workers), maxshape=(None, n_workers),
                                chunks=(max(1, CHUNK_ROWS // n_workers), n_workers),
                                dtype=_column_dtype(name), fillvalue=_missing(name))
        file.create_dataset("events", shape=(0,), maxshape=(None,), chunks=(64,), dtype=EVENT_DTYPE)
        return file

    def append_step(self, row: Mapping[str, float], workers: Mapping[str, np.ndarray] | None = None) -> None:
        """Append one step; columns not given are NaN (-1 for int columns). ``row['step']`` is required."""
        if "step" not in row:
            raise HpcfedError("trace: append_step needs row['step']")
        unknown = sorted(set(row) - set(self._steps))
        if unknown:
            raise HpcfedError(f"trace: unknown step column {unknown[0]!r}; columns: {sorted(self._steps)}")
        workers = workers or {}
        unknown = sorted(set(workers) - set(self._workers))
        if unknown:
            raise HpcfedError(f"trace: unknown worker column {unknown[0]!r}; columns: {sorted(self._workers)}")
        values = {}
        for name, value in workers.items():
            value = np.asarray(value)
            if value.shape != (self.n_workers,):
                raise HpcfedError(f"trace: worker column {name!r} has shape {value.shape}; "
                                  f"need ({self.n_workers},)")
            values[name] = value
        for name, dataset in self._workers.items():
            _append_row(dataset, values.get(name, _missing(name)))
        # "step" goes last: a reader trims every column to the shortest, so a half-written row is invisible.
        for name in sorted(self._steps, key=lambda c: c == "step"):
            _append_row(self._steps[name], row.get(name, _missing(name)))
        self._file.flush()

    def event(self, step: int, kind: str, detail: str = "") -> None:
        """Record an event (kernel refresh, straggler, checkpoint, resume, ...); text is clipped to fit."""
        n = self._events.shape[0]
        self._events.resize(n + 1, axis=0)
        self._events[n] = (step, _clip_utf8(kind, KIND_BYTES), _clip_utf8(detail, DETAIL_BYTES))
        self._file.flush()

    def close(self) -> None:
        """Flush and close; the file is then a plain HDF5 file for every reader."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_reader(path: Path) -> h5py.File:
    if not path.is_file():
        raise HpcfedError(f"trace file {path} not found")
    try:
        return h5py.File(path, "r", swmr=True)
    except OSError as exc:
        raise HpcfedError(f"trace file {path} is not readable HDF5 ({str(exc).splitlines()[0]})") from None


def _read_table(group: h5py.Group) -> dict[str, np.ndarray]:
    """Every column of a group, each refreshed to what the writer has flushed."""
    columns = {}
    for name, dataset in group.items():
        dataset.refresh()
        columns[name] = dataset[...]
    return columns


def read_trace(path: str | os.PathLike) -> dict[str, dict]:
    """{"attrs", "steps", "workers", "events"} of a trace, complete rows only; safe while it is written."""
    path = Path(path)
    with _open_reader(path) as file:
        try:
            attrs = read_attrs(file)
            steps = _read_table(file["steps"])
            workers = _read_table(file["workers"])
            file["events"].refresh()
            raw_events = file["events"][...]
        except (KeyError, OSError, ValueError) as exc:
            raise HpcfedError(f"trace file {path} lacks the hpcfed layout ({str(exc).splitlines()[0]})") from None
    if "step" not in steps:
        raise HpcfedError(f"trace file {path} lacks the hpcfed layout (no /steps/step)")
    rows = min(len(v) for v in (*steps.values(), *workers.values()))
    events = {"step": raw_events["step"],
              "kind": np.array([x.decode("utf-8") for x in raw_events["kind"]], dtype=object),
              "detail": np.array([x.decode("utf-8") for x in raw_events["detail"]], dtype=object)}
    return {"attrs": attrs,
            "steps": {k: v[:rows] for k, v in steps.items()},
            "workers": {k: v[:rows] for k, v in workers.items()},
            "events": events}


def read_steps(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The per-step table as {column: 1-D array}; safe while the writer is still running."""
    return read_trace(path)["steps"]
