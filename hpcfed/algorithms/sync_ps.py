"""Algorithm ``sync``: parameter-server data-parallel SGD, optionally compressed and straggler-tolerant.

Each step every worker sends one codec packet per data block it holds; rank 0 decodes and
aggregates as soon as its completion rule is met, encodes the aggregate once, sends it to
the workers that took part, and every rank decodes the same bytes and applies them with the
same optimizer, so all replicas stay bit-identical. Completion rules (``coding``):

- ``wait-all`` (``coding.enabled: false``): every worker's block; the classic parameter server.
- ``drop-stragglers``: the first k workers' blocks (what FL frameworks do; biased on non-IID data).
- ``coded``: the first complete sample set of a coded assignment (any k workers hold one), so
  the gradient is exact however the stragglers fall.

A worker that misses a step (its message arrives after the step closed) is answered with a
RESYNC frame (parameters + optimizer state + kernel) and rejoins at the current step; each
worker has at most one message from rank 0 outstanding, so a straggler builds no backlog.
Kernel refreshes ride along: local kernels with the packets of the step before, the merged
kernel with that step's update. Checkpoints and stops are flagged in the update's header;
rank 0 first brings every worker to the same step, then all ranks write the checkpoint together.

The step logic itself is in :mod:`hpcfed.algorithms.sync_core` (no MPI); this module drives it
over the session's transport and adds evaluation, traces and checkpoints.
"""

from __future__ import annotations

import time

import numpy as np

from hpcfed import checkpointing
from hpcfed.aggregation.combiner import Combiner
from hpcfed.algorithms.sync_core import (Replica, Schedule, ServerCore, WorkerCore, completion_rule,
                                         validation_pass)
from hpcfed.checkpointing import LocalState
from hpcfed.codec.codec import GradientCodec
from hpcfed.models import save_model
from hpcfed.runtime.comm import HEADER, Flag
from hpcfed.runtime.device import as_tensor
from hpcfed.runtime.log import Progress
from hpcfed.runtime.stop import EXIT_RESUMABLE, StopRequest
from hpcfed.session import Session, finish
from hpcfed.tracing import open_trace

STEP_COLUMNS = ["step", "loss", "accuracy", "test_loss", "bytes_up", "bytes_down", "wall_s", "t_wait", "t_decode",
                "t_aggregate", "t_encode", "t_apply", "t_eval", "kernel_version"]
WORKER_COLUMNS = ["bytes", "arrival_s", "used", "weight"]


def run(session: Session) -> dict | int | None:
    """Train until ``train.steps``; rank 0 returns the summary. EXIT_RESUMABLE after a stop signal."""
    return server(session) if session.is_server else worker(session)


def block_batch_size_for(n_workers: int, batch_size: int, n_blocks: int) -> int:
    """Samples per block per step, so one complete set is ``n_workers * batch_size`` samples."""
    return max(1, round(n_workers * batch_size / n_blocks))


def block_batch_size(session: Session) -> int:
    return block_batch_size_for(session.n_workers, session.cfg.train.batch_size, session.assignment.n_blocks)


def make_codec(session: Session) -> GradientCodec:
    """This rank's codec (raw fp32 packets when compression is off), on the rank's device."""
    return GradientCodec(session.model.size, session.cfg.compression, session.placement.xp, seed=session.cfg.seed,
                         rank=session.rank)


def local_state(session: Session, codec: GradientCodec, combiner: Combiner | None = None,
                core: ServerCore | None = None) -> LocalState:
    """What this rank alone knows: codec state, fault RNGs, bytes sent so far (rank 0: the combiner)."""
    codec_state = codec.state_dict() if session.cfg.compression.enabled else {}   # raw packets keep no state
    parts = {"codec": codec_state, "combiner": combiner.state_dict() if combiner else {}}
    flat = {f"{part}/{k}": v for part, state in parts.items() for k, v in state.items()}
    arrays = {k: np.asarray(v) for k, v in flat.items() if isinstance(v, np.ndarray)}
    values = {k: v for k, v in flat.items() if not isinstance(v, np.ndarray)}
    values.update(bytes_sent=session.transport.bytes_sent, faults=session.faults.state())
    if core is not None:
        values["last_validation_loss"] = core.last_validation_loss
    return LocalState(arrays, values)


def load_local_state(session: Session, codec: GradientCodec, local: LocalState, combiner: Combiner | None = None,
                     core: ServerCore | None = None) -> None:
    flat = {**local.arrays, **local.values}

    def part(name: str) -> dict:
        return {k.removeprefix(f"{name}/"): v for k, v in flat.items() if k.startswith(f"{name}/")}

    if session.cfg.compression.enabled:
        codec.load_state_dict(part("codec"))
    if combiner is not None:
        combiner.load_state_dict(part("combiner"))
    if core is not None:
        core.last_validation_loss = float(local.values.get("last_validation_loss", float("nan")))
    session.transport.bytes_sent = int(local.values["bytes_sent"])
    session.faults.load_state(local.values["faults"])


