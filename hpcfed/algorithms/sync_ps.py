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
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hpcfed import checkpointing
from hpcfed.checkpointing import LocalState
from hpcfed.codec.codec import GradientCodec
from hpcfed.aggregation.combiner import Combiner
from hpcfed.coding import CompletionTracker, block_batch
from hpcfed.errors import HpcfedError
from hpcfed.optim import export_state, import_state, state_size
from hpcfed.runtime.comm import HEADER, SERVER, Flag, Frame, Kind, Tag
from hpcfed.runtime.device import as_array, as_tensor, to_numpy
from hpcfed.runtime.inbox import Inbox
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


def block_batch_size(session: Session) -> int:
    """Samples per block per step, so one complete set is ``n_workers * batch_size`` samples."""
    return max(1, round(session.n_workers * session.cfg.train.batch_size / session.assignment.n_blocks))


def make_codec(session: Session) -> GradientCodec:
    """This rank's codec (raw fp32 packets when compression is off), on the rank's device."""
    return GradientCodec(session.model.size, session.cfg.compression, session.placement.xp, seed=session.cfg.seed,
                         rank=session.rank)


def gradient_array(session: Session) -> Any:
    """The model's flat gradient as an array of the rank's array module (same memory: NumPy or CuPy)."""
    return as_array(session.model.grads, session.placement.xp)


def checkpoint_due(session: Session, step: int) -> bool:
    every = session.cfg.checkpoint.every
    return step == session.cfg.train.steps or (every > 0 and step % every == 0)


def apply_update(session: Session, codec: GradientCodec, step: int, packet: Any, kernel: Any) -> None:
    """Every rank: decode the aggregate's packet into the gradient, step the optimizer, and
    install the next kernel if the update carries one (after decoding: the packet used the old one)."""
    codec.decode(packet, step, out=gradient_array(session))
    session.optimizer.step()
    if kernel.size:
        codec.install_kernel(kernel)


def local_state(session: Session, codec: GradientCodec, combiner: Combiner | None = None) -> LocalState:
    """What this rank alone knows: codec state, fault RNGs, bytes sent so far (rank 0: the combiner)."""
    codec_state = codec.state_dict() if session.cfg.compression.enabled else {}   # raw packets keep no state
    parts = {"codec": codec_state, "combiner": combiner.state_dict() if combiner else {}}
    flat = {f"{part}/{k}": v for part, state in parts.items() for k, v in state.items()}
    arrays = {k: np.asarray(v) for k, v in flat.items() if isinstance(v, np.ndarray)}
    values = {k: v for k, v in flat.items() if not isinstance(v, np.ndarray)}
    values.update(bytes_sent=session.channel.bytes_sent, faults=session.faults.state())
    return LocalState(arrays, values)


def load_local_state(session: Session, codec: GradientCodec, local: LocalState, combiner: Combiner | None = None) -> None:
    flat = {**local.arrays, **local.values}

    def part(name: str) -> dict:
        return {k.removeprefix(f"{name}/"): v for k, v in flat.items() if k.startswith(f"{name}/")}

    if session.cfg.compression.enabled:
        codec.load_state_dict(part("codec"))
    if combiner is not None:
        combiner.load_state_dict(part("combiner"))
    session.channel.bytes_sent = int(local.values["bytes_sent"])
    session.faults.load_state(local.values["faults"])


