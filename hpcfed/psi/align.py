"""`hpcfed align`: private set intersection of sample ids across parties, then a joint shuffle.

Parties are groups of ``ranks_per_party`` consecutive ranks. A party's ranks share its
secret key and split its blinding work; its first rank, the leader, talks to the other
parties. Every value that crosses a party boundary is blinded by at least its owner's key:

1. every rank reads its party's ids (text / CSV column / HDF5 dataset) and normalises them;
   leaders exchange hash commitments to random shuffle shares (intersection mode);
2. the party's ranks hash + blind a slice each; the leader drops repeated ids (keeps the
   first row) and orders the set by blinded value, which hides the file's row order;
3. ring of P-1 hops: each leader passes the set it holds to the next party, which blinds
   it (split over its ranks); in cardinality mode every blinder also re-sorts;
4. intersection mode: one more hop hands every fully blinded set back to its owner in the
   order it was sent; all sets go to party 0's leader (the collector), which intersects
   them and broadcasts the common values. Cardinality mode: it broadcasts only the count;
5. shares are revealed and checked against the commitments; seed = H(shares); each party
   orders its common ids by BLAKE2b keyed with the seed (the same ids, so the same order
   everywhere, which the leaders confirm by comparing a digest of the ordered blinded values);
6. each leader writes ``RUN_DIR/align/party_K.h5`` (temp name, fsync, rename).
"""

from __future__ import annotations

import csv
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice, pairwise
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.psi import ecdh
from hpcfed.psi.config import AlignConfig, Normalize, PartySource, load_align_config

READ_CHUNK = 1 << 16   # rows parsed per step (bounds the Python objects alive at once)
SEND_CHUNK = 1 << 20   # points per MPI message (32 MiB)
WRITE_CHUNK = 1 << 18  # ids decoded + written per step
TAG_POINTS = 71
T = TypeVar("T")


# ---------------------------------------------------------------- reading ids

@dataclass
class IdTable:
    """One party's normalised ids, compact: UTF-8 bytes back to back + offsets + source rows."""

    data: np.ndarray     # uint8
    offsets: np.ndarray  # int64, len(rows) + 1
    rows: np.ndarray     # int64: the id's row in the source (line, CSV data row, dataset element)
    n_empty: int         # rows skipped because the id was empty after normalising

    def __len__(self) -> int:
        return len(self.rows)

    def encoded(self, start: int, stop: int) -> Iterator[bytes]:
        """Ids ``start:stop`` as UTF-8 bytes (unpacked a block at a time)."""
        for low in range(start, stop, READ_CHUNK):
            high = min(low + READ_CHUNK, stop)
            buf = self.data[self.offsets[low]:self.offsets[high]].tobytes()
            ends = (self.offsets[low:high + 1] - self.offsets[low]).tolist()
            yield from (buf[a:b] for a, b in pairwise(ends))

    def encoded_at(self, index: np.ndarray) -> Iterator[bytes]:
        """The ids at ``index`` as UTF-8 bytes."""
        for low in range(0, len(index), READ_CHUNK):
            for i in index[low:low + READ_CHUNK].tolist():
                yield self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def strings(self, index: np.ndarray) -> list[str]:
        """The ids at ``index`` as str."""
        return [raw.decode() for raw in self.encoded_at(index)]


class _SourceProblem(ValueError):
    """A readable file whose content does not fit the config (message completes 'FILE ...')."""


