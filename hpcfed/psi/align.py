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

All communication goes through :class:`hpcfed.runtime.transport.Transport` (this module does
not import mpi4py) and uses only its integer and byte-buffer calls, so nothing a rank receives
is ever unpickled, between parties or inside one:

* counts travel as int64 buffers (``send_ints``, ``sendrecv_ints``, ``bcast_ints``,
  ``allgather_ints``) and are range-checked before anything is allocated for them;
* points as uint8 buffers of ``32 * count`` bytes, in messages of at most SEND_CHUNK points;
* commitments, shuffle shares and order digests as 32-byte uint8 buffers, each sent by its
  owner straight to every other leader;
* errors: every rank contributes one int64 by ``allgather_ints`` (-1, or the byte length of
  its error line); the lowest failing rank then broadcasts its line as a uint8 buffer of that
  length (UTF-8, cut to PROBLEM_BYTES at a character boundary), which every rank decodes
  (bad bytes replaced, non-printable characters blanked) and raises, so bad input still ends
  every rank with one line naming the party and file, exit status 2. Summary lines reach
  rank 0 the same way (lengths by ``allgather_ints``, text by ``gatherv_bytes``).

``bytes_sent`` in a party's file counts every byte its leader sent to the other parties
(points, counts, commitments, shares, digests), as the leaders' transport counted them.
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
from typing import TYPE_CHECKING, Any, TypeVar

import h5py
import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.psi import ecdh
from hpcfed.psi.config import AlignConfig, Normalize, PartySource, load_align_config

if TYPE_CHECKING:   # imported in main(): the transport pulls in torch, which reading ids does not need
    from hpcfed.runtime.transport import Transport

READ_CHUNK = 1 << 16   # rows parsed per step (bounds the Python objects alive at once)
SEND_CHUNK = 1 << 20   # points per MPI message (32 MiB)
WRITE_CHUNK = 1 << 18  # ids decoded + written per step
DIGEST_BYTES = 32      # commitments, shuffle shares and order digests (SHA-256 / 32 random bytes)
PROBLEM_BYTES = 512    # an error line crosses ranks as at most this many UTF-8 bytes
LINE_BYTES = 4096      # a party's summary line, likewise
MAX_COUNT = 1 << 40    # larger point counts from another rank are refused before allocating
TAG_POINTS, TAG_COUNT, TAG_COMMIT, TAG_SHARE, TAG_DIGEST = 71, 72, 73, 74, 75
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
# Transport integer and byte-buffer calls only, never a pickle (see the module docstring).

class _BadPeer(HpcfedError):
    """Another rank sent what this protocol never sends; only this rank knows, so the job aborts.

    :func:`_agreed` lets it through: the other ranks may be waiting in a different call, so an
    agreement could hang; ``hpcfed``'s error handler prints the line and aborts with status 2.
    """


def _count(value: Any, what: str = "points") -> int:
    """A count another rank sent, checked before anything is allocated for it."""
    count = int(value)
    if not 0 <= count <= MAX_COUNT:
        raise _BadPeer(f"align: received an impossible count of {what} ({count}); the parties do not "
                       "run the same protocol (run the same hpcfed everywhere)")
    return count


def _line_buffer(text: str, limit: int) -> np.ndarray:
    """``text`` as UTF-8, cut to at most ``limit`` bytes at a character boundary."""
    raw = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore").encode("utf-8")
    return np.frombuffer(raw, dtype=np.uint8).copy()


def _line_text(buffer: np.ndarray) -> str:
    """A line another rank sent: decoded as UTF-8 (bad bytes replaced), kept on one printable line."""
    text = buffer.tobytes().decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text)


