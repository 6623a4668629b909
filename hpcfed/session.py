"""Start-up shared by every algorithm: agreed config, data handed out by rank 0, identical models.

Sequence (all ranks): validate the config on rank 0 and agree; rank 0 builds the block
assignment (plain or coded), loads and splits the data, cuts the training set into
blocks with the configured partitioner, creates the run directory and sends every
worker its blocks; every rank builds the model from the seed and takes rank 0's initial
parameters by broadcast.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcfed.coding import Assignment, make_assignment
from hpcfed.config import CodingConfig, Config, load_config
from hpcfed.data.datasets import Dataset, Labels, carve, load_dataset, load_labels, read_rows, train_test_split
from hpcfed.data.partition import PARAMS, partition
from hpcfed.errors import HpcfedError
from hpcfed.faults import Faults
from hpcfed.models import FlatModel, build_model
from hpcfed.optim import make_optimizer
from hpcfed.io import write_atomically
from hpcfed.runtime.comm import SERVER
from hpcfed.runtime.device import (CudaAwareness, Placement, cuda_aware_decision, select_device,
                                   visible_gpus)
from hpcfed.runtime.memory import HOST, Memory, choose_transfer
from hpcfed.runtime.transport import Transport

LAUNCH_HINT = "mpiexec -n 4 python -m mpi4py -m hpcfed run [CONFIG]"


@dataclass
class Session:
    """Everything one rank needs to train: config, transport, model, optimizer, its data."""

    cfg: Config
    transport: Transport
    model: FlatModel
    optimizer: torch.optim.Optimizer
    assignment: Assignment        # which worker holds which data blocks (plain or coded)
    blocks: dict[int, Dataset]    # workers: their data blocks by block id; rank 0: empty
    test: Dataset | None          # rank 0: the test set
    run_dir: Path | None          # rank 0 only
    log: logging.Logger
    shared: Dataset | None = None  # rank 0, fedavg with server adjustment: the globally shared set
    validation: Dataset | None = None  # rank 0, actor-critic weighting: the reward's validation set
    block_sizes: list[int] = field(default_factory=list)  # rank 0: samples per block
    checkpoint: Path | None = None  # the checkpoint this run resumes from (known on every rank)
    faults: Faults | None = None    # fault injection on this rank (faults.*)
    started: float = field(default_factory=time.monotonic)
    bytes_data: int = 0           # start-up data hand-out, counted on rank 0
    placement: Placement = Placement("cpu", "default")   # this rank's device
    memory: Memory = field(default_factory=lambda: Memory("host"))   # where its frames live
    cuda_aware: CudaAwareness = CudaAwareness(False, "not decided")  # agreed by every rank
    waiting: str = "busy (default)"   # how this rank waits for frames (mpi.wait), with the reason

    @property
    def device(self) -> torch.device:
        return self.placement.torch_device

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A host array as a tensor on this rank's device."""
        return torch.from_numpy(array).to(self.device)

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def n_workers(self) -> int:
        return self.transport.size - 1

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER


