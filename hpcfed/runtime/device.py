"""The rank's device, torch <-> array-module hand-over, and the CUDA-aware MPI decision.

The array-module helpers themselves live in the leaf module :mod:`hpcfed.xp`. Each rank picks its device once (:func:`select_device`: one GPU
per rank from its node-local rank); tensors and arrays cross between torch and the array
module without copies (DLPack). Whether MPI may be handed device buffers is decided once
(:func:`cuda_aware_decision`), agreed by every rank, and reported with its reason.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from hpcfed.xp import array_module, copy_into, cupy_or_none, get_xp, to_numpy  # noqa: F401 (re-exported)


def as_array(tensor: torch.Tensor, xp: ModuleType) -> Any:
    """The same memory as an ``xp`` array (no copy): NumPy for CPU tensors, CuPy via DLPack."""
    return tensor.numpy() if xp is np else xp.from_dlpack(tensor)


def as_tensor(array: Any) -> torch.Tensor:
    """The same memory as a torch tensor (no copy): from NumPy, or from CuPy via DLPack."""
    return torch.from_numpy(array) if array_module(array) is np else torch.from_dlpack(array)


def synchronize(xp: ModuleType) -> None:
    """Wait for torch's and CuPy's current CUDA streams, so device buffers are complete before MPI reads them."""
    if xp is not np:
        torch.cuda.current_stream().synchronize()
        xp.cuda.get_current_stream().synchronize()


@dataclass(frozen=True)
class Placement:
    """Where one rank computes: 'cpu' or 'cuda:<index>', and why."""

    device: str
    reason: str

    @property
    def xp(self) -> ModuleType:
        return get_xp(self.device.split(":")[0])

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def activate(self) -> None:
        """Make this rank's GPU the current one for torch and CuPy (nothing to do on the CPU)."""
        if self.device != "cpu":
            index = int(self.device.split(":")[1])
            torch.cuda.set_device(index)
            self.xp.cuda.Device(index).use()


def node_local_rank(comm: Any) -> tuple[int, str]:
    """This rank's index on its node: ``SLURM_LOCALID`` under srun, else a shared-memory split (collective)."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank = local.Get_rank()
    local.Free()
    if os.environ.get("SLURM_LOCALID", "").isdigit():
        return int(os.environ["SLURM_LOCALID"]), "SLURM_LOCALID"
    return rank, "node-local rank"


def select_device(setting: str, local_rank: int, source: str, gpus: int, has_cupy: bool) -> Placement:
    """Resolve ``auto | cpu | cuda`` for one rank: GPU ``local_rank % gpus`` (one GPU per rank on a
    node with as many GPUs as ranks); raises ValueError with the reason when ``cuda`` cannot be met."""
    if setting == "cpu":
        return Placement("cpu", "set to cpu")
    if gpus == 0 or not has_cupy:
        missing = "torch sees no CUDA GPU" if gpus == 0 else "cupy is not installed (pip install 'hpcfed[gpu]')"
        if setting == "cuda":
            raise ValueError(missing)
        return Placement("cpu", f"auto: {missing}")
    index = local_rank % gpus
    return Placement(f"cuda:{index}", f"{source} {local_rank} of a node with {gpus} GPU(s)")


def visible_gpus() -> tuple[int, bool]:
    """(CUDA devices torch sees, whether CuPy imports and sees one too)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count, count > 0 and cupy_or_none() is not None


@dataclass(frozen=True)
class CudaAwareness:
    """Whether MPI accepts device buffers, and why we think so."""

    cuda_aware: bool
    reason: str


def cuda_aware_decision(override: str | None = None) -> CudaAwareness:
    """Decide (on this rank) whether the MPI library is CUDA-aware.

    Order: explicit override (argument, then ``HPCFED_CUDA_AWARE``), then the MPI
    info key ``mpi_memory_alloc_kinds`` containing ``cuda``, then
    ``MPIX_Query_cuda_support`` through ctypes (a hint), else not CUDA-aware.
    Callers agree across ranks with an allreduce (see runtime.comm).
    """
    from mpi4py import MPI

    for source, value in (("config", override), ("HPCFED_CUDA_AWARE", os.environ.get("HPCFED_CUDA_AWARE"))):
        if value not in (None, "", "auto"):
            flag = str(value).lower() in ("1", "true", "yes", "on")
            return CudaAwareness(flag, f"set by {source}={value}")
    try:
        kinds = MPI.COMM_WORLD.Get_info().Get("mpi_memory_alloc_kinds")
    except Exception:
        kinds = None
    if kinds and "cuda" in kinds:
        return CudaAwareness(True, f"mpi_memory_alloc_kinds={kinds}")
    try:
        lib = ctypes.CDLL(MPI.__file__)   # dlsym searches the MPI library mpi4py is linked against
        query = lib.MPIX_Query_cuda_support
        if query() == 1:
            return CudaAwareness(True, "MPIX_Query_cuda_support() = 1 (a hint: no info key said so)")
        hint = "MPIX_Query_cuda_support() = 0"
    except (AttributeError, OSError):
        hint = "no MPIX_Query_cuda_support"
    return CudaAwareness(False, f"mpi_memory_alloc_kinds={kinds or 'unset'}, {hint}")