def _agree(net: Transport, problem: str | None) -> None:
    """Collective over ``net``: if any rank has a problem, every rank raises the lowest rank's line.

    Each rank contributes one int64 (-1: no problem, else the byte length of its line, at most
    PROBLEM_BYTES) by ``allgather_ints``; if any is set, the first such rank broadcasts its line
    as a uint8 buffer of exactly that length, and every rank raises it (``everywhere=True``).
    """
    mine = _line_buffer(problem, PROBLEM_BYTES) if problem is not None else np.zeros(0, dtype=np.uint8)
    lengths = net.allgather_ints([len(mine) if problem is not None else -1])[:, 0]
    failed = np.flatnonzero(lengths >= 0)
    if not len(failed):
        return
    root = int(failed[0])
    line = mine if net.rank == root else np.empty(min(int(lengths[root]), PROBLEM_BYTES), dtype=np.uint8)
    net.bcast_bytes(line, root=root)
    raise HpcfedError(_line_text(line), everywhere=True)


def _agreed(net: Transport, action: Callable[[], T]) -> T:
    """Run ``action`` on every rank; if any rank raises HpcfedError, all raise its line together."""
    try:
        value, problem = action(), None
    except _BadPeer:
        raise
    except HpcfedError as err:
        value, problem = None, str(err)
    _agree(net, problem)
    return value  # type: ignore[return-value]


def _gather_lines(net: Transport, line: str | None) -> list[str] | None:
    """Every rank's summary line (None: nothing to say) on rank 0, in rank order; None elsewhere."""
    mine = _line_buffer(line or "", LINE_BYTES)
    lengths = net.allgather_ints([len(mine)])[:, 0]
    if not np.all((lengths >= 0) & (lengths <= LINE_BYTES)):
        raise _BadPeer(f"align: a rank announced a summary line of {lengths.max()} bytes (at most {LINE_BYTES})")
    joined = net.gatherv_bytes(mine, lengths, root=0)
    if joined is None:
        return None
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [_line_text(joined[a:b]) for a, b in pairwise(bounds.tolist()) if b > a]


