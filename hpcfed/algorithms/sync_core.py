"""The pure step logic of algorithm ``sync``: rank 0's :class:`ServerCore` and a worker's :class:`WorkerCore`.

Neither imports MPI: each takes what it uses (transport, codec, combiner, replica, rules)
and moves frames through the transport it is given, MPI (:class:`~hpcfed.runtime.transport.Transport`)
or in-process (:class:`~hpcfed.runtime.loopback.LoopbackTransport`). The drivers in
:mod:`hpcfed.algorithms.sync_ps` add traces, evaluation and checkpoints around them.

Frames of one step (payload parts laid end to end, sizes known to both sides):

    worker -> 0   GRADIENT   packet | buffers | local kernel (first block of a refresh step only)
    0 -> worker   UPDATE     packet | buffers | global kernel (refresh steps only)
    0 -> worker   RESYNC     parameters + optimizer state + buffers | installed kernel

Aggregation stays in the codec's coefficient domain: rank 0 unpacks each packet to its k kept
values + raw tail (:meth:`GradientCodec.unpack`), combines those, adds its residual and quantizes
(:meth:`GradientCodec.encode_unpacked`); the one inverse DCT per step is the one every rank does
to apply the update. Buffers (BatchNorm statistics): before each block's forward a worker loads
the buffers of the last update, so each block reports "synced state + that block's batch"; rank 0
averages the reported buffers of the blocks it used, in block order, and sends the average with
the update; every rank loads it. Coded copies therefore agree, and so do the replicas. Buffers
travel through :class:`~hpcfed.codec.buffers.BufferCoding`: fp32, or fp16 changes against the
synced buffers when the gradient is compressed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

from hpcfed.aggregation.combiner import Combiner
from hpcfed.codec.buffers import BufferCoding
from hpcfed.codec.codec import GradientCodec
from hpcfed.coding import Assignment, CompletionTracker, block_batch
from hpcfed.config import CodingConfig
from hpcfed.errors import HpcfedError
from hpcfed.models import FlatModel
from hpcfed.optim import state_tensors
from hpcfed.runtime.comm import HEADER, SERVER, Flag, Frame, Kind, Tag
from hpcfed.runtime.device import as_array, as_tensor
from hpcfed.runtime.inbox import Inbox
from hpcfed.runtime.memory import HOST, Memory
from hpcfed.seeding import rng
from hpcfed.xp import to_numpy


class Replica:
    """One rank's model and optimizer as flat arrays of the rank's array module; its buffers travel
    as fp16 changes when ``compress_buffers`` (as the gradient does with compression on), else as fp32."""

    def __init__(self, model: FlatModel, optimizer: torch.optim.Optimizer, xp: ModuleType, *,
                 compress_buffers: bool) -> None:
        self.model, self.optimizer, self.xp = model, optimizer, xp
        self.grads = as_array(model.grads, xp)
        self.buffer_size = model.buffer_size
        self.buffer_coding = BufferCoding(model.buffer_size, compress_buffers, xp)
        self.state_size = model.size + sum(t.numel() for t in state_tensors(optimizer)) + self.buffer_size

    def apply(self) -> None:
        """Step the optimizer with the gradient now in ``grads``."""
        self.optimizer.step()

    def buffers(self) -> Any:
        return as_array(self.model.export_buffers(), self.xp)

    def load_buffers(self, flat: Any) -> None:
        if self.buffer_size:
            self.model.import_buffers(as_tensor(flat))

    def snapshot(self) -> Any:
        """Parameters, optimizer state and buffers as one flat fp32 array (what a resync carries)."""
        device = self.model.params.device   # Adam keeps its step count on the CPU even for GPU parameters
        parts = [self.model.params, *(t.reshape(-1).float().to(device) for t in state_tensors(self.optimizer)),
                 self.model.export_buffers().to(device)]
        return as_array(torch.cat(parts), self.xp)

    def load_snapshot(self, flat: Any) -> None:
        tensor = as_tensor(flat)
        self.model.params.copy_(tensor[:self.model.size])
        offset = self.model.size
        for state in state_tensors(self.optimizer):
            state.copy_(tensor[offset:offset + state.numel()].view_as(state))
            offset += state.numel()
        self.load_buffers(tensor[offset:])


@dataclass(frozen=True)
class Schedule:
    """When a step's update asks for a checkpoint: every ``every`` steps (0 = never) and at ``last``."""

    last: int
    every: int

    def checkpoint_due(self, step: int) -> bool:
        return step == self.last or (self.every > 0 and step % self.every == 0)


