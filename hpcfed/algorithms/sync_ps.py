"""Algorithm ``sync``: parameter-server data-parallel SGD, optionally straggler-tolerant.

Each step every worker sends one gradient per data block it holds; rank 0 aggregates
as soon as its completion rule is met, sends the aggregate to the workers that took
part, and every rank applies the same bytes with the same optimizer, so all replicas
stay bit-identical. Completion rules (``coding``):

- ``wait-all`` (``coding.enabled: false``): every worker's block; the classic parameter server.
- ``drop-stragglers``: the first k workers' blocks (what FL frameworks do; biased on non-IID data).
- ``coded``: the first complete sample set of a coded assignment (any k workers hold one), so
  the gradient is exact however the stragglers fall.

A worker that misses a step (its message arrives after the step closed) is answered with a
RESYNC frame (parameters + optimizer state) and rejoins at the current step; each worker has
at most one message from rank 0 outstanding, so a straggler never builds up a backlog.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from hpcfed.codec.codec import GradientCodec
from hpcfed.coding import CompletionTracker, block_batch, combine_block_gradients
from hpcfed.errors import HpcfedError
from hpcfed.optim import export_state, import_state, state_size
from hpcfed.runtime.comm import HEADER, SERVER, Frame, Kind, Tag
from hpcfed.runtime.inbox import Inbox
from hpcfed.runtime.log import Progress
from hpcfed.seeding import rng
from hpcfed.session import Session, finish


def run(session: Session) -> dict | None:
    """Train for ``train.steps`` steps; rank 0 returns the summary."""
    return server(session) if session.is_server else worker(session)


def block_batch_size(session: Session) -> int:
    """Samples per block per step, so one complete set is ``n_workers * batch_size`` samples."""
    return max(1, round(session.n_workers * session.cfg.train.batch_size / session.assignment.n_blocks))


def make_codec(session: Session) -> GradientCodec:
    """This rank's codec (raw fp32 packets when compression is off)."""
    return GradientCodec(session.model.size, session.cfg.compression, seed=session.cfg.seed, rank=session.rank)


def apply_update(session: Session, codec: GradientCodec, update: Frame) -> None:
    """Every rank: decode the aggregate's packet into the gradient, step the optimizer, and
    install the next kernel if the update carries one (after decoding: the packet used the old one)."""
    step = int(update.field("step"))
    payload = update.payload()
    size = codec.payload_nbytes(step)
    codec.decode(payload[:size], step, out=session.model.grads.numpy())
    session.optimizer.step()
    if payload.size > size:
        codec.install_kernel(payload[size:])