def server_core(session: Session, codec: GradientCodec, stop: StopRequest) -> ServerCore:
    """Rank 0's step core for this session's config."""
    cfg, workers = session.cfg, session.n_workers
    mode, wait_for = completion_rule(cfg.coding, workers)
    replica = Replica(session.model, session.optimizer, session.placement.xp,
                      compress_buffers=cfg.compression.enabled)
    combiner = Combiner(cfg.aggregation, workers, cfg.seed)
    validation = None
    if session.validation is not None:
        x, y = session.tensor(session.validation.x), session.tensor(session.validation.y)
        validation = validation_pass(replica, codec, x, y, cfg.aggregation.validation_batch, cfg.seed)
    return ServerCore(session.transport, codec, combiner, replica, session.assignment, mode, wait_for,
                      block_batch_size(session), Schedule(cfg.train.steps, cfg.checkpoint.every), stop,
                      session.memory, validation)


def server(session: Session) -> dict | int:
    cfg, model = session.cfg, session.model
    codec = make_codec(session)
    state = server_core(session, codec, StopRequest())
    first = 0
    if session.checkpoint is not None:
        first, local = checkpointing.restore(session, session.checkpoint)
        load_local_state(session, codec, local, state.combiner, state)
        state.start_at(first)
    trace = open_trace(session, STEP_COLUMNS, WORKER_COLUMNS, first if session.checkpoint else None)
    x_test, y_test = session.tensor(session.test.x), session.tensor(session.test.y)
    progress = Progress(cfg.train.steps, initial=first)
    last_eval: dict = {}
    loop_start = time.monotonic()
    try:
        for step in range(first + 1, cfg.train.steps + 1):
            row, workers = state.run_step(step)
            clock = time.monotonic()
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps or state.flags & Flag.STOP:
                test_loss, accuracy = model.evaluate(x_test, y_test, cfg.train.eval_batch_size)
                last_eval = {"step": step, "accuracy": accuracy, "test_loss": test_loss, "train_loss": row["loss"]}
                progress.report(step, loss=row["loss"], test_loss=test_loss, accuracy=accuracy)
                row.update(accuracy=accuracy, test_loss=test_loss)
            row.update(t_eval=time.monotonic() - clock, wall_s=time.monotonic() - session.started)
            progress.advance(loss=row["loss"])
            if state.flags & Flag.CHECKPOINT:
                state.bring_all_to(step)
                path = checkpointing.save(session, step, local_state(session, codec, state.combiner, state))
                state.events.append((step, "checkpoint", path.name))
            trace.append_step(row, workers)
            for event in state.events:
                trace.event(*event)
            state.events.clear()
            if state.flags & Flag.STOP:
                trace.event(step, "stop", f"signal on {state.stop_from}; resume with --resume {session.run_dir}")
                session.log.warning("stopped at step %d (signal on %s); checkpoint written; resume with: "
                                    "hpcfed run --resume %s", step, state.stop_from, session.run_dir)
                state.close()
                return EXIT_RESUMABLE
        state.close()
    finally:
        trace.close()
        progress.close()
    train_time_s = time.monotonic() - loop_start
    steps_run = cfg.train.steps - first
    save_model(session.run_dir / "model.h5", model.module, {"config": cfg.to_yaml(), "steps": cfg.train.steps})
    return finish(session, {
        "steps": cfg.train.steps,
        "final_accuracy": last_eval["accuracy"],
        "final_test_loss": last_eval["test_loss"],
        "final_train_loss": last_eval["train_loss"],
        "mode": state.mode,
        "compression": cfg.compression.enabled,
        "dense_bytes_per_step": HEADER.itemsize + 4 * model.size,
        "train_time_s": train_time_s,
        "time_per_step_s": train_time_s / max(1, steps_run),
        "resumed_from_step": first,
        "resyncs": state.resyncs,
        "kernel_bytes": state.kernel_bytes,
        "mean_wait_s": state.wait_total / max(1, steps_run),
        "used_fraction": (state.used_steps / max(1, steps_run)).tolist(),
    })


def worker(session: Session) -> int | None:
    cfg, device = session.cfg, session.device
    codec = make_codec(session)
    step = 1
    if session.checkpoint is not None:
        completed, local = checkpointing.restore(session, session.checkpoint)
        load_local_state(session, codec, local)
        step = completed + 1
    open_trace(session, STEP_COLUMNS, WORKER_COLUMNS, None)
    stop = StopRequest()
    blocks = {b: (as_tensor(d.x).to(device), as_tensor(d.y).to(device)) for b, d in session.blocks.items()}
    replica = Replica(session.model, session.optimizer, session.placement.xp,
                      compress_buffers=cfg.compression.enabled)
    core = WorkerCore(session.transport, codec, replica, blocks, block_batch_size(session), cfg.seed, session.faults,
                      session.memory)
    while step <= cfg.train.steps:
        session.faults.straggle()
        core.upload(step, stop.requested)
        core.receive()
        completed, flags = core.take()
        step = completed + 1
        if flags & Flag.CHECKPOINT:
            checkpointing.save(session, completed, local_state(session, codec))
        if flags & Flag.STOP:
            return EXIT_RESUMABLE
    finish(session, {})
    return None