class ServerCore:
    """Rank 0's side: receive blocks, decide completion, aggregate, answer every worker-step once.

    Completion rules: ``wait-all`` (every block), ``drop-stragglers`` (the first ``wait_for``
    workers), ``coded`` (the first complete sample set of a coded assignment). A worker whose
    frame arrives after its step closed gets the state of the latest completed step (RESYNC),
    sent from one snapshot shared by every late worker of that step.
    """

    def __init__(self, transport: Any, codec: GradientCodec, combiner: Combiner, replica: Replica,
                 assignment: Assignment, mode: str, wait_for: int, block_batch_size: int, schedule: Schedule,
                 stop: Any, memory: Memory = HOST,
                 validation: Callable[[int, bool], tuple[float, float, Any]] | None = None) -> None:
        self.transport, self.codec, self.combiner, self.replica = transport, codec, combiner, replica
        self.assignment, self.mode, self.wait_for = assignment, mode, wait_for
        self.block_batch_size, self.schedule, self.stop = block_batch_size, schedule, stop
        self.validation = validation   # (step, reward?) -> (loss before, loss, rank 0's gradient); or None
        self.n_workers = assignment.n_workers
        self.tracker = CompletionTracker(assignment)
        xp = replica.xp
        capacity = codec.max_payload_nbytes() + replica.buffer_coding.nbytes + codec.max_kernel_nbytes()
        per_worker = max(len(b) for b in assignment.blocks)
        self.inbox = Inbox(transport, range(1, self.n_workers + 1), per_worker, capacity, Tag.UPLINK, memory)
        width = max(codec.unpacked_size(0), codec.unpacked_size(codec.cfg.warmup_steps))
        self.block_vectors = [xp.zeros(width, xp.float32) for _ in range(assignment.n_blocks)]
        self.local_kernels: dict[int, np.ndarray] = {}
        self.update = Frame(capacity, memory, receives=False)
        self.update_sends: list = []
        self.resync = Frame(4 * replica.state_size + codec.max_kernel_nbytes(), memory, receives=False)
        self.resync_step = -1              # the completed step whose state the resync frame holds
        self.resync_nbytes = 0
        self.resync_sends: list = []
        self.answered = np.zeros(self.n_workers + 1, dtype=np.int64)   # last worker-step answered, by rank
        self.synced_to = np.zeros(self.n_workers + 1, dtype=np.int64)  # step each worker's state reaches
        self.completed = 0
        self.flags = 0
        self.stop_from = ""
        self.events: list[tuple[int, str, str]] = []
        self.resyncs = 0
        self.kernel_bytes = 0
        self.wait_total = 0.0
        self.last_validation_loss = float("nan")   # actor-critic reward: loss before the previous update
        self.used_steps = np.zeros(self.n_workers)
        self.step_bytes = np.zeros(self.n_workers)

    def start_at(self, step: int) -> None:
        """Resume: every worker's state is at ``step``."""
        self.answered[:] = self.synced_to[:] = self.completed = step

    def complete(self) -> bool:
        if self.mode == "drop-stragglers":
            return len(self.tracker.chosen()) >= min(self.wait_for, self.n_workers)
        return self.tracker.complete()

    def run_step(self, step: int) -> tuple[dict, dict]:
        """Collect, aggregate and answer one step; returns its trace row and per-worker columns."""
        start = time.monotonic()
        sent_before = self.transport.bytes_sent
        self.tracker.reset(step)
        self.step_bytes[:] = 0
        held: dict[int, int] = {}
        arrival = np.full(self.n_workers, np.nan)
        reference = self._validate(step)    # needs only the model of step - 1: runs while the workers compute
        t_validate = time.monotonic() - start
        while not self.complete():
            for index in self.inbox.wait():   # a batch of arrivals; the rest of it is taken too
                self._take(index, step, start, held, arrival)
        t_wait = time.monotonic() - start - t_validate
        for index in self.inbox.ready():   # whatever else has already arrived
            self._take(index, step, start, held, arrival)
        codec, size, buffers = self.codec, self.codec.payload_nbytes(step), self.replica.buffer_coding.nbytes
        clock = time.monotonic()
        order = sorted(held)   # block order: the sum is the same bytes whatever arrived first
        frames = [self.inbox.frames[held[b]] for b in order]
        vectors = [codec.unpack(frame.data()[:size], step, out=self.block_vectors[b][:codec.unpacked_size(step)])
                   for b, frame in zip(order, frames)]
        synced = self.replica.buffers()   # the last update's (the validation pass puts them back)
        mean_buffers = self.replica.buffer_coding.mean([frame.data()[size:size + buffers] for frame in frames], synced)
        loss = float(np.mean([frame.field("metric") for frame in frames]))
        t_decode, clock = time.monotonic() - clock, time.monotonic()
        holders = [self.tracker.chosen()[b] for b in order]
        aggregate, weights = self.combiner.combine(holders, vectors, [self.block_batch_size] * len(order),
                                                   reference=reference)
        for index in held.values():
            self.inbox.repost(index)
        t_aggregate, clock = time.monotonic() - clock + t_validate, time.monotonic()
        packet = codec.encode_unpacked(aggregate, step)
        kernel = packet[:0]
        if codec.kernel_due(step + 1):
            kernel = codec.merge_kernels(list(self.local_kernels.values()))
            self.events.append((step, "kernel", f"version {codec.version + 1} from {len(self.local_kernels)} workers"))
        self.local_kernels.clear()
        t_encode, clock = time.monotonic() - clock, time.monotonic()
        self.flags = self._flags(step)
        self.transport.wait_all(self.update_sends)
        nbytes = self.update.write([packet, mean_buffers, kernel], step=step, kind=Kind.UPDATE, sender=SERVER,
                                   version=codec.version, flags=self.flags)
        arrived = [w for w in range(1, self.n_workers + 1) if not np.isnan(arrival[w - 1])]
        self.update_sends = [self.transport.isend(self.update, nbytes, w) for w in arrived]
        self.kernel_bytes += kernel.size * len(arrived)
        self.answered[arrived] = step
        self.synced_to[arrived] = step
        apply_update(self.replica, codec, step, packet, mean_buffers, kernel, synced)   # the bytes just sent
        self.completed = step
        used_blocks, weight = np.zeros(self.n_workers), np.zeros(self.n_workers)
        for holder, share in zip(holders, weights):
            used_blocks[holder] += 1
            weight[holder] += share
        self.used_steps += used_blocks > 0
        self.wait_total += t_wait
        row = {"step": step, "loss": loss, "bytes_up": self.step_bytes.sum(),
               "bytes_down": self.transport.bytes_sent - sent_before, "t_wait": t_wait, "t_decode": t_decode,
               "t_aggregate": t_aggregate, "t_encode": t_encode, "t_apply": time.monotonic() - clock,
               "kernel_version": codec.version}
        workers = {"bytes": self.step_bytes.copy(), "arrival_s": arrival, "used": (used_blocks > 0).astype(np.int8),
                   "weight": weight}
        return row, workers

    def _validate(self, step: int) -> Any:
        """Learning and reference rules: feed back the last update's validation-loss improvement, and
        return rank 0's own gradient on its validation set (None when the rule wants none)."""
        if self.validation is None or not (self.combiner.learns or self.combiner.wants_reference):
            return None
        before, loss, reference = self.validation(step, self.combiner.learns)
        if self.combiner.learns and np.isfinite(self.last_validation_loss):
            self.combiner.feedback(self.last_validation_loss - before)   # the last update's effect on one draw
        self.last_validation_loss = loss
        return reference if self.combiner.wants_reference else None

    def _flags(self, step: int) -> int:
        flags = 0
        if self.stop.requested and not self.stop_from:
            self.stop_from = f"rank 0 ({self.stop.signal_name})"
        if self.stop_from:
            flags |= Flag.STOP | Flag.CHECKPOINT
        if self.schedule.checkpoint_due(step):
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
            fixed = self.codec.payload_nbytes(step) + self.replica.buffer_coding.nbytes
            if frame.field("length") > fixed:   # a local kernel rides along (once per worker and refresh)
                self.local_kernels[sender] = to_numpy(frame.data()[fixed:]).copy()
                self.kernel_bytes += frame.field("length") - fixed
            if self.tracker.add(sender - 1, block):
                held[block] = index
                return
        elif sent_step > self.answered[sender]:   # a late worker-step nobody answered yet
            self._resync(sender, sent_step)
        self.inbox.repost(index)

    def _resync(self, worker: int, worker_step: int) -> None:
        """Send a late worker the current state (and the latest flags) so it rejoins at ``completed + 1``.

        One snapshot per completed step serves every late worker of that step."""
        if self.resync_step != self.completed:
            self.transport.wait_all(self.resync_sends)   # the frame is rewritten: earlier sends must be done
            self.resync_sends = []
            self.resync_nbytes = self.resync.write([self.replica.snapshot(), self.codec.kernel_payload()],
                                                   step=self.completed, kind=Kind.RESYNC, sender=SERVER,
                                                   version=self.codec.version, flags=self.flags)
            self.resync_step = self.completed
        self.resync_sends.append(self.transport.isend(self.resync, self.resync_nbytes, worker))
        self.answered[worker] = worker_step
        self.synced_to[worker] = self.completed
        self.resyncs += 1
        self.events.append((self.completed, "straggler", f"rank {worker} missed step {worker_step}; resynced"))

    def bring_all_to(self, step: int) -> None:
        """Wait until every worker has been answered up to ``step`` (late ones by resync)."""
        while (self.synced_to[1:] < step).any():
            for index in self.inbox.wait():
                self._take(index, step + 1, time.monotonic(), {}, np.full(self.n_workers, np.nan))

    def close(self) -> None:
        self.transport.wait_all(self.update_sends + self.resync_sends)
        self.inbox.close()


