"""`hpcfed align` end to end under mpiexec: 2-3 parties (1-2 ranks each), real files, real ranks."""

import pickle
import random
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, run_mpi

from hpcfed.psi import ecdh

pytestmark = pytest.mark.mpi
RECORDER = REPO / "tests" / "mpi" / "record_align.py"
SHARE = {0: "11" * 32, 1: "22" * 32, 2: "33" * 32, "other": "44" * 32}


def align(n: int, config: Path, *args: str, timeout: float = 90):
    """Launch `hpcfed align CONFIG ARGS` on ``n`` ranks."""
    return run_mpi(n, ["align", str(config), *args], timeout=timeout)


def write_config(tmp_path: Path, parties: list[str], extra: str = "") -> Path:
    lines = ["parties:", *(f"  - {p}" for p in parties), "output: {dir: out}", extra]
    path = tmp_path / "align.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ids(path: Path, ids: list[str]) -> str:
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return f"{{path: {path.name}}}"


def result(tmp_path: Path, party: int) -> tuple[list[str], np.ndarray, dict]:
    with h5py.File(tmp_path / "out" / "align" / f"party_{party}.h5") as f:
        ids = f["ids"].asstr()[:].tolist() if "ids" in f else []
        rows = f["rows"][:] if "rows" in f else np.zeros(0, dtype=np.int64)
        return ids, rows, dict(f.attrs)


def check_aligned(tmp_path: Path, sources: list[list[str]]) -> list[str]:
    """Every party holds the plain intersection, in one common order, with rows that point at the ids."""
    expected = set(sources[0]).intersection(*sources[1:])
    orders = []
    for party, ids_in in enumerate(sources):
        ids, rows, attrs = result(tmp_path, party)
        assert set(ids) == expected and len(ids) == len(expected)
        assert [ids_in[r] for r in rows] == ids
        assert [ids_in.index(i) for i in ids] == rows.tolist()  # first occurrence of repeats
        assert attrs["n_intersection"] == len(expected) and attrs["mode"] == "intersection"
        assert attrs["n_duplicates"] == len(ids_in) - len(set(ids_in)) and attrs["n_input"] == len(ids_in)
        orders.append(ids)
    assert all(order == orders[0] for order in orders)
    return orders[0]


@pytest.mark.parametrize("overlap", [0.0, 0.5, 1.0])
def test_two_parties_match_the_plain_intersection(tmp_path, overlap):
    rng = random.Random(int(overlap * 10))
    pool = [f"user-{rng.getrandbits(40):x}" for _ in range(400)]
    common = int(200 * overlap)
    sources = [pool[:200], pool[200 - common:400 - common]]
    rng.shuffle(sources[1])
    cfg = write_config(tmp_path, [write_ids(tmp_path / f"p{k}.txt", s) for k, s in enumerate(sources)])
    run = align(2, cfg)
    assert run.returncode == 0, run.stderr
    assert len(check_aligned(tmp_path, sources)) == common
    assert f"intersection size {common}" in run.stdout


def test_three_parties_two_ranks_each_csv_hdf5_text_unicode_duplicates(tmp_path):
    a = ["Zoë", "東京-7", "ok", "x1", "ok", "🙂 id", "only-a"]
    b = ["ok", "東京-7", "🙂 id", "Zoë", "x1", "x1", "only-b"]
    c = ["x1", "🙂 id", "東京-7", "ok", "Zoë", "nope"]
    (tmp_path / "b.csv").write_text("name,key\n" + "".join(f"n{i},{v}\n" for i, v in enumerate(b)), encoding="utf-8")
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["ids"] = np.array(c, dtype=h5py.string_dtype())
    cfg = write_config(tmp_path, [write_ids(tmp_path / "a.txt", a), "{path: b.csv, column: key}",
                                  "{path: c.h5, dataset: ids}"], "ranks_per_party: 2")
    run = align(6, cfg)
    assert run.returncode == 0, run.stderr
    assert sorted(check_aligned(tmp_path, [a, b, c])) == sorted(["Zoë", "東京-7", "ok", "x1", "🙂 id"])