def _text_rows(path: Path) -> Iterator[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        while chunk := list(islice(handle, READ_CHUNK)):
            yield [line.rstrip("\r\n") for line in chunk]


def _csv_rows(path: Path, column: str) -> Iterator[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise _SourceProblem(f"is empty (expected a header row with column '{column}')")
        if column not in header:
            raise _SourceProblem(f"has no column '{column}' (columns: {', '.join(header)})")
        at = header.index(column)
        while chunk := list(islice(reader, READ_CHUNK)):
            yield [row[at] if at < len(row) else "" for row in chunk]


def _hdf5_rows(path: Path, name: str) -> Iterator[list[str]]:
    with h5py.File(path, "r") as handle:
        node = handle.get(name)
        if not isinstance(node, h5py.Dataset):
            raise _SourceProblem(f"has no dataset '{name}' (top level: {', '.join(handle.keys()) or 'nothing'})")
        if node.ndim != 1:
            raise _SourceProblem(f"dataset '{name}' has shape {node.shape}; a 1-D dataset of ids is needed")
        if node.dtype.kind in "iu":
            view: Any = node
        elif node.dtype.kind == "S" or h5py.check_string_dtype(node.dtype):
            view = node.asstr(encoding="utf-8")
        else:
            raise _SourceProblem(f"dataset '{name}' holds {node.dtype}; ids must be strings or integers")
        for start in range(0, node.shape[0], READ_CHUNK):
            yield [str(value) for value in view[start:start + READ_CHUNK]]


def _table(chunks: Iterator[list[str]], normalize: Normalize) -> IdTable:
    parts: list[bytes] = []
    lengths: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    first_row = n_empty = 0
    for chunk in chunks:
        encoded, kept = [], []
        for row, text in enumerate(chunk, first_row):
            text = text.strip() if normalize.strip else text
            text = text.lower() if normalize.lower else text
            if text:
                encoded.append(text.encode())
                kept.append(row)
        n_empty += len(chunk) - len(kept)
        first_row += len(chunk)
        parts.append(b"".join(encoded))
        lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        rows.append(np.asarray(kept, dtype=np.int64))
    sizes = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return IdTable(np.frombuffer(b"".join(parts), dtype=np.uint8),
                   offsets, np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64), n_empty)


def read_ids(source: PartySource, normalize: Normalize, party: int) -> IdTable:
    """Stream one party's ids from its file; every problem is one line naming party and file."""
    path = source.path
    where = f"party {party}: {source.kind} file '{path}'"
    if not path.exists():
        raise HpcfedError(f"{where} not found (parties.{party}.path)")
    if path.is_dir():
        raise HpcfedError(f"{where} is a directory, not a file (parties.{party}.path)")
    chunks = (_csv_rows(path, source.column) if source.column else
              _hdf5_rows(path, source.dataset) if source.dataset else _text_rows(path))
    try:
        return _table(chunks, normalize)
    except _SourceProblem as problem:
        raise HpcfedError(f"{where} {problem}") from None
    except UnicodeDecodeError as err:
        raise HpcfedError(f"{where} is not UTF-8 text ({err.reason} at byte {err.start} of a block)") from None
    except (OSError, csv.Error) as err:
        raise HpcfedError(f"{where} cannot be read: {' '.join(str(err).split())}") from None


# ------------------------------------------------------------ communication

def _agreed(comm: Any, action: Callable[[], T]) -> T:
    """Run ``action`` on every rank; if any rank raises HpcfedError, all raise its line together."""
    try:
        value, problem = action(), None
    except HpcfedError as err:
        value, problem = None, str(err)
    problems = [p for p in comm.allgather(problem) if p]
    if problems:
        raise HpcfedError(problems[0], everywhere=True)
    return value  # type: ignore[return-value]


@dataclass
class Layout:
    """Which party this rank serves, its party's communicator, and the leaders' one (leaders only)."""

    party: int
    n_parties: int
    party_comm: Any
    leaders: Any | None

    @classmethod
    def split(cls, comm: Any, config: AlignConfig) -> Layout:
        n_parties, per_party = len(config.parties), config.ranks_per_party
        if comm.Get_size() != n_parties * per_party:
            raise HpcfedError(
                f"align: started with {comm.Get_size()} ranks, but {n_parties} parties x ranks_per_party "
                f"{per_party} need exactly {n_parties * per_party} (mpiexec -n {n_parties * per_party})",
                everywhere=True)
        rank = comm.Get_rank()
        is_leader = rank % per_party == 0
        party_comm = comm.Split(rank // per_party, rank)
        leaders = comm.Split(0 if is_leader else 1, rank)
        if not is_leader:
            leaders.Free()
        return cls(rank // per_party, n_parties, party_comm, leaders if is_leader else None)

    def free(self) -> None:
        self.party_comm.Free()
        if self.leaders is not None:
            self.leaders.Free()


def _split_bytes(n_points: int, parts: int) -> np.ndarray:
    """Byte counts of an even split of ``n_points`` points over ``parts`` ranks."""
    bounds = np.arange(parts + 1, dtype=np.int64) * n_points // parts
    return np.diff(bounds) * ecdh.POINT_BYTES


def _gather_points(party_comm: Any, mine: np.ndarray) -> np.ndarray | None:
    """Concatenate every party rank's points, in rank order, on the party leader."""
    counts = np.asarray(party_comm.allgather(mine.size), dtype=np.int64)
    out = np.empty(int(counts.sum()), dtype=np.uint8) if party_comm.Get_rank() == 0 else None
    party_comm.Gatherv(np.ascontiguousarray(mine).reshape(-1), [out, counts] if out is not None else None, root=0)
    return None if out is None else out.reshape(-1, ecdh.POINT_BYTES)


def _blind_in_party(party_comm: Any, points: np.ndarray | None, key: bytes) -> np.ndarray | None:
    """Blind the leader's ``points`` with the party key, split evenly over the party's ranks."""
    n_points = party_comm.bcast(None if points is None else len(points), root=0)
    counts = _split_bytes(n_points, party_comm.Get_size())
    mine = np.empty(int(counts[party_comm.Get_rank()]), dtype=np.uint8)
    send = None if points is None else [np.ascontiguousarray(points).reshape(-1), counts]
    party_comm.Scatterv(send, mine, root=0)
    return _gather_points(party_comm, ecdh.blind(mine.reshape(-1, ecdh.POINT_BYTES), key))


def _party_key(party_comm: Any) -> bytes:
    """The party's secret scalar: drawn by its leader, shared with its ranks only."""
    buf = np.frombuffer(ecdh.new_key(), dtype=np.uint8).copy()
    party_comm.Bcast(buf, root=0)
    return buf.tobytes()


class Wire:
    """Leader-to-leader transfers of point arrays in bounded messages; counts bytes sent."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.bytes_sent = 0

    def _post(self, points: np.ndarray, dest: int) -> list[Any]:
        points = np.ascontiguousarray(points)
        self.bytes_sent += points.nbytes
        return [self.comm.Isend(points[s:s + SEND_CHUNK], dest=dest, tag=TAG_POINTS)
                for s in range(0, len(points), SEND_CHUNK)]

    def _take(self, n_points: int, source: int) -> np.ndarray:
        out = np.empty((n_points, ecdh.POINT_BYTES), dtype=np.uint8)
        for s in range(0, n_points, SEND_CHUNK):
            self.comm.Recv(out[s:s + SEND_CHUNK], source=source, tag=TAG_POINTS)
        return out

    def pass_on(self, points: np.ndarray) -> np.ndarray:
        """Send ``points`` to the next party in the ring; return what the previous one sent."""
        after, before = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        n_in = self.comm.sendrecv(len(points), dest=after, source=before)
        requests = self._post(points, after)
        received = self._take(n_in, before)
        for request in requests:
            request.Wait()
        return received

    def to_collector(self, points: np.ndarray) -> list[np.ndarray] | None:
        """Every leader's ``points`` on leader 0 (in party order), None elsewhere."""
        if self.rank:
            self.comm.send(len(points), dest=0, tag=TAG_POINTS)
            for request in self._post(points, 0):
                request.Wait()
            return None
        return [points] + [self._take(self.comm.recv(source=q, tag=TAG_POINTS), q) for q in range(1, self.size)]

    def from_collector(self, points: np.ndarray | None) -> np.ndarray:
        """Leader 0's ``points`` on every leader."""
        n_points = self.comm.bcast(None if points is None else len(points), root=0)
        out = np.empty((n_points, ecdh.POINT_BYTES), dtype=np.uint8) if points is None else np.ascontiguousarray(points)
        if self.rank == 0:
            self.bytes_sent += out.nbytes * (self.size - 1)
        for s in range(0, n_points, SEND_CHUNK):
            self.comm.Bcast(out[s:s + SEND_CHUNK], root=0)
        return out


# ---------------------------------------------------------------- protocol

@dataclass
class Blinded:
    """A leader's state after the blinding rounds."""

    index: np.ndarray    # IdTable index of each unique id, in the order the set was sent
    final: np.ndarray    # intersection mode: own set fully blinded, aligned with ``index``;
                         # cardinality mode: the (sorted) fully blinded set of the next party
    share: bytes
    commitments: list[bytes]
    wire: Wire


def _blind_rounds(lay: Layout, table: IdTable, config: AlignConfig) -> Blinded | None:
    """Steps 1-4 on every rank of every party: hash, blind, pass around the ring."""
    key = _party_key(lay.party_comm)
    leader = lay.leaders is not None
    cardinality = config.mode == "cardinality"
    share, commitments = b"", []
    if leader and not cardinality:
        fixed = config.parties[lay.party].test_share
        share = bytes.fromhex(fixed) if fixed else secrets.token_bytes(32)
        commitments = lay.leaders.allgather(ecdh.commitment(lay.party, share))
    rank, ranks = lay.party_comm.Get_rank(), lay.party_comm.Get_size()
    start, stop = len(table) * rank // ranks, len(table) * (rank + 1) // ranks
    blinded = _gather_points(lay.party_comm, ecdh.hash_and_blind(table.encoded(start, stop), key))
    index = ecdh.first_occurrences(blinded) if blinded is not None else np.zeros(0, dtype=np.int64)
    current = blinded[index] if blinded is not None else None
    wire = Wire(lay.leaders) if leader else None
    for _ in range(lay.n_parties - 1):
        incoming = wire.pass_on(current) if wire else None
        current = _blind_in_party(lay.party_comm, incoming, key)
        if current is not None and cardinality:
            current = ecdh.sort_points(current)
    if wire is None:
        return None
    final = current if cardinality else wire.pass_on(current)
    return Blinded(index, final, share, commitments, wire)


@dataclass
class Outcome:
    """What a leader learned: the intersection size and, in intersection mode, its aligned rows."""

    n_intersection: int
    aligned: np.ndarray | None  # IdTable index of each common id, in the joint shuffled order
    seed: bytes | None
    order_digest: bytes | None


def _intersect(lay: Layout, table: IdTable, state: Blinded, config: AlignConfig) -> Outcome:
    """Step 4 (collector) and step 5 (joint shuffle) on the leaders."""
    wire = state.wire
    sets = wire.to_collector(state.final)
    common = ecdh.intersect(sets) if sets is not None else None
    if config.mode == "cardinality":
        return Outcome(wire.comm.bcast(None if common is None else len(common), root=0), None, None, None)
    common = wire.from_collector(common)
    shares = wire.comm.allgather(state.share)
    for party, (share, promised) in enumerate(zip(shares, state.commitments)):
        if ecdh.commitment(party, share) != promised:
            raise HpcfedError(f"align: party {party}'s revealed shuffle share does not match its commitment")
    seed = ecdh.joint_seed(shares)
    mine = state.index[ecdh.positions(state.final, common)]  # IdTable index of each common value
    order = ecdh.shuffle_order(table.encoded_at(mine), seed)
    digest = ecdh.order_digest(common[order])
    if len(set(wire.comm.allgather(digest))) != 1:
        raise HpcfedError("align: the parties ended with different aligned orders (run the same hpcfed everywhere)")
    return Outcome(len(common), mine[order], seed, digest)


# ------------------------------------------------------------------ output

def output_path(config: AlignConfig, party: int) -> Path:
    """Where party ``party`` writes its result: ``RUN_DIR/align/party_K.h5``."""
    return config.output.dir / "align" / f"party_{party}.h5"


def _write(path: Path, table: IdTable, state: Blinded, outcome: Outcome, config: AlignConfig,
           party: int, seconds: float) -> None:
    """Write the party's file under a temp name, fsync it, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as out:
            out.attrs.update({
                "party": party, "n_parties": len(config.parties), "n_input": len(table),
                "n_empty": table.n_empty, "n_duplicates": len(table) - len(state.index),
                "duplicates": "repeated ids dropped; the first occurrence's row is kept",
                "n_intersection": outcome.n_intersection, "mode": config.mode, "protocol": ecdh.PROTOCOL,
                "bytes_sent": state.wire.bytes_sent, "seconds": seconds, "config": config.to_yaml(),
            })
            if outcome.aligned is not None:
                out.attrs["shuffle_seed"] = outcome.seed.hex()
                out.attrs["order_digest"] = outcome.order_digest.hex()
                n = len(outcome.aligned)
                ids = out.create_dataset("ids", shape=(n,), dtype=h5py.string_dtype("utf-8"))
                for s in range(0, n, WRITE_CHUNK):
                    ids[s:s + WRITE_CHUNK] = np.array(table.strings(outcome.aligned[s:s + WRITE_CHUNK]), dtype=object)
                out.create_dataset("rows", data=table.rows[outcome.aligned])
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise HpcfedError(f"align: cannot write '{path}' (output.dir): {' '.join(str(err).split())}") from None


def _finish(lay: Layout, table: IdTable, state: Blinded, config: AlignConfig, started: float) -> str:
    """Intersect, shuffle and write (leaders); returns the party's one-line summary."""
    outcome = _intersect(lay, table, state, config)
    path = output_path(config, lay.party)
    _write(path, table, state, outcome, config, lay.party, time.perf_counter() - started)
    return (f"align: party {lay.party}: {len(table)} ids ({len(table) - len(state.index)} duplicates dropped, "
            f"first occurrence kept; {table.n_empty} empty skipped); {config.mode} size "
            f"{outcome.n_intersection}; wrote {path}")


def main(config_path: str, overrides: list[str], comm: Any) -> int:
    """Run the alignment on ``comm`` (every rank calls this); returns the exit status.

    Errors are HpcfedError lines raised on every rank together (``everywhere=True``).
    """
    started = time.perf_counter()
    config = _agreed(comm, lambda: load_align_config(config_path, overrides))
    lay = Layout.split(comm, config)
    table = _agreed(comm, lambda: read_ids(config.parties[lay.party], config.normalize, lay.party))
    state = _blind_rounds(lay, table, config)
    line = _agreed(comm, lambda: _finish(lay, table, state, config, started) if state is not None else None)
    lay.free()
    lines = comm.gather(line, root=0)
    if lines is not None:
        print("\n".join(filter(None, lines)), flush=True)
    return 0
