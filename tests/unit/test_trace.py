"""The HDF5 trace: round trip, SWMR reading by another process while written, resume, plain readers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcfed.errors import HpcfedError
from hpcfed.io.trace import DETAIL_BYTES, TraceWriter, _clip_utf8, read_steps, read_trace

REPO = Path(__file__).resolve().parents[2]
STEP_COLUMNS = ["loss", "accuracy", "bytes_up", "bytes_down", "t_compute", "t_comm", "t_wait"]
WORKER_COLUMNS = ["bytes", "arrival_s", "used", "weight"]
ATTRS = {"config": "seed: 0\ntrain: {steps: 3}\n", "world_size": 5, "mpi_library": "MPICH 5.0.2",
         "cuda_aware": False, "cuda_aware_reason": "MPIX_Query_cuda_support() = 0", "start_time": 1.7e9}

# A reader that knows nothing of hpcfed: plain h5py in SWMR mode, prints the row count and last loss.
READER = textwrap.dedent("""
    import sys, h5py
    with h5py.File(sys.argv[1], "r", swmr=True) as f:
        steps = f["steps"]
        for name in steps:
            steps[name].refresh()
        print(steps["step"].shape[0], steps["loss"][-1], f["workers"]["weight"].shape)
""")


def _writer(path, n_workers=4) -> TraceWriter:
    return TraceWriter.create(path, ATTRS, STEP_COLUMNS, WORKER_COLUMNS, n_workers)


def _append(writer: TraceWriter, step: int) -> None:
    writer.append_step({"step": step, "loss": 1.0 / (step + 1), "bytes_up": 100.0 * step},
                       {"weight": np.full(writer.n_workers, 0.25), "used": np.array([1, 1, 0, 1])})


def test_round_trip_with_missing_columns_and_events(tmp_path):
    path = tmp_path / "trace.h5"
    with _writer(path) as writer:
        for step in range(5):
            _append(writer, step)
        writer.append_step({"step": 5, "accuracy": 0.9})
        writer.event(3, "straggler", "rank 2 waited 1.5 s")
        writer.event(5, "checkpoint", "step_00000005.h5")
    trace = read_trace(path)
    steps = trace["steps"]
    assert list(steps["step"]) == list(range(6)) and steps["step"].dtype == np.int64
    assert steps["loss"][2] == pytest.approx(1 / 3) and np.isnan(steps["loss"][5])
    assert np.isnan(steps["accuracy"][:5]).all() and steps["accuracy"][5] == pytest.approx(0.9)
    assert trace["workers"]["used"].dtype == np.int8 and trace["workers"]["used"].shape == (6, 4)
    assert list(trace["workers"]["used"][5]) == [-1] * 4 and np.isnan(trace["workers"]["bytes"]).all()
    assert list(trace["events"]["kind"]) == ["straggler", "checkpoint"]
    assert trace["events"]["detail"][0] == "rank 2 waited 1.5 s"
    assert {k: trace["attrs"][k] for k in ATTRS} == ATTRS
    assert trace["attrs"]["n_workers"] == 4 and trace["attrs"]["format"] == "hpcfed-trace"


def test_plain_h5py_and_pandas_read_a_closed_trace(tmp_path):
    pandas = pytest.importorskip("pandas")
    path = tmp_path / "trace.h5"
    with _writer(path) as writer:
        for step in range(3):
            _append(writer, step)
    with h5py.File(path, "r") as f:
        frame = pandas.DataFrame({k: f["steps"][k][:] for k in f["steps"]})
        assert f.attrs["config"].decode() == ATTRS["config"]  # fixed-length UTF-8: bytes
    assert list(frame["step"]) == [0, 1, 2] and set(frame.columns) == {"step", *STEP_COLUMNS}


def test_another_process_reads_rows_while_the_writer_is_open(tmp_path):
    path = tmp_path / "trace.h5"
    writer = _writer(path)
    written = 0
    try:
        for expected in (3, 7):
            while written < expected:
                _append(writer, written)
                written += 1
            out = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True,
                                 timeout=60, check=True).stdout.split()
            assert int(out[0]) == expected and float(out[1]) == pytest.approx(1 / expected)
            assert list(read_steps(path)["step"]) == list(range(expected))
    finally:
        writer.close()


def test_resume_after_the_writer_was_killed(tmp_path):
    path = tmp_path / "trace.h5"
    script = textwrap.dedent(f"""
        import numpy as np, time
        from hpcfed.io.trace import TraceWriter
        w = TraceWriter.create({str(path)!r}, {{"config": "x"}}, ["loss"], ["weight"], 2)
        for step in range(10):
            w.append_step({{"step": step, "loss": float(step)}}, {{"weight": np.ones(2)}})
            w.event(step, "straggler", str(step))
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with pytest.raises(OSError):  # a killed SWMR writer leaves the file flagged for non-SWMR readers ...
        h5py.File(path, "r")
    assert len(read_steps(path)["step"]) == 10  # ... while SWMR readers still see every flushed row
    with TraceWriter.reopen(path, resume_step=6) as writer:
        writer.append_step({"step": 7, "loss": 70.0}, {"weight": np.zeros(2)})
        writer.event(7, "resume", "from step 6")
    with h5py.File(path, "r") as f:  # rebuilt and closed cleanly: plain readers work again
        assert list(f["steps/step"][:]) == list(range(8)) and f["steps/loss"][7] == 70.0
        assert f["workers/weight"].shape == (8, 2) and f.attrs["config"] == b"x"
        assert list(f["events"]["step"]) == [0, 1, 2, 3, 4, 5, 6, 7]
        assert f["events"]["kind"][-1] == b"resume"
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_input_is_one_line_error(tmp_path):
    path = tmp_path / "trace.h5"
    with _writer(path) as writer:
        with pytest.raises(HpcfedError, match="unknown step column 'lost'"):
            writer.append_step({"step": 0, "lost": 1.0})
        with pytest.raises(HpcfedError, match=r"shape \(3,\); need \(4,\)"):
            writer.append_step({"step": 0}, {"weight": np.ones(3)})
        with pytest.raises(HpcfedError, match="needs row"):
            writer.append_step({"loss": 1.0})
    with pytest.raises(HpcfedError, match="attribute 'hosts' has type list"):
        TraceWriter.create(tmp_path / "b.h5", {"hosts": ["a", "b"]}, ["loss"], [], 1)
    with pytest.raises(HpcfedError, match="'n_workers' is reserved"):
        TraceWriter.create(tmp_path / "d.h5", {"n_workers": 3}, ["loss"], [], 1)
    with pytest.raises(HpcfedError, match="repeat"):
        TraceWriter.create(tmp_path / "c.h5", {}, ["loss", "loss"], [], 1)
    with pytest.raises(HpcfedError, match="not found"):
        read_steps(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(HpcfedError, match="junk.h5 is not readable HDF5"):
        read_steps(tmp_path / "junk.h5")


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) not installed")
def test_h5dump_reads_the_layout(tmp_path):
    path = tmp_path / "trace.h5"
    with _writer(path) as writer:
        _append(writer, 0)
        writer.event(0, "kernel refresh", "version 1")
    header = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, timeout=60,
                            check=True).stdout
    for name in ("steps", "workers", "events", "loss", "arrival_s", "world_size", "kind", "detail"):
        assert f'"{name}"' in header


@given(st.text(max_size=300), st.integers(min_value=0, max_value=DETAIL_BYTES))
def test_clip_utf8_is_a_valid_prefix_within_the_limit(text, limit):
    clipped = _clip_utf8(text, limit)
    assert len(clipped) <= limit and text.startswith(clipped.decode("utf-8"))
    assert len(text.encode("utf-8")) > limit or clipped == text.encode("utf-8")