def test_normalisation_empty_party_and_cardinality_mode(tmp_path):
    sources = [["  Alice ", "BOB", ""], ["alice", "bob", "carol"]]
    cfg = write_config(tmp_path, [write_ids(tmp_path / f"p{k}.txt", s) for k, s in enumerate(sources)],
                       "normalize: {strip: true, lower: true}")
    run = align(2, cfg)
    assert run.returncode == 0, run.stderr
    ids, rows, attrs = result(tmp_path, 0)
    assert sorted(ids) == ["alice", "bob"] and attrs["n_empty"] == 1 and sorted(rows.tolist()) == [0, 1]
    run = align(2, cfg, "--set", "mode=cardinality")
    assert run.returncode == 0, run.stderr
    for party in (0, 1):
        ids, _, attrs = result(tmp_path, party)
        assert ids == [] and attrs["n_intersection"] == 2 and attrs["mode"] == "cardinality"
    (tmp_path / "p0.txt").write_text("")
    run = align(2, cfg)
    assert run.returncode == 0, run.stderr
    assert result(tmp_path, 1)[0] == [] and result(tmp_path, 0)[2]["n_input"] == 0


def test_shipped_example_config(tmp_path):
    run = align(3, REPO / "configs" / "align-example.yaml", "--set", f"output.dir={tmp_path / 'out'}")
    assert run.returncode == 0, run.stderr
    ids, rows, attrs = result(tmp_path, 0)
    assert sorted(ids) == ["c-1003", "c-1004", "c-1005", "c-1007"] and attrs["n_duplicates"] == 1
    assert sorted(rows.tolist()) == [2, 3, 4, 6]


def test_every_contributed_share_changes_the_order(tmp_path):
    ids = [f"row-{i}" for i in range(40)]
    cfg = write_config(tmp_path, [write_ids(tmp_path / f"p{k}.txt", ids) for k in range(3)])
    fixed = [f"parties.{k}.test_share='{SHARE[k]}'" for k in range(3)]
    orders = []
    for change in (None, None, 0, 2):
        sets = [s if k != change else f"parties.{k}.test_share='{SHARE['other']}'" for k, s in enumerate(fixed)]
        run = align(3, cfg, *(arg for s in sets for arg in ("--set", s)))
        assert run.returncode == 0, run.stderr
        orders.append(check_aligned(tmp_path, [ids] * 3))
    assert orders[0] == orders[1]  # the same shares give the same order (fresh keys do not matter)
    assert orders[2] != orders[0] and orders[3] != orders[0] and orders[2] != orders[3]
    assert sorted(orders[0]) == sorted(ids) and orders[0] != ids


def recorded(folder: Path, ranks: int) -> list[bytes]:
    """Every buffer the ranks sent, after checking that no rank made a pickle call.

    The recorder refuses (raises, so the job cannot end with status 0 or 2) every pickle-based
    method of the transport and of mpi4py's communicators; here each rank's record also shows
    that every guarded name was probed and refused, and that the sends went through the
    transport's integer and byte-buffer calls, which the recorder copies.
    """
    sent = []
    for rank in range(ranks):
        record = pickle.loads((folder / f"rank_{rank}.pkl").read_bytes())
        assert record["refused"] == record["guarded"] and len(record["guarded"]) >= 20, record["refused"]
        assert {"Transport.bcast", "Transport.allgather", "Transport.gather", "Transport.agree_everywhere",
                "comm.bcast", "comm.allgather", "comm.send", "comm.sendrecv", "comm.gather"} <= set(record["guarded"])
        assert record["calls"].get("allgather_ints", 0) >= 2 and record["calls"].get("split") == 2
        sent += record["sent"]
    return sent


def assert_nothing_leaked(blob: bytes, pool: list[str]) -> None:
    for plain in pool:
        raw = plain.encode()
        point = ecdh.point_bytes(raw)
        for secret in (raw, plain.encode("utf-16-le"), point, point[::-1], ecdh.expand_message_xmd(raw)[:16]):
            assert secret not in blob, f"{plain!r} leaked"