class Server:
    """Rank 0's side: receive blocks, decide completion, aggregate, answer every worker-step once."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.channel = session.channel
        cfg, workers = session.cfg.coding, session.n_workers
        self.mode = cfg.mode if cfg.enabled else "wait-all"
        self.wait_for = cfg.target if cfg.target is not None else max(1, workers - 1)
        self.tracker = CompletionTracker(session.assignment)
        self.codec = make_codec(session)
        capacity = 4 * session.model.size + self.codec.max_kernel_nbytes()
        per_worker = max(len(b) for b in session.assignment.blocks)
        memory, xp = session.memory, session.placement.xp
        self.inbox = Inbox(self.channel, range(1, workers + 1), per_worker, capacity, Tag.UPLINK, memory)
        self.block_grads = {b: xp.zeros(session.model.size, xp.float32) for b in range(session.assignment.n_blocks)}
        self.local_kernels: dict[int, np.ndarray] = {}
        self.update = Frame(capacity, memory, receives=False)
        self.update_sends: list[MPI.Request] = []
        state_bytes = 4 * (session.model.size + state_size(session.optimizer)) + self.codec.max_kernel_nbytes()
        self.resync = {w: Frame(state_bytes, memory, receives=False) for w in range(1, workers + 1)}
        self.resync_sends: dict[int, MPI.Request] = {}
        self.answered = np.zeros(workers + 1, dtype=np.int64)   # last worker-step answered, by rank
        self.synced_to = np.zeros(workers + 1, dtype=np.int64)  # step each worker's state reaches once answered
        self.completed = 0                                       # last step applied on rank 0
        self.flags = 0                                           # flags of the latest update
        self.stop = StopRequest()
        self.stop_from = ""                                      # who asked to stop
        self.events: list[tuple[int, str, str]] = []
        self.resyncs = 0
        self.kernel_bytes = 0
        self.wait_total = 0.0
        self.combiner = Combiner(session.cfg.aggregation, workers, session.cfg.seed)
        validation = session.validation
        self.validation = None if validation is None else (session.tensor(validation.x), session.tensor(validation.y))
        self.used_steps = np.zeros(workers)                     # steps in which each worker's blocks were used
        self.step_bytes = np.zeros(workers)

    def start_at(self, step: int) -> None:
        """Resume: every worker's state is at ``step``."""
        self.answered[:] = self.synced_to[:] = self.completed = step

    def complete(self) -> bool:
        if self.mode == "drop-stragglers":
            return len(self.tracker.chosen()) >= min(self.wait_for, self.session.n_workers)
        return self.tracker.complete()

    def run_step(self, step: int) -> tuple[dict, dict]:
        """Collect, aggregate and answer one step; returns its trace row and per-worker columns."""
        start = time.monotonic()
        sent_before = self.channel.bytes_sent
        self.tracker.reset(step)
        self.step_bytes[:] = 0
        held: dict[int, int] = {}
        arrival = np.full(self.session.n_workers, np.nan)
        while not self.complete():
            self._take(self.inbox.wait(), step, start, held, arrival)
        t_wait = time.monotonic() - start
        for index in self.inbox.ready():   # take whatever else has already arrived
            self._take(index, step, start, held, arrival)
        codec, size = self.codec, self.codec.payload_nbytes(step)
        clock = time.monotonic()
        frames = {block: self.inbox.frames[index] for block, index in held.items()}
        grads = {block: codec.decode(frame.data()[:size], step, out=self.block_grads[block])
                 for block, frame in frames.items()}
        t_decode, clock = time.monotonic() - clock, time.monotonic()
        order = sorted(grads)   # block order: the sum is the same bytes whatever arrived first
        holders = [self.tracker.chosen()[b] for b in order]
        aggregate, weights = self.combiner.combine(holders, [grads[b] for b in order],
                                                   [block_batch_size(self.session)] * len(order))
        loss = float(np.mean([frame.field("metric") for frame in frames.values()]))
        for index in held.values():
            self.inbox.repost(index)
        t_aggregate, clock = time.monotonic() - clock, time.monotonic()
        packet = codec.encode(aggregate, step)
        kernel = packet[:0]
        if codec.kernel_due(step + 1):
            kernel = codec.merge_kernels(list(self.local_kernels.values()))
            self.events.append((step, "kernel", f"version {codec.version + 1} from {len(self.local_kernels)} workers"))
        self.local_kernels.clear()
        t_encode, clock = time.monotonic() - clock, time.monotonic()
        self.flags = self._flags(step)
        MPI.Request.Waitall(self.update_sends)
        nbytes = self.update.write([packet, kernel], step=step, kind=Kind.UPDATE, sender=SERVER,
                                   version=codec.version, flags=self.flags)
        arrived = [w for w in range(1, self.session.n_workers + 1) if not np.isnan(arrival[w - 1])]
        self.update_sends = [self.channel.isend(self.update, nbytes, w) for w in arrived]
        self.kernel_bytes += kernel.size * len(arrived)
        self.answered[arrived] = step
        self.synced_to[arrived] = step
        before = self._validation_loss()
        apply_update(self.session, codec, step, packet, kernel)   # the bytes just sent: same result everywhere
        if self.combiner.learns:
            self.combiner.feedback(before - self._validation_loss())
        self.completed = step
        used_blocks, weight = np.zeros(self.session.n_workers), np.zeros(self.session.n_workers)
        for holder, share in zip(holders, weights):
            used_blocks[holder] += 1
            weight[holder] += share
        self.used_steps += used_blocks > 0
        self.wait_total += t_wait
        row = {"step": step, "loss": loss, "bytes_up": self.step_bytes.sum(),
               "bytes_down": self.channel.bytes_sent - sent_before, "t_wait": t_wait, "t_decode": t_decode,
               "t_aggregate": t_aggregate, "t_encode": t_encode, "t_apply": time.monotonic() - clock,
               "kernel_version": codec.version}
        workers = {"bytes": self.step_bytes.copy(), "arrival_s": arrival, "used": (used_blocks > 0).astype(np.int8),
                   "weight": weight}
        return row, workers

    def _validation_loss(self) -> float:
        """Loss on rank 0's validation set (actor-critic reward); 0 when there is none."""
        return self.session.model.evaluate(*self.validation)[0] if self.validation is not None else 0.0

    def _flags(self, step: int) -> int:
        flags = 0
        if self.stop.requested and not self.stop_from:
            self.stop_from = f"rank 0 ({self.stop.signal_name})"
        if self.stop_from:
            flags |= Flag.STOP | Flag.CHECKPOINT
        if checkpoint_due(self.session, step):
            flags |= Flag.CHECKPOINT
        return flags

    def _take(self, index: int, step: int, start: float, held: dict[int, int], arrival: np.ndarray) -> None:
        """Handle one received frame: use it for this step, drop it, or answer a late worker."""
        frame = self.inbox.frames[index]
        sender, sent_step, block = frame.field("sender"), frame.field("step"), frame.field("block")
        self.step_bytes[sender - 1] += HEADER.itemsize + frame.field("length")
        if frame.field("flags") & Flag.STOP and not self.stop_from:
            self.stop_from = f"rank {sender}"
        if sent_step == step:
            if frame.field("version") != self.codec.version:
                raise RuntimeError(f"rank {sender} encoded step {step} with kernel version "
                                   f"{frame.field('version')}; rank 0 has {self.codec.version}")
            if np.isnan(arrival[sender - 1]):
                arrival[sender - 1] = time.monotonic() - start
            payload, size = frame.payload(), self.codec.payload_nbytes(step)
            if payload.size > size:   # a local kernel rides along (once per worker and refresh)
                self.local_kernels[sender] = to_numpy(payload[size:]).copy()
                self.kernel_bytes += payload.size - size
            if self.tracker.add(sender - 1, block):
                held[block] = index
                return
        elif sent_step > self.answered[sender]:   # a late worker-step nobody answered yet
            self._resync(sender, sent_step)
        self.inbox.repost(index)

    def _resync(self, worker: int, worker_step: int) -> None:
        """Send a late worker the current state (and the latest flags) so it rejoins at ``completed + 1``."""
        pending = self.resync_sends.get(worker)
        if pending is not None:
            pending.Wait()
        frame = self.resync[worker]
        state = as_array(export_state(self.session.model, self.session.optimizer), self.session.placement.xp)
        nbytes = frame.write([state, self.codec.kernel_payload()], step=self.completed, kind=Kind.RESYNC,
                             sender=SERVER, version=self.codec.version, flags=self.flags)
        self.resync_sends[worker] = self.channel.isend(frame, nbytes, worker)
        self.answered[worker] = worker_step
        self.synced_to[worker] = self.completed
        self.resyncs += 1
        self.events.append((self.completed, "straggler", f"rank {worker} missed step {worker_step}; resynced"))

    def bring_all_to(self, step: int) -> None:
        """Wait until every worker has been answered up to ``step`` (late ones by resync)."""
        while (self.synced_to[1:] < step).any():
            self._take(self.inbox.wait(), step + 1, time.monotonic(), {}, np.full(self.session.n_workers, np.nan))

    def close(self) -> None:
        MPI.Request.Waitall(self.update_sends + list(self.resync_sends.values()))
        self.inbox.close()


