"""`hpcfed report`: summary numbers, printed table and PNG plots from real trace files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from hpcfed.analysis.report import load_run, main, summarize
from hpcfed.errors import HpcfedError
from hpcfed.io.trace import TraceWriter

STEP_COLUMNS = ["loss", "accuracy", "bytes_up", "bytes_down", "wall_s", "t_compute", "t_encode", "t_comm",
                "t_decode", "t_aggregate", "t_wait"]
WORKER_COLUMNS = ["bytes", "arrival_s", "used", "weight"]
PLOTS = ["accuracy_loss.png", "phase_times.png", "worker_weights.png", "worker_arrival.png"]


def _make_run(folder: Path, steps: int = 60, n_workers: int = 4, seed: int = 0, close: bool = True,
              summary: dict | None = None) -> TraceWriter:
    """A run folder with a synthetic but plausible trace (accuracy every 10 steps, worker 2 straggles)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    writer = TraceWriter.create(folder / "trace.h5", {"config": "seed: 0\n", "world_size": n_workers + 1},
                                STEP_COLUMNS, WORKER_COLUMNS, n_workers)
    for step in range(steps):
        arrival = rng.uniform(0.01, 0.02, n_workers)
        arrival[1] += 0.2 * (step % 7 == 0)
        weights = rng.dirichlet(np.ones(n_workers))
        writer.append_step(
            {"step": step, "loss": 2.0 * np.exp(-step / 20) + 0.01 * seed, "bytes_up": 4000.0, "bytes_down": 1000.0,
             "accuracy": min(0.99, 0.5 + step / 100) if step % 10 == 9 else np.nan, "wall_s": 0.05 * (step + 1),
             "t_compute": 0.010, "t_encode": 0.002, "t_comm": 0.003, "t_decode": 0.001, "t_aggregate": 0.001,
             "t_wait": float(arrival.max() - arrival.min())},
            {"bytes": np.full(n_workers, 1000.0), "arrival_s": arrival, "used": np.ones(n_workers, np.int8),
             "weight": weights})
        if step % 7 == 0:
            writer.event(step, "straggler", "worker 2 late")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if close:
        writer.close()
    return writer


def _assert_images(folder: Path) -> None:
    for name in PLOTS:
        image = imread(folder / name)
        assert image.ndim == 3 and 200 <= image.shape[0] <= 3000 and 200 <= image.shape[1] <= 3000, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"


def test_summary_numbers(tmp_path):
    _make_run(tmp_path / "a", summary={"steps": 60, "final_accuracy": 0.95, "bytes_up": 240_000.0,
                                       "bytes_down": 60_000.0, "wall_time_s": 3.5, "dense_bytes_per_step": 40_000})
    _make_run(tmp_path / "b")
    a = summarize(load_run(str(tmp_path / "a"), "a"))
    # 240 kB up over 4 workers x 60 steps = 1 kB per worker and step, against 40 kB dense
    assert a["final_accuracy"] == 0.95 and a["wall_time_s"] == 3.5 and a["ratio_vs_dense"] == pytest.approx(40.0)
    assert a["best_accuracy"] == pytest.approx(0.99) and a["best_step"] == 49
    assert a["straggler_events"] == 9 and a["t_compute ms"] == pytest.approx(10.0)
    b = summarize(load_run(str(tmp_path / "b"), "b"))  # no summary.json: everything from the trace
    assert b["steps"] == 60 and b["bytes_up"] == 240_000.0 and b["final_accuracy"] == pytest.approx(0.99)
    assert b["wall_time_s"] == pytest.approx(3.0) and np.isnan(b["ratio_vs_dense"])


def test_report_of_two_runs_prints_a_table_and_writes_plots(tmp_path, capsys):
    _make_run(tmp_path / "dense", seed=0, summary={"steps": 60, "dense_bytes_per_step": 40_000})
    _make_run(tmp_path / "coded", seed=1, n_workers=3)
    out = tmp_path / "cmp"
    assert main([str(tmp_path / "dense"), str(tmp_path / "coded")], str(out)) == 0
    printed = capsys.readouterr().out
    assert "| dense | 60 |" in printed and "| coded | 60 |" in printed and "mean t_wait ms" in printed
    assert "| coded | 3 |" in printed and "| 40.0 |" in printed
    _assert_images(out)


def test_report_of_a_run_in_progress_defaults_to_run_dir_report(tmp_path, capsys):
    writer = _make_run(tmp_path / "live", close=False)
    try:
        assert main([str(tmp_path / "live")], None) == 0
    finally:
        writer.close()
    assert "| live | 60 |" in capsys.readouterr().out
    _assert_images(tmp_path / "live" / "report")


def test_missing_or_unreadable_run_is_one_line_error(tmp_path):
    with pytest.raises(HpcfedError, match="run folder .*nope does not exist"):
        main([str(tmp_path / "nope")], None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HpcfedError, match="trace file .*trace.h5 not found"):
        main([str(tmp_path / "empty")], None)
    _make_run(tmp_path / "badsum")
    (tmp_path / "badsum" / "summary.json").write_text("{oops")
    with pytest.raises(HpcfedError, match="summary.json is not valid JSON") as info:
        main([str(tmp_path / "badsum")], None)
    assert "\n" not in str(info.value)
    (tmp_path / "badsum" / "summary.json").write_text(json.dumps({"steps": "many", "final_accuracy": None}))
    with pytest.raises(HpcfedError, match="summary.json of badsum has steps='many'; expected a number"):
        main([str(tmp_path / "badsum")], None)


def test_dense_run_reads_one_x_vs_dense(tmp_path):
    """Every worker sends the dense gradient each step: 1.0x (not 1/workers), per worker and step."""
    workers, steps, dense = 3, 20, 4000
    for name, extra in (("trace", {}), ("summary", {"world_size": workers + 1}),
                        ("per-step", {"bytes_up_per_worker_step": float(dense), "world_size": 99})):
        folder = tmp_path / name
        _make_run(folder, steps=steps, n_workers=workers,
                  summary={"steps": steps, "bytes_up": workers * steps * dense, "dense_bytes_per_step": dense,
                           **extra})
        assert summarize(load_run(str(folder), name))["ratio_vs_dense"] == pytest.approx(1.0), name
    _make_run(tmp_path / "half", steps=steps, n_workers=workers,
              summary={"steps": steps, "bytes_up_per_worker_step": dense / 2, "dense_bytes_per_step": dense})
    assert summarize(load_run(str(tmp_path / "half"), "half"))["ratio_vs_dense"] == pytest.approx(2.0)