@pytest.mark.parametrize("mode", ["intersection", "cardinality"])
def test_no_plaintext_unblinded_hash_or_pickle_is_ever_sent(tmp_path, mode):
    rng = random.Random(7)
    pool = [f"patient-{rng.getrandbits(64):016x}" for _ in range(120)]
    sources = [pool[:80], pool[40:]]
    cfg = write_config(tmp_path, [write_ids(tmp_path / f"p{k}.txt", s) for k, s in enumerate(sources)],
                       f"ranks_per_party: 2\nmode: {mode}")
    run = run_mpi(4, [str(RECORDER), str(cfg), "--set", f"parties.0.test_share='{SHARE[0]}'",
                      "--record", str(tmp_path / "sent")], module=False, timeout=90)
    assert run.returncode == 0, run.stderr
    if mode == "intersection":
        check_aligned(tmp_path, sources)
    else:
        assert [result(tmp_path, k)[2]["n_intersection"] for k in (0, 1)] == [40, 40]
    blob = b"\x00".join(recorded(tmp_path / "sent", 4))
    assert len(blob) > 3 * len(pool) * ecdh.POINT_BYTES  # every set travelled (blinded) at least once
    if mode == "intersection":  # the recorder sees what crosses: party 0's share and its commitment
        assert bytes.fromhex(SHARE[0]) in blob and ecdh.commitment(0, bytes.fromhex(SHARE[0])) in blob
    assert_nothing_leaked(blob, pool)


def test_bad_input_agreement_sends_no_pickle(tmp_path):
    pool = [f"secret-{i:04d}" for i in range(30)]
    (tmp_path / "b.csv").write_text("key\n" + "".join(f"{v}\n" for v in pool), encoding="utf-8")
    cfg = write_config(tmp_path, [write_ids(tmp_path / "a.txt", pool), "{path: b.csv, column: id}"],
                       "ranks_per_party: 2")
    run = run_mpi(4, [str(RECORDER), str(cfg), "--record", str(tmp_path / "sent")], module=False, timeout=60)
    _one_error_line(run, f"party 1: csv file '{tmp_path}/b.csv' has no column 'id' (columns: key)")
    sent = recorded(tmp_path / "sent", 4)
    assert any(b"has no column 'id'" in buf for buf in sent)  # the line crossed as a plain UTF-8 buffer
    assert_nothing_leaked(b"\x00".join(sent), pool)


def _one_error_line(run, expected: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpcfed: error: ") and expected in lines[0], lines
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("party1, files, expected", [
    ("{path: missing.txt}", {}, "party 1: text file '{tmp}/missing.txt' not found (parties.1.path)"),
    ("{path: b.csv, column: id}", {"b.csv": "key\nv\n"},
     "party 1: csv file '{tmp}/b.csv' has no column 'id' (columns: key)"),
    ("{path: b.h5, dataset: ids}", {"b.h5": "plain text\n"}, "party 1: hdf5 file '{tmp}/b.h5' cannot be read"),
    ("{path: b.txt}", {"b.txt": b"ok\n\xff\n"}, "party 1: text file '{tmp}/b.txt' is not UTF-8 text"),
])
def test_bad_party_input_is_one_line_exit_2_no_hang(tmp_path, party1, files, expected):
    for name, content in files.items():
        target = tmp_path / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    cfg = write_config(tmp_path, [write_ids(tmp_path / "a.txt", ["x"]), party1], "ranks_per_party: 2")
    _one_error_line(align(4, cfg, timeout=60), expected.format(tmp=tmp_path))


@pytest.mark.parametrize("ranks, args, expected", [
    (3, [], "align: started with 3 ranks, but 2 parties x ranks_per_party 1 need exactly 2"),
    (2, ["--set", "output.bogus=1"], "unknown key 'output.bogus' (allowed here: dir)"),
])
def test_bad_launch_or_config_is_one_line_exit_2(tmp_path, ranks, args, expected):
    cfg = write_config(tmp_path, [write_ids(tmp_path / f"p{k}.txt", ["x"]) for k in range(2)])
    _one_error_line(align(ranks, cfg, *args, timeout=60), expected)
