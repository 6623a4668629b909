"""Checkpoints: round trip, atomic rename + `latest` pointer, keep-last-N, and damaged-file fallback."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hpcfed.errors import HpcfedError
from hpcfed.io.checkpoint import find_resume_checkpoint, read_checkpoint, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _state(seed: int = 0, n: int = 20_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"model/params": rng.standard_normal(n).astype(np.float32),
              "optimizer/state/0/momentum_buffer": rng.standard_normal(n).astype(np.float32),
              "optimizer/step": np.array(7, dtype=np.int64),
              "kernel/positions": rng.integers(0, 2**31, 300).astype(np.int32),
              "kernel/mask": rng.random(64) < 0.5,
              "actor_critic/weights/0": rng.standard_normal((8, 4)),
              "data/position": np.array([3, 1, 4], dtype=np.uint64),
              "rank1/rng/torch": rng.integers(0, 255, 5056, dtype=np.uint8),
              "rank1/rng/name": np.array(b"mt19937")}
    for rank in range(1, 5):
        arrays[f"rank{rank}/codec/residual"] = rng.standard_normal(n).astype(np.float32)
    return arrays


ATTRS = {"config_hash": "3f2a9c", "numpy_rng": json.dumps({"bit_generator": "PCG64", "state": {"state": 1}}),
         "epoch": 2, "lr": 0.05, "warm": True}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name, array in a.items():
        assert array.dtype == b[name].dtype and array.shape == b[name].shape, name
        assert np.array_equal(array, b[name]), name


def _names(run: Path) -> list[str]:
    return sorted(os.listdir(run / "checkpoints"))


def test_round_trip_many_arrays_and_attrs(tmp_path):
    state = _state()
    path = write_checkpoint(tmp_path, 50, state, ATTRS, keep=3)
    assert path == tmp_path / "checkpoints" / "step_00000050.h5"
    arrays, attrs = read_checkpoint(path)
    _assert_same(arrays, state)
    assert attrs == {**ATTRS, "step": 50}


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(st.sampled_from([np.float32, np.float64, np.int8, np.uint16, np.int64, np.bool_,
                                   np.complex64, np.dtype(">f4")]),
                  hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_any_numeric_array_round_trips(array):
    with tempfile.TemporaryDirectory() as run:
        arrays, _ = read_checkpoint(write_checkpoint(run, 1, {"a/b": array}, {}, keep=1))
    assert arrays["a/b"].dtype == array.dtype and arrays["a/b"].shape == array.shape
    assert np.array_equal(arrays["a/b"], array, equal_nan=array.dtype.kind in "fc")


def test_atomic_files_and_keep_last_n(tmp_path):
    for step in range(10, 70, 10):
        write_checkpoint(tmp_path, step, _state(step, 100), ATTRS, keep=3)
        names = _names(tmp_path)
        assert not [n for n in names if n.endswith(".tmp")]
        latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{step:08d}.h5"
        assert read_checkpoint(tmp_path / "checkpoints" / latest)[1]["step"] == step
    assert _names(tmp_path) == ["latest", "step_00000040.h5", "step_00000050.h5", "step_00000060.h5"]
    assert find_resume_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "step_00000060.h5", [])


def test_resuming_from_an_older_step_drops_the_abandoned_newer_files(tmp_path):
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, step, _state(step, 10), {}, keep=5)
    write_checkpoint(tmp_path, 15, _state(15, 10), {}, keep=5)
    assert _names(tmp_path) == ["latest", "step_00000010.h5", "step_00000015.h5"]


def test_latest_always_names_a_complete_file_when_the_writer_is_killed(tmp_path):
    script = textwrap.dedent(f"""
        import numpy as np
        from hpcfed.io.checkpoint import write_checkpoint
        arrays = {{"model/params": np.arange(300_000, dtype=np.float32)}}
        for step in range(1, 10_000):
            write_checkpoint({str(tmp_path)!r}, step, arrays, {{}}, keep=2)
            if step == 1:
                print("ready", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(0)
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert child.stdout.readline().strip() == "ready"
            child.stdout.close()
            time.sleep(rng.uniform(0.05, 0.5))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
        arrays, attrs = read_checkpoint(tmp_path / "checkpoints" / latest)
        assert attrs["step"] >= 1 and arrays["model/params"][-1] == 299_999
        path, warnings = find_resume_checkpoint(tmp_path)
        assert read_checkpoint(path)[1]["step"] >= attrs["step"]
        assert all("newer good" in w for w in warnings)  # killed between the two renames


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_middle])
def test_damaged_newest_falls_back_with_a_warning(tmp_path, damage):
    for step in (100, 200, 300):
        write_checkpoint(tmp_path, step, _state(step), ATTRS, keep=3)
    newest = tmp_path / "checkpoints" / "step_00000300.h5"
    damage(newest)
    with pytest.raises(HpcfedError, match="step_00000300.h5 is corrupt or incomplete"):
        read_checkpoint(newest)
    path, warnings = find_resume_checkpoint(tmp_path)
    assert path.name == "step_00000200.h5"
    assert any("step_00000300.h5 is corrupt or incomplete" in w for w in warnings)
    assert all("\n" not in w for w in warnings)
    _assert_same(read_checkpoint(path)[0], _state(200))


