"""PSI without MPI: group math, set operations, shuffle, config, the id readers, no-pickle rules."""

import ast
from pathlib import Path

import gmpy2
import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcfed.errors import HpcfedError
from hpcfed.psi import align, ecdh
from hpcfed.psi.align import PROBLEM_BYTES, _agree, _count, _line_buffer, _line_text, read_ids
from hpcfed.psi.config import Normalize, load_align_config

# RFC 9380 appendix J.7.2, curve25519_XMD:SHA-512_ELL2_NU_: message, u[0], Q.x (big-endian hex).
RFC_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"
RFC_VECTORS = [
    ("", "608d892b641f0328523802a6603427c26e55e6f27e71a91a478148d45b5093cd",
     "51125222da5e763d97f3c10fcc92ea6860b9ccbbd2eb1285728f566721c1e65b"),
    ("abc", "46f5b22494bfeaa7f232cc8d054be68561af50230234d7d1d63d1d9abeca8da5",
     "7d56d1e08cb0ccb92baf069c18c49bb5a0dcd927eff8dcf75ca921ef7f3e6eeb"),
    ("abcdef0123456789", "235fe40c443766ce7e18111c33862d66c3b33267efa50d50f9e8e5d252a40aaa",
     "3fbe66b9c9883d79e8407150e7c2a1c8680bee496c62fabe4619a72b3cabe90f"),
    ("q128_" + "q" * 128, "001e92a544463bda9bd04ddbe3d6eed248f82de32f522669efc5ddce95f46f5b",
     "227e0bb89de700385d19ec40e857db6e6a3e634b1c32962f370d26f84ff19683"),
    ("a512_" + "a" * 512, "1a68a1af9f663592291af987203393f707305c7bac9c8d63d6a729bdc553dc19",
     "3bcd651ee54d5f7b6013898aab251ee8ecc0688166fce6e9548d38472f6bd196"),
]
ids = st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=20, unique=True)
keys = st.binary(min_size=32, max_size=32)


def points(rows: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, ecdh.POINT_BYTES)


@pytest.mark.parametrize("msg, u, qx", RFC_VECTORS)
def test_hash_to_curve_matches_rfc9380_vectors(msg, u, qx):
    field = ecdh.hash_to_field(msg.encode(), RFC_DST)
    assert field == int(u, 16)
    assert ecdh.map_to_curve(field) == int(qx, 16)


@settings(max_examples=50, deadline=None)
@given(ids=ids)
def test_hash_is_deterministic_on_the_curve_and_distinct(ids):
    hashed = ecdh.hash_to_group(ids)
    assert np.array_equal(hashed, ecdh.hash_to_group(list(ids)))
    assert len(np.unique(hashed.view("S32"))) == len(ids)
    for row in hashed:
        u = gmpy2.mpz(int.from_bytes(row.tobytes(), "little"))
        assert gmpy2.legendre(u * (u * u + ecdh.MONT_A * u + 1), ecdh.FIELD_P) >= 0  # a point of the curve


@settings(max_examples=25, deadline=None)
@given(ids=ids, a=keys, b=keys, c=keys)
def test_blinding_commutes_and_keeps_ids_apart(ids, a, b, c):
    hashed = ecdh.hash_to_group(ids)
    ab = ecdh.blind(ecdh.blind(hashed, a), b)
    assert np.array_equal(ab, ecdh.blind(ecdh.blind(hashed, b), a))
    assert np.array_equal(ecdh.blind(ab, c), ecdh.blind(ecdh.blind(ecdh.blind(hashed, c), b), a))
    assert np.array_equal(ecdh.hash_and_blind(ids, a), ecdh.blind(hashed, a))
    assert len(np.unique(ab.view("S32"))) == len(ids)


def test_different_keys_or_domains_give_unrelated_values():
    hashed = ecdh.hash_to_group([b"alice", b"bob"])
    assert not np.array_equal(ecdh.blind(hashed, bytes(31) + b"\x01"), ecdh.blind(hashed, bytes(31) + b"\x02"))
    assert not np.array_equal(hashed, ecdh.hash_to_group([b"alice", b"bob"], dst=RFC_DST))


@settings(max_examples=50, deadline=None)
@given(a=st.lists(st.integers(0, 30), max_size=40), b=st.lists(st.integers(0, 30), max_size=40, unique=True))
def test_set_operations_match_python_sets(a, b):
    pa, pb = (points([ecdh.point_bytes(str(x).encode()) for x in xs]) for xs in (a, b))
    first = ecdh.first_occurrences(pa)
    assert sorted(first.tolist()) == sorted(a.index(x) for x in set(a))
    assert [bytes(r) for r in pa[first]] == sorted(bytes(r) for r in pa[first])
    common = ecdh.intersect([pa[first], pb])
    assert len(common) == len(set(a) & set(b))
    where = ecdh.positions(pa[first], common)
    assert np.array_equal(pa[first][where], common)
    assert np.array_equal(ecdh.sort_points(pb), pb[np.argsort(pb.view("S32").ravel(), kind="stable")])