@dataclass
class StepLog:
    """Per-step record of who arrived when, who was used, and how long rank 0 waited."""

    wait_s: list[float] = field(default_factory=list)
    used: list[list[int]] = field(default_factory=list)
    arrival_s: list[list[float]] = field(default_factory=list)
    resyncs: int = 0


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
        self.inbox = Inbox(self.channel, range(1, workers + 1), per_worker, capacity, Tag.UPLINK)
        self.block_grads = {b: np.zeros(session.model.size, np.float32) for b in range(session.assignment.n_blocks)}
        self.local_kernels: dict[int, np.ndarray] = {}
        self.kernel_bytes = 0
        self.update = Frame(capacity)
        self.update_sends: list[MPI.Request] = []
        state_bytes = 4 * (session.model.size + state_size(session.optimizer)) + self.codec.max_kernel_nbytes()
        self.resync = {w: Frame(state_bytes) for w in range(1, workers + 1)}
        self.resync_sends: dict[int, MPI.Request] = {}
        self.answered = np.zeros(workers + 1, dtype=np.int64)   # last worker-step answered, by rank
        self.synced_to = np.zeros(workers + 1, dtype=np.int64)  # step each worker's state reaches once answered
        self.completed = 0                                       # last step applied on rank 0
        self.log = StepLog()

    def complete(self) -> bool:
        if self.mode == "drop-stragglers":
            return len(self.tracker.chosen()) >= min(self.wait_for, self.session.n_workers)
        return self.tracker.complete()

    def run_step(self, step: int) -> float:
        """Collect, aggregate and answer one step; returns the mean training loss of the used blocks."""
        start = time.monotonic()
        self.tracker.reset(step)
        held: dict[int, int] = {}
        arrival = np.full(self.session.n_workers, np.nan)
        while not self.complete():
            self._take(self.inbox.wait(), step, start, held, arrival)
        self.log.wait_s.append(time.monotonic() - start)
        for index in self.inbox.ready():   # take whatever else has already arrived
            self._take(index, step, start, held, arrival)
        codec, size = self.codec, self.codec.payload_nbytes(step)
        frames = {block: self.inbox.frames[index] for block, index in held.items()}
        grads = {block: codec.decode(frame.payload()[:size], step, out=self.block_grads[block])
                 for block, frame in frames.items()}
        aggregate = combine_block_gradients(grads, {b: block_batch_size(self.session) for b in grads})
        loss = float(np.mean([frame.field("metric") for frame in frames.values()]))
        for index in held.values():
            self.inbox.repost(index)
        packet = codec.encode(aggregate, step)
        kernel = codec.merge_kernels(list(self.local_kernels.values())) if codec.kernel_due(step + 1) else packet[:0]
        self.local_kernels.clear()
        self.kernel_bytes += kernel.size * self.session.n_workers
        MPI.Request.Waitall(self.update_sends)
        nbytes = self.update.write([packet, kernel], step=step, kind=Kind.UPDATE, sender=SERVER,
                                   version=codec.version)
        arrived = [w for w in range(1, self.session.n_workers + 1) if not np.isnan(arrival[w - 1])]
        self.update_sends = [self.channel.isend(self.update, nbytes, w) for w in arrived]
        self.answered[arrived] = step
        self.synced_to[arrived] = step
        apply_update(self.session, codec, self.update)
        self.completed = step
        self.log.used.append(sorted({w + 1 for w in self.tracker.chosen().values()}))
        self.log.arrival_s.append(arrival.tolist())
        return loss

    def _take(self, index: int, step: int, start: float, held: dict[int, int], arrival: np.ndarray) -> None:
        """Handle one received frame: use it for this step, drop it, or answer a late worker."""
        frame = self.inbox.frames[index]
        sender, sent_step, block = frame.field("sender"), frame.field("step"), frame.field("block")
        if sent_step == step:
            if frame.field("version") != self.codec.version:
                raise RuntimeError(f"rank {sender} encoded step {step} with kernel version "
                                   f"{frame.field('version')}; rank 0 has {self.codec.version}")
            if np.isnan(arrival[sender - 1]):
                arrival[sender - 1] = time.monotonic() - start
            payload, size = frame.payload(), self.codec.payload_nbytes(step)
            if payload.size > size:   # a local kernel rides along (once per worker and refresh)
                self.local_kernels[sender] = payload[size:].copy()
                self.kernel_bytes += payload.size - size
            if self.tracker.add(sender - 1, block):
                held[block] = index
                return
        elif sent_step > self.answered[sender]:   # a late worker-step nobody answered yet
            self._resync(sender, sent_step)
        self.inbox.repost(index)

    def _resync(self, worker: int, worker_step: int) -> None:
        """Send a late worker the current state so it rejoins at step ``completed + 1``."""
        pending = self.resync_sends.get(worker)
        if pending is not None:
            pending.Wait()
        frame = self.resync[worker]
        state = export_state(self.session.model, self.session.optimizer).numpy()
        nbytes = frame.write([state, self.codec.kernel_payload()], step=self.completed, kind=Kind.RESYNC,
                             sender=SERVER, version=self.codec.version)
        self.resync_sends[worker] = self.channel.isend(frame, nbytes, worker)
        self.answered[worker] = worker_step
        self.synced_to[worker] = self.completed
        self.log.resyncs += 1

    def finish_workers(self, last_step: int) -> None:
        """After the last step: bring every worker to the final state, then release all buffers."""
        while (self.synced_to[1:] < last_step).any():
            self._take(self.inbox.wait(), last_step + 1, time.monotonic(), {}, np.full(self.session.n_workers, np.nan))
        MPI.Request.Waitall(self.update_sends + list(self.resync_sends.values()))
        self.inbox.close()