def server(session: Session) -> dict | int:
    cfg, model = session.cfg, session.model
    state = Server(session)
    first = 0
    if session.checkpoint is not None:
        first, local = checkpointing.restore(session, session.checkpoint)
        load_local_state(session, state.codec, local, state.combiner)
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
                test_loss, accuracy = model.evaluate(x_test, y_test)
                last_eval = {"step": step, "accuracy": accuracy, "test_loss": test_loss, "train_loss": row["loss"]}
                progress.report(step, loss=row["loss"], test_loss=test_loss, accuracy=accuracy)
                row.update(accuracy=accuracy, test_loss=test_loss)
            row.update(t_eval=time.monotonic() - clock, wall_s=time.monotonic() - session.started)
            progress.advance(loss=row["loss"])
            if state.flags & Flag.CHECKPOINT:
                state.bring_all_to(step)
                path = checkpointing.save(session, step, local_state(session, state.codec, state.combiner))
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
    cfg, channel, model = session.cfg, session.channel, session.model
    device = session.device
    blocks = {b: (as_tensor(d.x).to(device), as_tensor(d.y).to(device)) for b, d in session.blocks.items()}
    batch = block_batch_size(session)
    codec = make_codec(session)
    step = 1
    if session.checkpoint is not None:
        completed, local = checkpointing.restore(session, session.checkpoint)
        load_local_state(session, codec, local)
        step = completed + 1
    open_trace(session, STEP_COLUMNS, WORKER_COLUMNS, None)
    stop = StopRequest()
    state_floats = model.size + state_size(session.optimizer)
    outbox = Frame(4 * model.size + codec.max_kernel_nbytes(), session.memory, receives=False)
    inbox = Frame(4 * state_floats + codec.max_kernel_nbytes(), session.memory)
    grads = gradient_array(session)
    while step <= cfg.train.steps:
        session.faults.straggle()
        for position, (block, (x, y)) in enumerate(blocks.items()):
            rows = torch.from_numpy(block_batch(len(y), batch, cfg.seed, block, step)).to(device)
            loss = compute_gradient(session, x[rows], y[rows], step)
            session.faults.update(grads)
            packet = codec.encode(grads, step)
            kernel = codec.local_kernel() if position == 0 and codec.kernel_due(step + 1) else packet[:0]
            nbytes = outbox.write([packet, kernel], step=step, kind=Kind.GRADIENT, sender=session.rank,
                                  block=block, version=codec.version, metric=loss,
                                  flags=Flag.STOP if stop.requested else 0)
            channel.send(outbox, nbytes, SERVER)
        channel.recv(inbox, SERVER, Tag.DOWNLINK)
        if inbox.field("kind") == Kind.UPDATE:
            update_step, payload = int(inbox.field("step")), inbox.data()
            size = codec.payload_nbytes(update_step)
            apply_update(session, codec, update_step, payload[:size], payload[size:])
        else:   # RESYNC: this step closed without us; take rank 0's state and kernel, and rejoin
            payload = inbox.data()
            import_state(model, session.optimizer, as_tensor(payload[:4 * state_floats].view(np.float32)))
            codec.install_kernel(payload[4 * state_floats:], any_version=True)
        step = int(inbox.field("step")) + 1
        if inbox.field("flags") & Flag.CHECKPOINT:
            checkpointing.save(session, step - 1, local_state(session, codec))
        if inbox.field("flags") & Flag.STOP:
            return EXIT_RESUMABLE
    finish(session, {})
    return None


def compute_gradient(session: Session, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    """Forward/backward into the flat gradient; a non-finite loss is a clear error naming step and rank
    (a non-finite gradient is caught, with the same detail, by the codec's encode)."""
    loss = session.model.backward(x, y)
    if not np.isfinite(loss):
        raise HpcfedError(f"non-finite loss {loss} at step {step} on rank {session.rank}; try a smaller train.lr")
    return loss