def test_positions_refuses_missing_points():
    have = ecdh.hash_to_group([b"a", b"b"])
    with pytest.raises(ValueError, match="1 wanted points are missing"):
        ecdh.positions(have, ecdh.hash_to_group([b"a", b"z"]))


def test_shuffle_is_a_seeded_permutation():
    common = [str(i).encode() for i in range(50)]
    seed = ecdh.joint_seed([b"\x01" * 32, b"\x02" * 32])
    order = ecdh.shuffle_order(common, seed)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert np.array_equal(order, ecdh.shuffle_order(iter(common), seed))
    assert not np.array_equal(order, ecdh.shuffle_order(common, ecdh.joint_seed([b"\x01" * 32, b"\x03" * 32])))
    assert ecdh.joint_seed([b"a", b"b"]) != ecdh.joint_seed([b"b", b"a"])
    assert ecdh.commitment(0, b"s") != ecdh.commitment(1, b"s") != ecdh.commitment(0, b"t")
    assert len(ecdh.shuffle_order([], seed)) == 0


# ------------------------------------------------------------------ config

def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "align.yaml"
    path.write_text(text)
    return str(path)


def test_config_resolves_paths_against_its_folder(tmp_path):
    path = write_config(tmp_path, "parties:\n  - {path: a.txt}\n  - {path: sub/b.csv, column: id}\n")
    cfg = load_align_config(path, ["mode=cardinality", "parties.1.column=key"])
    assert cfg.parties[0].path == tmp_path / "a.txt" and cfg.parties[1].path == tmp_path / "sub" / "b.csv"
    assert (cfg.mode, cfg.parties[1].kind, cfg.parties[1].column) == ("cardinality", "csv", "key")
    assert cfg.output.dir == tmp_path / "runs" / "align"