def server(session: Session) -> dict:
    cfg, model = session.cfg, session.model
    state = Server(session)
    x_test, y_test = torch.from_numpy(session.test.x), torch.from_numpy(session.test.y)
    progress = Progress(cfg.train.steps)
    history: list[dict] = []
    loop_start = time.monotonic()
    for step in range(1, cfg.train.steps + 1):
        train_loss = state.run_step(step)
        progress.advance(loss=train_loss)
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            test_loss, accuracy = model.evaluate(x_test, y_test)
            history.append({"step": step, "train_loss": train_loss, "test_loss": test_loss, "accuracy": accuracy})
            progress.report(step, loss=train_loss, test_loss=test_loss, accuracy=accuracy)
    train_time_s = time.monotonic() - loop_start
    state.finish_workers(cfg.train.steps)
    progress.close()
    last, log = history[-1], state.log
    used = np.zeros(session.n_workers)
    for ranks in log.used:
        used[np.asarray(ranks, dtype=int) - 1] += 1
    return finish(session, {
        "steps": cfg.train.steps,
        "final_accuracy": last["accuracy"],
        "final_test_loss": last["test_loss"],
        "final_train_loss": last["train_loss"],
        "mode": state.mode,
        "dense_bytes_per_step": HEADER.itemsize + 4 * model.size,
        "train_time_s": train_time_s,
        "time_per_step_s": train_time_s / cfg.train.steps,
        "mean_wait_s": float(np.mean(log.wait_s)),
        "resyncs": log.resyncs,
        "kernel_bytes": state.kernel_bytes,
        "compression": cfg.compression.enabled,
        "used_fraction": (used / cfg.train.steps).tolist(),
        "evaluations": history,
        "per_step": {"wait_s": log.wait_s, "used": log.used, "arrival_s": log.arrival_s},
    })


def worker(session: Session) -> None:
    cfg, channel, model = session.cfg, session.channel, session.model
    blocks = {b: (torch.from_numpy(d.x), torch.from_numpy(d.y)) for b, d in session.blocks.items()}
    batch = block_batch_size(session)
    codec = make_codec(session)
    state_floats = model.size + state_size(session.optimizer)
    outbox = Frame(4 * model.size + codec.max_kernel_nbytes())
    inbox = Frame(4 * state_floats + codec.max_kernel_nbytes())
    straggle = Straggler(session)
    step = 1
    while step <= cfg.train.steps:
        straggle(step)
        for position, (block, (x, y)) in enumerate(blocks.items()):
            rows = torch.from_numpy(block_batch(len(y), batch, cfg.seed, block, step))
            loss = compute_gradient(session, x[rows], y[rows], step)
            packet = codec.encode(model.grads.numpy(), step)
            kernel = codec.local_kernel() if position == 0 and codec.kernel_due(step + 1) else packet[:0]
            nbytes = outbox.write([packet, kernel], step=step, kind=Kind.GRADIENT, sender=session.rank,
                                  block=block, version=codec.version, metric=loss)
            channel.send(outbox, nbytes, SERVER)
        channel.recv(inbox, SERVER, Tag.DOWNLINK)
        if inbox.field("kind") == Kind.UPDATE:
            apply_update(session, codec, inbox)
            step += 1
        else:   # RESYNC: this step closed without us; take rank 0's state and kernel, and rejoin
            payload = inbox.payload()
            import_state(model, session.optimizer, torch.from_numpy(payload[:4 * state_floats].view(np.float32)))
            codec.install_kernel(payload[4 * state_floats:], any_version=True)
            step = int(inbox.field("step")) + 1
    finish(session, {})


class Straggler:
    """Fault injection (``faults.stragglers``): chosen ranks sleep before computing a step."""

    def __init__(self, session: Session) -> None:
        faults = session.cfg.faults.stragglers
        self.active = session.rank in faults.ranks and faults.delay_s > 0
        self.faults = faults
        self.rng = rng(session.cfg.seed, "straggler", session.rank)

    def __call__(self, step: int) -> None:
        if self.active and self.rng.random() < self.faults.prob:
            time.sleep(self.rng.exponential(self.faults.delay_s) if self.faults.random else self.faults.delay_s)


def compute_gradient(session: Session, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    """Forward/backward into the flat gradient; a non-finite loss is a clear error naming step and rank
    (a non-finite gradient is caught, with the same detail, by the codec's encode)."""
    loss = session.model.backward(x, y)
    if not np.isfinite(loss):
        raise HpcfedError(f"non-finite loss {loss} at step {step} on rank {session.rank}; try a smaller train.lr")
    return loss
