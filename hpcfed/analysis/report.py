"""`hpcfed report RUN_DIR [RUN_DIR ...] [--out DIR]`: summary table and comparison plots.

Reads RUN_DIR/trace.h5 with a SWMR reader (so a run still in progress can be reported) and
RUN_DIR/summary.json when present; summary.json values win over what the trace implies.
Several runs are overlaid in every plot. Plots are PNG files drawn with matplotlib's Agg canvas.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hpcfed.errors import HpcfedError
from hpcfed.io.trace import read_trace

PLOT_DPI = 100


@dataclass
class Run:
    """One run folder's trace tables and optional summary.json."""

    label: str
    steps: dict[str, np.ndarray]
    workers: dict[str, np.ndarray]
    events: dict[str, np.ndarray]
    attrs: dict[str, Any]
    summary: dict[str, Any]


def load_run(run_dir: str, label: str) -> Run:
    """Read a run folder; HpcfedError (one line) when it or its trace is missing or unreadable."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise HpcfedError(f"report: run folder {folder} does not exist")
    trace = read_trace(folder / "trace.h5")
    summary_path = folder / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise HpcfedError(f"report: {summary_path} is not valid JSON ({exc})") from None
        if not isinstance(summary, dict):
            raise HpcfedError(f"report: {summary_path} must hold a JSON object")
    return Run(label, trace["steps"], trace["workers"], trace["events"], trace["attrs"], summary)


def _labels(run_dirs: list[str]) -> list[str]:
    """Folder names, or full paths where two runs share a name."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def _last_finite(values: np.ndarray | None) -> float:
    finite = values[np.isfinite(values)] if values is not None else np.array([])
    return float(finite[-1]) if finite.size else float("nan")


def _phase_columns(run: Run) -> list[str]:
    return [c for c in run.steps if c.startswith("t_")]


def _pick(run: Run, key: str, fallback: float) -> float:
    """summary.json's number for ``key`` when it has one, else ``fallback`` (from the trace)."""
    value = run.summary.get(key)
    if value is None:
        return float(fallback)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HpcfedError(f"report: summary.json of {run.label} has {key}={value!r}; expected a number")
    return float(value)


def _workers(run: Run) -> float:
    """Worker ranks: world_size - 1 (summary.json, else the trace attributes), else the trace's worker columns."""
    world = _pick(run, "world_size", run.attrs.get("world_size", float("nan")))
    if np.isfinite(world) and world > 1:
        return world - 1
    return float(next((v.shape[1] for v in run.workers.values() if v.ndim == 2), float("nan")))


def summarize(run: Run) -> dict[str, float]:
    """The headline numbers of one run (NaN where neither summary.json nor the trace has them).

    ``ratio_vs_dense`` is uncompressed over actual uplink bytes per worker and step:
    dense_bytes_per_step / (bytes_up / (workers * steps)), so a dense run reads 1.0.
    """
    steps = run.steps
    accuracy = steps.get("accuracy", np.array([]))
    finite = np.isfinite(accuracy)
    n_steps = _pick(run, "steps", len(steps["step"]))
    bytes_up = _pick(run, "bytes_up", np.nansum(steps.get("bytes_up", np.array([]))))
    dense = _pick(run, "dense_bytes_per_step", run.attrs.get("dense_bytes_per_step", float("nan")))
    worker_steps = _workers(run) * n_steps
    per_worker_step = _pick(run, "bytes_up_per_worker_step",
                            bytes_up / worker_steps if worker_steps > 0 else float("nan"))
    row = {
        "steps": n_steps,
        "final_accuracy": _pick(run, "final_accuracy", _last_finite(accuracy)),
        "best_accuracy": float(accuracy[finite].max()) if finite.any() else float("nan"),
        "best_step": float(steps["step"][finite][accuracy[finite].argmax()]) if finite.any() else float("nan"),
        "wall_time_s": _pick(run, "wall_time_s", _last_finite(steps.get("wall_s"))),
        "bytes_up": bytes_up,
        "bytes_down": _pick(run, "bytes_down", np.nansum(steps.get("bytes_down", np.array([])))),
        "ratio_vs_dense": dense / per_worker_step if dense > 0 and per_worker_step > 0 else float("nan"),
        "wait_total_s": float(np.nansum(steps["t_wait"])) if "t_wait" in steps else float("nan"),
        "straggler_events": float(np.sum(run.events["kind"] == "straggler")),
    }
    for column in _phase_columns(run):
        values = steps[column]
        row[f"{column} ms"] = float(np.nanmean(values) * 1e3) if np.isfinite(values).any() else float("nan")
    return row


def _cell(value: float, fmt: str) -> str:
    return "-" if not np.isfinite(value) else format(value, fmt)