def start_session(config_path: str | None, overrides: list[str], transport: Transport,
                  resume: str | None = None) -> Session:
    """Run the start-up sequence on every rank; bad input ends all ranks with one line.

    With ``resume`` (a run folder or checkpoint file) the config defaults to the run's own
    ``config.yaml``, the output goes to that run folder, and the checkpoint must be compatible.
    """
    log = logging.getLogger("hpcfed")
    if transport.size < 2:
        raise HpcfedError(f"hpcfed run needs at least 2 MPI ranks (rank 0 is the server, ranks 1.. are "
                          f"workers); launch it as: {LAUNCH_HINT}", everywhere=True)

    def configure() -> tuple[Config, Path | None]:
        if resume is None:
            return load_config(config_path, overrides), None
        from hpcfed import resume as resuming
        from hpcfed.io.checkpoint import read_checkpoint

        run_dir, checkpoint, warnings = resuming.locate(resume)
        for warning in warnings:
            log.warning("warning: %s", warning)
        cfg = load_config(config_path or str(run_dir / "config.yaml"), [*overrides, f"output.dir={run_dir}"])
        _, attrs = read_checkpoint(checkpoint)
        resuming.check_compatible(str(attrs["config"]), cfg, transport.size, int(attrs["world_size"]))
        log.info("resuming %s from %s", run_dir, checkpoint.name)
        return cfg, checkpoint

    cfg, checkpoint = transport.bcast(transport.agree(configure))
    limit_threads(cfg.train.threads)
    placement, memory, cuda_aware = place_rank(cfg, transport)
    placement.activate()   # before anything lands on the GPU (direct transfers receive data into device memory)
    waiting = transport.wait_mode(cfg.mpi.wait)
    n_workers = transport.size - 1

    by_index = cfg.data.read == "index"

    def prepare() -> tuple[Dataset, Dataset | None, list[Dataset | Labels], Assignment, Path]:
        full = load_labels(cfg.data, cfg.seed) if by_index else load_dataset(cfg.data, cfg.seed)
        train, test = train_test_split(full, cfg.data.test_fraction, cfg.seed)
        validation, train = carve_validation(cfg, train)
        assignment, blocks, shared = data_layout(cfg, train, n_workers)
        if by_index:   # rank 0 reads only the rows it evaluates or trains on itself
            test, validation, shared = (None if part is None else
                                        read_dataset(cfg.data.path, part.ids, part.y, part.num_classes)
                                        for part in (test, validation, shared))
        build_model(cfg.model, test.sample_shape, test.num_classes, cfg.seed)   # a bad model writes nothing
        run_dir = make_run_dir(cfg, config_path, resuming=checkpoint is not None)
        write_splits(run_dir / "splits.h5", test, shared, blocks, assignment)
        return test, shared, validation, blocks, assignment, run_dir

    prepared = transport.agree(prepare)
    if prepared is not None:
        test, shared_set, validation, blocks, assignment, run_dir = prepared
        log.info("run directory %s; %d training samples in %d blocks over %d workers (%s), %d test samples%s",
                 run_dir, sum(len(b) for b in blocks), len(blocks), n_workers, describe(cfg, assignment), len(test),
                 f", {len(shared_set)} shared samples at rank 0" if shared_set else "")
        print(cfg.to_yaml(), flush=True)
        common = (test.sample_shape, test.num_classes, assignment)
    else:
        test, shared_set, validation, blocks, run_dir, common = None, None, None, [], None, None
    sample_shape, num_classes, assignment = transport.bcast(common)

    bytes_data, mine = 0, {}
    faults = Faults(cfg.faults, cfg.seed, transport.rank)
    sent = ("ids", "y") if by_index else ("x", "y")   # index mode: row ids travel, each worker reads its rows
    problem = None
    if transport.rank == SERVER:
        for worker in range(1, n_workers + 1):
            held = {f"{b}/{name}": getattr(blocks[b], name) for b in assignment.blocks_of(worker - 1) for name in sent}
            bytes_data += transport.send_arrays(held, worker)
    else:
        arrays = transport.recv_arrays(SERVER, HOST if by_index else memory)
        try:
            mine = {b: faults.labels(worker_block(cfg, arrays, b, num_classes))
                    for b in assignment.blocks_of(transport.rank - 1)}
        except HpcfedError as err:
            problem = f"rank {transport.rank} on {socket.gethostname()}: {err}"
    transport.agree_everywhere(problem)

    module, problem = None, None
    try:   # every rank builds the model (an import path must resolve on every node)
        module = build_model(cfg.model, sample_shape, num_classes, cfg.seed)
    except HpcfedError as err:
        problem = str(err) if transport.rank == SERVER else f"{err} (on rank {transport.rank}, {socket.gethostname()})"
    transport.agree_everywhere(problem)
    model = FlatModel(module.to(placement.torch_device))
    initial = model.params.cpu().numpy()
    transport.bcast_array(initial)
    model.params.copy_(torch.from_numpy(initial))
    return Session(cfg, transport, model, make_optimizer(cfg.train, model), assignment, mine, test, run_dir, log,
                   shared=shared_set, validation=validation, block_sizes=[len(b) for b in blocks],
                   bytes_data=bytes_data, checkpoint=checkpoint, faults=faults, placement=placement,
                   memory=memory, cuda_aware=cuda_aware, waiting=waiting)