def completion_rule(coding: CodingConfig, n_workers: int) -> tuple[str, int]:
    """(mode, wait_for) of a ``coding`` config section: ``wait-all`` unless coding is on; k defaults to W - 1."""
    mode = coding.mode if coding.enabled else "wait-all"
    return mode, coding.target if coding.target is not None else max(1, n_workers - 1)


def validation_pass(replica: Replica, codec: GradientCodec, x: Any, y: Any, batch: int,
                    seed: int) -> Callable[[int, bool], tuple[float, float, Any]]:
    """Rank 0's ``validation`` for :class:`ServerCore`, on ``batch`` samples of the validation set (x, y)
    drawn afresh each step (all of it when ``batch >= len(y)``): ``validation(step, reward)`` returns
    (the loss on the previous step's draw when ``reward`` is asked, else NaN; the loss on this step's
    draw; the gradient on it, projected into the codec's coefficient domain). Buffers are left as they were."""
    def draw(step: int) -> Any:
        if batch >= len(y):
            return slice(None)
        return torch.from_numpy(rng(seed, "validation", step).choice(len(y), batch, replace=False)).to(y.device)

    def validation(step: int, reward: bool) -> tuple[float, float, Any]:
        buffers = replica.buffers().copy()
        before = float("nan")
        if reward and batch < len(y):   # with the whole set, this step's loss is the one on the previous draw
            previous = draw(step - 1)
            before = replica.model.train_loss(x[previous], y[previous])
            replica.load_buffers(buffers)
        rows = draw(step)
        loss = replica.model.backward(x[rows], y[rows])
        replica.load_buffers(buffers)
        if reward and batch >= len(y):
            before = loss
        return before, loss, codec.project(replica.grads, step)
    return validation