@dataclass
class Layout:
    """Which party this rank serves, its party's transport, and the leaders' one (leaders only)."""

    party: int
    n_parties: int
    party_net: Transport
    leaders: Transport | None

    @classmethod
    def split(cls, net: Transport, config: AlignConfig) -> Layout:
        n_parties, per_party = len(config.parties), config.ranks_per_party
        if net.size != n_parties * per_party:
            raise HpcfedError(
                f"align: started with {net.size} ranks, but {n_parties} parties x ranks_per_party "
                f"{per_party} need exactly {n_parties * per_party} (mpiexec -n {n_parties * per_party})",
                everywhere=True)
        rank = net.rank
        is_leader = rank % per_party == 0
        party_net = net.split(rank // per_party, rank)
        leaders = net.split(0 if is_leader else 1, rank)
        if not is_leader:
            leaders.free()
        return cls(rank // per_party, n_parties, party_net, leaders if is_leader else None)

    def free(self) -> None:
        self.party_net.free()
        if self.leaders is not None:
            self.leaders.free()


def _split_bytes(n_points: int, parts: int) -> np.ndarray:
    """Byte counts of an even split of ``n_points`` points over ``parts`` ranks."""
    bounds = np.arange(parts + 1, dtype=np.int64) * n_points // parts
    return np.diff(bounds) * ecdh.POINT_BYTES


def _flat(points: np.ndarray) -> np.ndarray:
    """Points as one contiguous uint8 buffer (a view when they already are one)."""
    return np.ascontiguousarray(points, dtype=np.uint8).reshape(-1)


def _gather_points(party: Transport, mine: np.ndarray) -> np.ndarray | None:
    """Concatenate every party rank's points, in rank order, on the party leader."""
    counts = party.allgather_ints([mine.size])[:, 0]
    out = party.gatherv_bytes(_flat(mine), counts, root=0)
    return None if out is None else out.reshape(-1, ecdh.POINT_BYTES)


def _blind_in_party(party: Transport, points: np.ndarray | None, key: bytes) -> np.ndarray | None:
    """Blind the leader's ``points`` with the party key, split evenly over the party's ranks."""
    n_points = _count(party.bcast_ints(None if points is None else [len(points)], 1, root=0)[0])
    counts = _split_bytes(n_points, party.size)
    mine = party.scatterv_bytes(None if points is None else _flat(points), counts, root=0)
    return _gather_points(party, ecdh.blind(mine.reshape(-1, ecdh.POINT_BYTES), key))


def _party_key(party: Transport) -> bytes:
    """The party's secret scalar: drawn by its leader, shared with its ranks only."""
    buf = np.frombuffer(ecdh.new_key(), dtype=np.uint8).copy()
    party.bcast_bytes(buf, root=0)
    return buf.tobytes()


# Leader-to-leader transfers (the only traffic between parties), over the leaders' transport.

def _post(leaders: Transport, points: np.ndarray, dest: int) -> list[Any]:
    """Non-blocking sends of ``points`` in messages of at most SEND_CHUNK points."""
    flat, step = _flat(points), SEND_CHUNK * ecdh.POINT_BYTES
    return [leaders.send_bytes(flat[s:s + step], dest, TAG_POINTS) for s in range(0, flat.size, step)]


def _take(leaders: Transport, n_points: int, source: int) -> np.ndarray:
    """Receive ``n_points`` points from ``source``, sent by :func:`_post`."""
    out = np.empty((n_points, ecdh.POINT_BYTES), dtype=np.uint8)
    for s in range(0, n_points, SEND_CHUNK):
        leaders.recv_bytes(out[s:s + SEND_CHUNK].reshape(-1), source, TAG_POINTS)
    return out


def _pass_on(leaders: Transport, points: np.ndarray) -> np.ndarray:
    """Send ``points`` to the next party in the ring; return what the previous one sent."""
    after, before = (leaders.rank + 1) % leaders.size, (leaders.rank - 1) % leaders.size
    n_in = _count(leaders.sendrecv_ints([len(points)], after, before, TAG_COUNT)[0])
    requests = _post(leaders, points, after)
    received = _take(leaders, n_in, before)
    leaders.wait_all(requests)
    return received


def _to_collector(leaders: Transport, points: np.ndarray) -> list[np.ndarray] | None:
    """Every leader's ``points`` on leader 0 (in party order), None elsewhere."""
    if leaders.rank:
        leaders.send_ints([len(points)], 0, TAG_COUNT)
        leaders.wait_all(_post(leaders, points, 0))
        return None
    return [points] + [_take(leaders, _count(leaders.recv_ints(1, q, TAG_COUNT)[0]), q)
                       for q in range(1, leaders.size)]


def _from_collector(leaders: Transport, points: np.ndarray | None) -> np.ndarray:
    """Leader 0's ``points`` on every leader, broadcast in messages of at most SEND_CHUNK points."""
    n_points = _count(leaders.bcast_ints(None if points is None else [len(points)], 1, root=0)[0])
    out = np.empty((n_points, ecdh.POINT_BYTES), dtype=np.uint8) if points is None else np.ascontiguousarray(points)
    for s in range(0, n_points, SEND_CHUNK):
        leaders.bcast_bytes(out[s:s + SEND_CHUNK].reshape(-1), root=0)
    return out


def _exchange_digests(leaders: Transport, mine: bytes, tag: int) -> list[bytes]:
    """Every leader's DIGEST_BYTES-byte value (commitment, share, order digest), in party order.

    Each leader sends its own buffer straight to every other leader (no one relays another's
    value) and receives exactly DIGEST_BYTES from each.
    """
    if len(mine) != DIGEST_BYTES:
        raise ValueError(f"a digest of {len(mine)} bytes, not {DIGEST_BYTES}")
    out = np.empty((leaders.size, DIGEST_BYTES), dtype=np.uint8)
    out[leaders.rank] = np.frombuffer(mine, dtype=np.uint8)
    others = [q for q in range(leaders.size) if q != leaders.rank]
    requests = [leaders.send_bytes(out[leaders.rank], q, tag) for q in others]
    for q in others:
        leaders.recv_bytes(out[q], q, tag)
    leaders.wait_all(requests)
    return [row.tobytes() for row in out]


# ---------------------------------------------------------------- protocol

@dataclass
class Blinded:
    """A leader's state after the blinding rounds."""

    index: np.ndarray    # IdTable index of each unique id, in the order the set was sent
    final: np.ndarray    # intersection mode: own set fully blinded, aligned with ``index``;
                         # cardinality mode: the (sorted) fully blinded set of the next party
    share: bytes
    commitments: list[bytes]
    leaders: Transport   # counts every byte the leader sends to the other parties


def _blind_rounds(lay: Layout, table: IdTable, config: AlignConfig) -> Blinded | None:
    """Steps 1-4 on every rank of every party: hash, blind, pass around the ring."""
    key = _party_key(lay.party_net)
    leaders = lay.leaders
    cardinality = config.mode == "cardinality"
    share, commitments = b"", []
    if leaders is not None and not cardinality:
        fixed = config.parties[lay.party].test_share
        share = bytes.fromhex(fixed) if fixed else secrets.token_bytes(DIGEST_BYTES)
        commitments = _exchange_digests(leaders, ecdh.commitment(lay.party, share), TAG_COMMIT)
    rank, ranks = lay.party_net.rank, lay.party_net.size
    start, stop = len(table) * rank // ranks, len(table) * (rank + 1) // ranks
    blinded = _gather_points(lay.party_net, ecdh.hash_and_blind(table.encoded(start, stop), key))
    index = ecdh.first_occurrences(blinded) if blinded is not None else np.zeros(0, dtype=np.int64)
    current = blinded[index] if blinded is not None else None
    for _ in range(lay.n_parties - 1):
        incoming = _pass_on(leaders, current) if leaders is not None else None
        current = _blind_in_party(lay.party_net, incoming, key)
        if current is not None and cardinality:
            current = ecdh.sort_points(current)
    if leaders is None:
        return None
    final = current if cardinality else _pass_on(leaders, current)
    return Blinded(index, final, share, commitments, leaders)


@dataclass
class Outcome:
    """What a leader learned: the intersection size and, in intersection mode, its aligned rows."""

    n_intersection: int
    aligned: np.ndarray | None  # IdTable index of each common id, in the joint shuffled order
    seed: bytes | None
    order_digest: bytes | None


def _intersect(lay: Layout, table: IdTable, state: Blinded, config: AlignConfig) -> Outcome:
    """Step 4 (collector) and step 5 (joint shuffle) on the leaders."""
    leaders = state.leaders
    sets = _to_collector(leaders, state.final)
    common = ecdh.intersect(sets) if sets is not None else None
    if config.mode == "cardinality":
        size = leaders.bcast_ints(None if common is None else [len(common)], 1, root=0)[0]
        return Outcome(_count(size, "common ids"), None, None, None)
    common = _from_collector(leaders, common)
    shares = _exchange_digests(leaders, state.share, TAG_SHARE)
    for party, (share, promised) in enumerate(zip(shares, state.commitments)):
        if ecdh.commitment(party, share) != promised:
            raise HpcfedError(f"align: party {party}'s revealed shuffle share does not match its commitment")
    seed = ecdh.joint_seed(shares)
    mine = state.index[ecdh.positions(state.final, common)]  # IdTable index of each common value
    order = ecdh.shuffle_order(table.encoded_at(mine), seed)
    digest = ecdh.order_digest(common[order])
    if len(set(_exchange_digests(leaders, digest, TAG_DIGEST))) != 1:
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
                "bytes_sent": state.leaders.bytes_sent, "seconds": seconds, "config": config.to_yaml(),
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

    ``comm`` is a communicator (``hpcfed align`` passes ``MPI.COMM_WORLD``), wrapped here in a
    :class:`~hpcfed.runtime.transport.Transport`, or a Transport already. Errors are HpcfedError
    lines raised on every rank together (``everywhere=True``).
    """
    from hpcfed.runtime.transport import Transport

    started = time.perf_counter()
    world = comm if isinstance(comm, Transport) else Transport(comm)
    config = _agreed(world, lambda: load_align_config(config_path, overrides))
    lay = Layout.split(world, config)
    table = _agreed(world, lambda: read_ids(config.parties[lay.party], config.normalize, lay.party))
    state = _blind_rounds(lay, table, config)
    line = _agreed(world, lambda: _finish(lay, table, state, config, started) if state is not None else None)
    lay.free()
    lines = _gather_lines(world, line)
    if lines is not None:
        print("\n".join(lines), flush=True)
    return 0