def summary_table(runs: list[Run]) -> str:
    """A markdown table, one line per run."""
    rows = [summarize(r) for r in runs]
    phases = list(dict.fromkeys(k for row in rows for k in row if k.endswith(" ms")))
    header = ["run", "steps", "final acc", "best acc (step)", "wall s", "MB up", "MB down", "x vs dense",
              *(f"mean {p}" for p in phases), "wait total s", "stragglers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, row in zip(runs, rows):
        best = _cell(row["best_accuracy"], ".4f")
        if np.isfinite(row["best_step"]):
            best += f" ({int(row['best_step'])})"
        cells = [run.label, _cell(row["steps"], ".0f"), _cell(row["final_accuracy"], ".4f"), best,
                 _cell(row["wall_time_s"], ".1f"), _cell(row["bytes_up"] / 1e6, ".3f"),
                 _cell(row["bytes_down"] / 1e6, ".3f"), _cell(row["ratio_vs_dense"], ".1f"),
                 *(_cell(row.get(p, float("nan")), ".2f") for p in phases),
                 _cell(row["wait_total_s"], ".2f"), _cell(row["straggler_events"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _worker_mean(run: Run, column: str, worker: int) -> float:
    """Mean of one worker's column over the steps where it was recorded (NaN, or -1 for ``used``)."""
    if column not in run.workers:
        return float("nan")
    values = run.workers[column][:, worker].astype(float)
    values = values[np.isfinite(values) & ((values >= 0) if column == "used" else True)]
    return float(values.mean()) if values.size else float("nan")


def worker_table(runs: list[Run]) -> str:
    """A markdown table, one line per (run, worker): mean arrival, share of steps used, mean weight."""
    lines = ["| run | worker | mean arrival s | used % | mean weight |", "|---|---|---|---|---|"]
    for run in runs:
        for w in range(next((v.shape[1] for v in run.workers.values()), 0)):
            lines.append(f"| {run.label} | {w + 1} | {_cell(_worker_mean(run, 'arrival_s', w), '.3f')} "
                         f"| {_cell(_worker_mean(run, 'used', w) * 100, '.0f')} "
                         f"| {_cell(_worker_mean(run, 'weight', w), '.3f')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def _finite_line(ax: Any, x: np.ndarray, y: np.ndarray, label: str, marker: str = "") -> None:
    mask = np.isfinite(x) & np.isfinite(y)
    if mask.any():
        ax.plot(x[mask], y[mask], marker=marker, markersize=3, label=label)


def plot_learning(runs: list[Run], path: Path) -> Path:
    """Accuracy and loss against step and against cumulative bytes (up + down)."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    for run in runs:
        step = run.steps["step"].astype(float)
        traffic = np.nan_to_num(run.steps.get("bytes_up", np.zeros_like(step))) + \
            np.nan_to_num(run.steps.get("bytes_down", np.zeros_like(step)))
        cumulative_mb = np.cumsum(traffic) / 1e6
        for row, (column, marker) in enumerate((("accuracy", "o"), ("loss", ""))):
            values = run.steps.get(column, np.full_like(step, np.nan))
            _finite_line(axes[row, 0], step, values, run.label, marker)
            _finite_line(axes[row, 1], cumulative_mb, values, run.label, marker)
    for row, column in enumerate(("accuracy", "loss")):
        axes[row, 0].set(xlabel="step", ylabel=column)
        axes[row, 1].set(xlabel="cumulative MB (up + down)", ylabel=column)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_phases(runs: list[Run], path: Path) -> Path | None:
    """Mean time per step in each phase (t_* columns), one stacked bar per run."""
    phases = list(dict.fromkeys(c for r in runs for c in _phase_columns(r)))  # trace column order
    if not phases:
        return None
    fig = Figure(figsize=(9, 1.5 + 0.6 * len(runs)), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(runs))
    for phase in phases:
        means = np.array([np.nanmean(r.steps[phase]) * 1e3 if phase in r.steps and np.isfinite(r.steps[phase]).any()
                          else 0.0 for r in runs])
        ax.barh([r.label for r in runs], means, left=left, label=phase[2:])
        left += means
    ax.set(xlabel="mean ms per step", title="phase-time breakdown")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _per_run_figure(runs: list[Run], column: str, path: Path,
                    draw: Callable[[Any, Run, Figure], None]) -> Path | None:
    """One subplot per run that has worker column ``column``; None when no run has it."""
    having = [r for r in runs if column in r.workers and len(r.workers[column])]
    if not having:
        return None
    fig = Figure(figsize=(10, 0.5 + 3 * len(having)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(having), 1))
    for ax, run in zip(axes, having):
        draw(ax, run, fig)
        ax.set_title(run.label)
    return _save(fig, path)


def _draw_weights(ax: Any, run: Run, fig: Figure) -> None:
    step = run.steps["step"].astype(float)
    for w in range(run.workers["weight"].shape[1]):
        _finite_line(ax, step, run.workers["weight"][:, w], f"worker {w + 1}")
    ax.set(xlabel="step", ylabel="aggregation weight")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncols=4)


def _draw_arrivals(ax: Any, run: Run, fig: Figure) -> None:
    arrival = np.ma.masked_invalid(run.workers["arrival_s"].astype(float).T)
    step = run.steps["step"]
    image = ax.imshow(arrival, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(step[0] - 0.5, step[-1] + 0.5, arrival.shape[0] + 0.5, 0.5))
    ax.set(xlabel="step", ylabel="worker")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="arrival after step start (s)")


def main(run_dirs: list[str], out: str | None) -> int:
    """Print the summary and write the plots; ``out`` defaults to RUN_DIR/report (one run) or ./report."""
    if not run_dirs:
        raise HpcfedError("report: give at least one run folder")
    runs = [load_run(d, label) for d, label in zip(run_dirs, _labels(run_dirs))]
    out_dir = Path(out) if out else (Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HpcfedError(f"report: cannot create output folder {out_dir} ({exc.strerror})") from None
    print(summary_table(runs))
    workers = worker_table(runs)
    if workers:
        print()
        print(workers)
    written = [plot_learning(runs, out_dir / "accuracy_loss.png"),
               plot_phases(runs, out_dir / "phase_times.png"),
               _per_run_figure(runs, "weight", out_dir / "worker_weights.png", _draw_weights),
               _per_run_figure(runs, "arrival_s", out_dir / "worker_arrival.png", _draw_arrivals)]
    print()
    print("plots: " + ", ".join(str(p) for p in written if p is not None))
    return 0
