"""PyTorch DDP (gloo) on the same task as hpcfed's `sync`: the peer every benchmark compares with.

Run as a module so benchmarks can spawn it: W processes on loopback, same model, data
split, batch and optimizer as hpcfed; an optional DDP comm hook (PowerSGD rank r).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from hpcfed.config import load_config
from hpcfed.coding import block_batch
from hpcfed.data.datasets import Dataset, load_dataset, train_test_split
from hpcfed.models import build_model
from hpcfed.session import cut_blocks


def _worker(rank: int, world: int, args: argparse.Namespace, port: int, queue, data: Dataset) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(args.config, args.set)
    train, test = train_test_split(data, cfg.data.test_fraction, cfg.seed)
    part = train.subset(cut_blocks(cfg, train, world)[rank])   # the block hpcfed gives worker rank + 1
    model = DistributedDataParallel(build_model(cfg.model, train.sample_shape, train.num_classes, cfg.seed))
    if args.powersgd:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd,
                                   start_powerSGD_iter=2, min_compression_rate=0.0, use_error_feedback=True,
                                   warm_start=True, random_seed=cfg.seed)
        model.register_comm_hook(state, psgd.powerSGD_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    x, y = torch.from_numpy(part.x), torch.from_numpy(part.y)
    loss_fn = torch.nn.CrossEntropyLoss()
    dist.barrier()
    start = time.monotonic()
    for step in range(1, cfg.train.steps + 1):
        batch = torch.from_numpy(block_batch(len(part), cfg.train.batch_size, cfg.seed, rank, step))
        optimizer.zero_grad()
        loss_fn(model(x[batch]), y[batch]).backward()
        optimizer.step()
    dist.barrier()
    elapsed = time.monotonic() - start
    if rank == 0:   # the bare module: DDP's forward would broadcast buffers (BatchNorm) to ranks that are done
        net = model.module.eval()
        with torch.no_grad():
            accuracy = float((net(torch.from_numpy(test.x)).argmax(1) == torch.from_numpy(test.y)).float().mean())
        queue.put({"time_per_step_s": elapsed / cfg.train.steps, "final_accuracy": accuracy,
                   "n_params": sum(p.numel() for p in model.parameters())})
    dist.destroy_process_group()


def run_ddp(workers: int, config: str | None, overrides: list[str], powersgd: int = 0, port: int = 29533,
            data: Dataset | None = None) -> dict:
    """Train with DDP on ``workers`` processes; returns time per step and final accuracy. ``data``: the
    data set the config names, if already loaded (generated once here, not once per process)."""
    args = argparse.Namespace(config=config, set=overrides, powersgd=powersgd)
    if data is None:
        cfg = load_config(config, overrides)
        data = load_dataset(cfg.data, cfg.seed)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(workers, args, port, queue, data), nprocs=workers, join=True,
                       start_method="spawn")
    return queue.get()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--powersgd", type=int, default=0)
    options = parser.parse_args()
    print(json.dumps(run_ddp(options.workers, options.config, options.set, options.powersgd)))