def read_dataset(path: str, ids: np.ndarray, y: np.ndarray, num_classes: int) -> Dataset:
    """Rows ``ids`` (labels ``y``) of the HDF5 file at ``path`` as a data set (index mode)."""
    return Dataset(read_rows(path, ids), y, num_classes, ids)


def worker_block(cfg: Config, arrays: dict, block: int, num_classes: int) -> Dataset:
    """One data block a worker received: its samples, or (index mode) its rows read from ``data.path``."""
    if cfg.data.read == "index":
        return read_dataset(cfg.data.path, arrays[f"{block}/ids"], arrays[f"{block}/y"], num_classes)
    return Dataset(arrays[f"{block}/x"], arrays[f"{block}/y"], num_classes)


def limit_threads(threads: int) -> None:
    """Bound this rank's torch, BLAS and OpenMP thread pools (ranks sharing a node must not oversubscribe it)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def place_rank(cfg: Config, transport: Transport) -> tuple[Placement, Memory, CudaAwareness]:
    """Collective: this rank's device, the agreed CUDA-aware decision, and the transfer path.

    Any rank that cannot honour ``device: cuda`` or ``mpi.transfer`` ends every rank with one line.
    """
    rank = transport.rank
    key = "server_device" if rank == SERVER and cfg.server_device != "auto" else "device"
    setting = getattr(cfg, key)
    local_rank, source = transport.node_local_rank()
    problem, placement = None, Placement("cpu", "fedavg trains on the CPU")
    if cfg.algorithm == "fedavg" and setting == "cuda":
        problem = "device: cuda is supported by algorithm sync; fedavg trains on the CPU (use device: cpu or auto)"
    elif cfg.algorithm == "sync":
        try:
            placement = select_device(setting, local_rank, source, *visible_gpus() if setting != "cpu" else (0, False))
        except ValueError as err:
            problem = f"{key}: cuda on rank {rank}: {err}"
    decision = cuda_aware_decision(cfg.mpi.cuda_aware)
    agreed = transport.allreduce_min(int(decision.cuda_aware)) == 1
    cuda_aware = CudaAwareness(agreed, decision.reason if agreed == decision.cuda_aware
                               else f"not on every rank (here: {decision.reason})")
    on_gpu = placement.device != "cpu"
    try:
        transfer = choose_transfer(cfg.mpi.transfer, on_gpu, agreed)
    except ValueError as err:
        problem = problem or f"mpi.transfer: {cfg.mpi.transfer} on rank {rank}: {err}"
    transport.agree_everywhere(problem)
    return placement, Memory(transfer, placement.xp), cuda_aware


def data_layout(cfg: Config, train: Dataset, n_workers: int) -> tuple[Assignment, list[Dataset], Dataset | None]:
    """Cut the training set into data blocks and say who holds which.

    ``sync``: blocks by the coding assignment (one per worker, or coded copies).
    ``fedavg``: blocks are clients, spread round-robin over the worker ranks; with server
    adjustment, a shared set is carved off first and stays on rank 0 only.
    """
    shared = None
    node_rule = cfg.aggregation.weighting in ("actor_critic", "fltrust", "median", "trimmed_mean")
    if node_rule and cfg.algorithm == "sync" and cfg.coding.enabled and cfg.coding.mode == "coded":
        raise HpcfedError(f"aggregation.weighting={cfg.aggregation.weighting} weighs whole workers; coded blocks "
                          "have several holders: use coding.mode wait-all or drop-stragglers")
    if cfg.algorithm == "fedavg":
        if cfg.federated.server_adjust.enabled:
            shared, train = carve(train, cfg.federated.server_adjust.shared_fraction, cfg.seed, "shared-set")
        clients = cfg.federated.clients
        assignment = Assignment(n_workers, n_workers, "clients", tuple((c % n_workers,) for c in range(clients)))
    else:
        assignment = coding_assignment(cfg.coding, n_workers)
    if len(train) < assignment.n_blocks:
        raise HpcfedError(f"data: {len(train)} training samples cannot be cut into {assignment.n_blocks} "
                          f"blocks for {n_workers} workers")
    return assignment, [train.subset(i) for i in cut_blocks(cfg, train, assignment.n_blocks)], shared


def carve_validation(cfg: Config, train: Dataset) -> tuple[Dataset | None, Dataset]:
    """Actor-critic and FLTrust: (rank 0's validation set for the reward and its reference gradient;
    the rest of the training data)."""
    if cfg.aggregation.weighting not in ("actor_critic", "fltrust"):
        return None, train
    size = cfg.aggregation.validation_size
    if size >= len(train):
        raise HpcfedError(f"aggregation.validation_size={size}: the training set has only {len(train)} samples")
    return carve(train, size / len(train), cfg.seed, "validation")


def write_splits(path: Path, test: Dataset, shared: Dataset | None, blocks: list[Dataset],
                 assignment: Assignment) -> None:
    """Which source rows went where (test, shared, each block) and who holds each block, for audits."""
    import h5py

    with h5py.File(path, "w") as file:
        file["test"] = test.ids
        if shared is not None:
            file["shared"] = shared.ids
        for b, block in enumerate(blocks):
            file[f"blocks/{b}"] = block.ids
            file[f"blocks/{b}"].attrs["holders"] = np.asarray(assignment.holders_of(b)) + 1  # ranks


def cut_blocks(cfg: Config, train: Dataset, n_blocks: int) -> list[np.ndarray]:
    """Sample indices of each data block, by the configured partitioner (iid, dirichlet, ...)."""
    params = {"alpha": cfg.data.alpha, "classes_per_part": cfg.data.classes_per_part}
    return partition(cfg.data.partition, train.y, n_blocks, cfg.seed,
                     **{k: v for k, v in params.items() if k in PARAMS[cfg.data.partition]})


def coding_assignment(cfg: CodingConfig, n_workers: int) -> Assignment:
    """The block assignment: coded (any k workers hold a full set), or one block per worker."""
    if not cfg.enabled or cfg.mode != "coded":
        return make_assignment(n_workers, n_workers, cfg.scheme)
    target = cfg.target if cfg.target is not None else max(1, n_workers - 1)
    return make_assignment(n_workers, target, cfg.scheme)


def describe(cfg: Config, assignment: Assignment) -> str:
    if not cfg.coding.enabled:
        return "wait for all workers"
    if cfg.coding.mode == "coded":
        return (f"coded {assignment.scheme}: any {assignment.target} of {assignment.n_workers} workers complete a "
                f"step; each worker computes {len(assignment.blocks_of(0))} block gradients")
    return f"uncoded, {cfg.coding.mode}"


def make_run_dir(cfg: Config, config_path: str | None, resuming: bool = False) -> Path:
    """``output.dir``, or ``runs/<config name>-<timestamp>``; refuses a folder holding a finished run
    unless the run resumes there."""
    if cfg.output.dir:
        run_dir = Path(cfg.output.dir)
    else:
        name = Path(config_path).stem if config_path else "quickstart"
        run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "summary.json").exists() and not resuming:
        raise HpcfedError(f"output.dir: '{run_dir}' already holds a finished run; choose a new directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())
    except OSError as err:
        raise HpcfedError(f"output.dir: cannot write to '{run_dir}' ({err.strerror})") from None
    return run_dir


def write_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (see :func:`hpcfed.io.write_atomically`)."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def parameter_hash(model: FlatModel) -> str:
    """SHA-256 of the flat parameters and buffers: equal hashes mean bit-identical replicas."""
    return model.digest()


def finish(session: Session, summary: dict) -> dict | None:
    """Gather bytes and parameter hashes from every rank; rank 0 writes summary.json and returns it."""
    hashes = session.transport.gather(parameter_hash(session.model))
    sent = session.transport.gather(session.transport.bytes_sent)
    peak_rss = session.transport.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # Linux: KiB
    if not session.is_server:
        return None
    steps = summary["steps"]
    summary.update(
        bytes_up=int(sum(sent[1:])),
        bytes_down=int(sent[0]),
        bytes_up_per_worker_step=sum(sent[1:]) / max(1, session.n_workers * steps),
        bytes_data=session.bytes_data,
        wall_time_s=time.monotonic() - session.started,
        world_size=session.transport.size,
        param_hashes=hashes,
        replicas_identical=len(set(hashes)) == 1,
        peak_rss_mb=peak_rss,
        config_digest=session.cfg.digest(),
    )
    write_atomic(session.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
