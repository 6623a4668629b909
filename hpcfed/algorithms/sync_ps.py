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


def apply_update(session: Session, update: Frame) -> None:
    """Every rank: take the aggregate's bytes as the gradient and step the optimizer."""
    session.model.grads.copy_(torch.from_numpy(update.payload(np.float32)))
    session.optimizer.step()


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
        capacity = 4 * session.model.size
        per_worker = max(len(b) for b in session.assignment.blocks)
        self.inbox = Inbox(self.channel, range(1, workers + 1), per_worker, capacity, Tag.UPLINK)
        self.update = Frame(capacity)
        self.update_sends: list[MPI.Request] = []
        self.resync = {w: Frame(4 * (session.model.size + state_size(session.optimizer))) for w in range(1, workers + 1)}
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
        frames = {block: self.inbox.frames[index] for block, index in held.items()}
        grads = {block: frame.payload(np.float32) for block, frame in frames.items()}
        aggregate = combine_block_gradients(grads, {b: block_batch_size(self.session) for b in grads})
        loss = float(np.mean([frame.field("metric") for frame in frames.values()]))
        for index in held.values():
            self.inbox.repost(index)
        MPI.Request.Waitall(self.update_sends)
        nbytes = self.update.write(aggregate, step=step, kind=Kind.UPDATE, sender=SERVER)
        arrived = [w for w in range(1, self.session.n_workers + 1) if not np.isnan(arrival[w - 1])]
        self.update_sends = [self.channel.isend(self.update, nbytes, w) for w in arrived]
        self.answered[arrived] = step
        self.synced_to[arrived] = step
        apply_update(self.session, self.update)
        self.completed = step
        self.log.used.append(sorted({w + 1 for w in self.tracker.chosen().values()}))
        self.log.arrival_s.append(arrival.tolist())
        return loss

    def _take(self, index: int, step: int, start: float, held: dict[int, int], arrival: np.ndarray) -> None:
        """Handle one received frame: use it for this step, drop it, or answer a late worker."""
        frame = self.inbox.frames[index]
        sender, sent_step, block = frame.field("sender"), frame.field("step"), frame.field("block")
        if sent_step == step:
            if np.isnan(arrival[sender - 1]):
                arrival[sender - 1] = time.monotonic() - start
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
        nbytes = frame.write(export_state(self.session.model, self.session.optimizer).numpy(),
                             step=self.completed, kind=Kind.RESYNC, sender=SERVER)
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
        "used_fraction": (used / cfg.train.steps).tolist(),
        "evaluations": history,
        "per_step": {"wait_s": log.wait_s, "used": log.used, "arrival_s": log.arrival_s},
    })


def worker(session: Session) -> None:
    cfg, channel, model = session.cfg, session.channel, session.model
    blocks = {b: (torch.from_numpy(d.x), torch.from_numpy(d.y)) for b, d in session.blocks.items()}
    batch = block_batch_size(session)
    outbox = Frame(4 * model.size)
    inbox = Frame(4 * (model.size + state_size(session.optimizer)))
    straggle = Straggler(session)
    step = 1
    while step <= cfg.train.steps:
        straggle(step)
        for block, (x, y) in blocks.items():
            rows = torch.from_numpy(block_batch(len(y), batch, cfg.seed, block, step))
            loss = compute_gradient(session, x[rows], y[rows], step)
            nbytes = outbox.write(model.grads.numpy(), step=step, kind=Kind.GRADIENT, sender=session.rank,
                                  block=block, metric=loss)
            channel.send(outbox, nbytes, SERVER)
        channel.recv(inbox, SERVER, Tag.DOWNLINK)
        if inbox.field("kind") == Kind.UPDATE:
            apply_update(session, inbox)
            step += 1
        else:   # RESYNC: this step closed without us; take rank 0's state and rejoin
            import_state(model, session.optimizer, torch.from_numpy(inbox.payload(np.float32)))
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
    """Forward/backward into the flat gradient; a non-finite result is a clear error naming step and rank."""
    loss = session.model.backward(x, y)
    if not (np.isfinite(loss) and torch.isfinite(session.model.grads).all()):
        raise HpcfedError(f"non-finite loss or gradient at step {step} on rank {session.rank} "
                          f"(loss {loss}); try a smaller train.lr")
    return loss