@pytest.mark.timeout(120)  # a flip in an unchecksummed HDF5 structure once made the reader loop forever
def test_a_flip_anywhere_is_detected_or_harmless(tmp_path):
    """Whatever byte is flipped, reading either fails with HpcfedError or returns the exact data."""
    state = _state(1, 2000)
    path = write_checkpoint(tmp_path, 1, state, ATTRS, keep=1)
    original = path.read_bytes()
    rng = random.Random(1)
    detected = 0
    metadata = range(0, 4000, 11)  # superblock, object headers, attributes
    for offset in [*metadata, *rng.sample(range(4000, len(original)), 60)]:
        data = bytearray(original)
        data[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            arrays, attrs = read_checkpoint(path)
        except HpcfedError as exc:
            assert "corrupt or incomplete" in str(exc) and "\n" not in str(exc)
            detected += 1
            continue
        _assert_same(arrays, state)
        assert attrs == {**ATTRS, "step": 1}
    assert detected > 300


def test_no_good_checkpoint_is_a_clear_error(tmp_path):
    for step in (1, 2):
        _truncate(write_checkpoint(tmp_path, step, _state(step, 1000), {}, keep=2))
    with pytest.raises(HpcfedError, match=r"no good checkpoint in .*checkpoints \(2 found"):
        find_resume_checkpoint(tmp_path)
    with pytest.raises(HpcfedError, match="does not exist"):
        find_resume_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HpcfedError, match="no checkpoints in"):
        find_resume_checkpoint(tmp_path / "empty")


def test_explicit_file_and_pointer_problems(tmp_path):
    for step in (1, 2):
        write_checkpoint(tmp_path, step, _state(step, 100), {}, keep=2)
    folder = tmp_path / "checkpoints"
    assert find_resume_checkpoint(folder / "step_00000001.h5") == (folder / "step_00000001.h5", [])
    assert find_resume_checkpoint(folder)[0].name == "step_00000002.h5"
    (folder / "latest").write_text("../../etc/passwd\n")
    path, warnings = find_resume_checkpoint(tmp_path)
    assert path.name == "step_00000002.h5" and "not a checkpoint name" in warnings[0]
    (folder / "latest").unlink()
    assert "missing" in find_resume_checkpoint(tmp_path)[1][0]
    _truncate(folder / "step_00000001.h5")
    with pytest.raises(HpcfedError, match="step_00000001.h5 is corrupt"):
        find_resume_checkpoint(folder / "step_00000001.h5")


def test_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(HpcfedError, match="'bad' has dtype object"):
        write_checkpoint(tmp_path, 1, {"bad": np.array([{}], dtype=object)}, {}, keep=1)
    with pytest.raises(HpcfedError, match="array name '/abs'"):
        write_checkpoint(tmp_path, 1, {"/abs": np.zeros(1)}, {}, keep=1)
    with pytest.raises(HpcfedError, match="'step' is reserved"):
        write_checkpoint(tmp_path, 1, {}, {"step": 3}, keep=1)
    with pytest.raises(HpcfedError, match="attribute 'shape' has type tuple"):
        write_checkpoint(tmp_path, 1, {}, {"shape": (1, 2)}, keep=1)
    with pytest.raises(HpcfedError, match="keep=0"):
        write_checkpoint(tmp_path, 1, {}, {}, keep=0)
    with pytest.raises(HpcfedError, match="cannot store array 'a/b'"):
        write_checkpoint(tmp_path, 1, {"a": np.zeros(1), "a/b": np.zeros(1)}, {}, keep=1)
    assert _names(tmp_path) == []  # the failed write left no temp file