def apply_update(replica: Replica, codec: GradientCodec, step: int, packet: Any, buffers: Any, kernel: Any,
                 synced: Any) -> None:
    """Every rank: decode the aggregate's packet into the gradient, step the optimizer, load the step's
    buffers (coded against the ``synced`` ones), and install the next kernel if the update carries one
    (after decoding: the packet used the old one)."""
    codec.decode(packet, step, out=replica.grads)
    replica.apply()
    replica.load_buffers(replica.buffer_coding.decode(buffers, synced))
    if kernel.size:
        codec.install_kernel(kernel)


class WorkerCore:
    """A worker's side: one packet per held block each step, then the update (or a resync) from rank 0."""

    def __init__(self, transport: Any, codec: GradientCodec, replica: Replica, blocks: dict[int, tuple[Any, Any]],
                 batch: int, seed: int, faults: Any, memory: Memory = HOST) -> None:
        self.transport, self.codec, self.replica = transport, codec, replica
        self.blocks, self.batch, self.seed, self.faults = blocks, batch, seed, faults
        self.rank = transport.rank
        capacity = codec.max_payload_nbytes() + replica.buffer_coding.nbytes + codec.max_kernel_nbytes()
        self.outbox = Frame(capacity, memory, receives=False)
        self.inbox = Frame(max(capacity, 4 * replica.state_size + codec.max_kernel_nbytes()), memory)
        self.synced_buffers = replica.buffers()   # the buffers of the last update (each block starts from them)
        self.device = replica.model.params.device

    def upload(self, step: int, stop_requested: bool = False) -> None:
        """Compute and send this step's packet for every held block (in block order)."""
        codec, replica = self.codec, self.replica
        for position, (block, (x, y)) in enumerate(self.blocks.items()):
            rows = torch.from_numpy(block_batch(len(y), self.batch, self.seed, block, step)).to(self.device)
            replica.load_buffers(self.synced_buffers)
            loss = replica.model.backward(x[rows], y[rows])
            if not np.isfinite(loss):
                raise HpcfedError(f"non-finite loss {loss} at step {step} on rank {self.rank}; try a smaller train.lr")
            self.faults.update(replica.grads)
            packet = codec.encode(replica.grads, step)
            kernel = codec.local_kernel() if position == 0 and codec.kernel_due(step + 1) else packet[:0]
            buffers = replica.buffer_coding.encode(replica.buffers(), self.synced_buffers)
            nbytes = self.outbox.write([packet, buffers, kernel], step=step, kind=Kind.GRADIENT,
                                       sender=self.rank, block=block, version=codec.version, metric=loss,
                                       flags=Flag.STOP if stop_requested else 0)
            self.transport.send(self.outbox, nbytes, SERVER)

    def receive(self) -> None:
        """Block until rank 0's answer to the last upload is in :attr:`inbox` (then call :meth:`take`)."""
        self.transport.recv(self.inbox, SERVER, Tag.DOWNLINK)

    def take(self) -> tuple[int, int]:
        """Apply the update (or resync) in :attr:`inbox`; returns (the step it completes, its flags)."""
        frame, codec, replica = self.inbox, self.codec, self.replica
        payload, step = frame.data(), int(frame.field("step"))
        if frame.field("kind") == Kind.UPDATE:
            size, buffers = codec.payload_nbytes(step), replica.buffer_coding.nbytes
            apply_update(replica, codec, step, payload[:size], payload[size:size + buffers], payload[size + buffers:],
                         self.synced_buffers)
        else:   # RESYNC: this step closed without us; take rank 0's state and kernel, and rejoin
            state = 4 * replica.state_size
            replica.load_snapshot(payload[:state].view(replica.xp.float32))
            codec.install_kernel(payload[state:], any_version=True)
        self.synced_buffers = replica.buffers()
        return step, int(frame.field("flags"))