@pytest.mark.parametrize("text, overrides, expected", [
    ("parties:\n  - {path: a.txt}\n", [], "parties: List should have at least 2 items"),
    ("parties: [{path: a.txt}, {path: b.txt, colum: x}]", [],
     "unknown key 'parties.1.colum' (allowed here: path, column, dataset, test_share)"),
    ("parties: [{path: a.txt}, {path: b.txt}]", ["mode=union"],
     "mode: Input should be 'intersection' or 'cardinality'"),
    ("parties: [{path: a.txt}, {path: b.txt}]", ["ranks_per_party=0"], "ranks_per_party"),
    ("parties: [{path: a.txt}, {path: b.txt}]", ["normalize.upper=true"], "unknown key 'normalize.upper'"),
    ("parties: [{path: a.csv}, {path: b.txt}]", [], "parties.0: a.csv looks like CSV: set column"),
    ("parties: [{path: a.h5}, {path: b.txt}]", [], "a.h5 looks like HDF5: set dataset"),
    ("parties: [{path: a, column: c, dataset: d}, {path: b}]", [], "either column (CSV) or dataset (HDF5)"),
    ("parties: [{path: a, test_share: zz}, {path: b}]", [], "parties.0.test_share"),
    ("parties: [{path: a}, {path: b}]", ["parties.5.path=x"], "--set parties.5.path: '5' is not an index below 2"),
    ("parties: [{path: a}, {path: b}]", ["mode"], "expected KEY=VALUE"),
    ("parties: [a", [], "YAML syntax error"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, text, overrides, expected):
    with pytest.raises(HpcfedError) as info:
        load_align_config(write_config(tmp_path, text), overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(HpcfedError, match="file '.*absent.yaml' not found"):
        load_align_config(str(tmp_path / "absent.yaml"))


# ------------------------------------------------------------------ readers

def read(tmp_path: Path, party: dict, **normalize) -> tuple[list[str], list[int], int]:
    cfg = load_align_config(write_config(tmp_path, "parties: [{path: x}, {path: y}]"),
                            [f"parties.0.{k}={v}" for k, v in party.items()])
    table = read_ids(cfg.parties[0], Normalize(**normalize), 0)
    return table.strings(np.arange(len(table))), table.rows.tolist(), table.n_empty


def test_text_ids_are_normalised_and_empty_lines_skipped(tmp_path):
    (tmp_path / "ids.txt").write_bytes("  Zoë \r\n\nBOB\n東京-1\n".encode())
    assert read(tmp_path, {"path": "ids.txt"}) == (["Zoë", "BOB", "東京-1"], [0, 2, 3], 1)
    assert read(tmp_path, {"path": "ids.txt"}, strip=False, lower=True)[0] == ["  zoë ", "bob", "東京-1"]


def test_csv_column_and_hdf5_dataset(tmp_path):
    (tmp_path / "t.csv").write_text('name,id\nx,"A,1"\ny,b2\nz\n', encoding="utf-8")
    assert read(tmp_path, {"path": "t.csv", "column": "id"}) == (["A,1", "b2"], [0, 1], 1)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["grp/ids"] = np.array(["é1", "b"], dtype=h5py.string_dtype())
        f["nums"] = np.arange(3)
    assert read(tmp_path, {"path": "t.h5", "dataset": "grp/ids"})[0] == ["é1", "b"]
    assert read(tmp_path, {"path": "t.h5", "dataset": "nums"})[0] == ["0", "1", "2"]


@pytest.mark.parametrize("files, party, expected", [
    ({}, {"path": "none.txt"}, "party 0: text file '.*none.txt' not found"),
    ({"t.csv": "a,b\n1,2\n"}, {"path": "t.csv", "column": "id"}, "has no column 'id' \\(columns: a, b\\)"),
    ({"t.csv": ""}, {"path": "t.csv", "column": "id"}, "is empty"),
    ({"bad.txt": b"ok\n\xff\xfe\n"}, {"path": "bad.txt"}, "is not UTF-8 text"),
    ({"fake.h5": "not hdf5\n"}, {"path": "fake.h5", "dataset": "ids"}, "hdf5 file .* cannot be read"),
    ({}, {"path": "."}, "is a directory"),
])
def test_reader_errors_are_one_line(tmp_path, files, party, expected):
    for name, content in files.items():
        target = tmp_path / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    with pytest.raises(HpcfedError, match=expected) as info:
        read(tmp_path, party)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ what crosses ranks

PICKLE_CALLS = {"send", "recv", "isend", "irecv", "sendrecv", "bcast", "gather", "allgather", "scatter", "reduce",
                "allreduce", "alltoall", "scan", "exscan", "ssend", "bsend", "issend", "ibsend", "probe", "mprobe",
                "agree", "agree_everywhere", "allreduce_max", "allreduce_min", "send_arrays", "recv_arrays"}


def test_align_talks_only_through_transport_buffer_calls():
    """No mpi4py or pickle import, no pickle-based call, no raw communicator use in align.py."""
    tree = ast.parse(Path(align.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"mpi4py", "pickle", "dill", "cloudpickle", "marshal"}
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not called & PICKLE_CALLS, called & PICKLE_CALLS
    assert not {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} & {"comm", "COMM_WORLD"}


class FakeNet:
    """Rank ``rank`` of a job whose ranks have ``problems``; the two calls _agree makes, in memory."""

    def __init__(self, problems: list[str | None], rank: int) -> None:
        self.problems, self.rank, self.size = problems, rank, len(problems)
        self.calls: list[str] = []

    def allgather_ints(self, values):
        self.calls.append("allgather_ints")
        assert len(values) == 1
        return np.array([[len(_line_buffer(p, PROBLEM_BYTES)) if p is not None else -1] for p in self.problems])

    def bcast_bytes(self, data, root=0):
        self.calls.append(f"bcast_bytes from {root}")
        assert data.dtype == np.uint8 and len(data) <= PROBLEM_BYTES
        if self.rank != root:
            data[:] = _line_buffer(self.problems[root], PROBLEM_BYTES)


def test_error_agreement_is_a_length_then_a_bounded_utf8_buffer():
    net = FakeNet([None, None], 0)
    _agree(net, None)
    assert net.calls == ["allgather_ints"]
    problems = [None, "party 1: csv file 'ü.csv' has no column 'id'", "party 2: later"]
    for rank in range(3):
        net = FakeNet(problems, rank)
        with pytest.raises(HpcfedError) as info:
            _agree(net, problems[rank])
        assert str(info.value) == problems[1] and info.value.everywhere
        assert net.calls == ["allgather_ints", "bcast_bytes from 1"]
    long = ["é" * PROBLEM_BYTES, None]   # 2 bytes each: cut at a character boundary
    with pytest.raises(HpcfedError) as info:
        _agree(FakeNet(long, 1), None)
    assert str(info.value) == "é" * (PROBLEM_BYTES // 2)


def test_lines_from_other_ranks_are_bounded_and_stay_one_printable_line():
    assert len(_line_buffer("x" * 10_000, 512)) == 512 and _line_buffer("", 512).dtype == np.uint8
    assert len(_line_buffer("ab東", 4)) == 2   # never half a character
    assert _line_text(np.frombuffer("a\nb\x1b[2Jc\xff".encode() + b"\xff", dtype=np.uint8)) == "a b [2Jc\xff\ufffd"


def test_counts_from_other_ranks_are_checked_before_allocating():
    assert _count(np.int64(0)) == 0 and _count(7) == 7
    for bad in (-1, 1 << 41):
        with pytest.raises(HpcfedError, match="impossible count") as info:
            _count(bad)
        assert not info.value.everywhere   # only this rank knows: the job aborts (status 2), no agreement
