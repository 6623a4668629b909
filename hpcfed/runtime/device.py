"""One array module (numpy or cupy) and the CUDA-aware MPI decision.

Pure code takes ``xp`` from :func:`array_module` or :func:`get_xp` and never
checks for CuPy itself. Whether MPI may be handed device buffers is decided once
(:func:`cuda_aware_decision`) and reported with its reason.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np


def cupy_or_none() -> ModuleType | None:
    """The cupy module if it imports and sees a GPU, else None."""
    try:
        import cupy  # type: ignore[import-not-found]

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # no CuPy, no driver, or no device
        return None
    return None


def array_module(array: Any) -> ModuleType:
    """numpy or cupy, whichever owns ``array``."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy  # type: ignore[import-not-found]

        return cupy
    return np


def get_xp(device: str) -> ModuleType:
    """The array module for a resolved device name ('cpu' or 'cuda')."""
    if device == "cuda":
        import cupy  # type: ignore[import-not-found]

        return cupy
    return np


def to_numpy(array: Any) -> np.ndarray:
    """A host copy (or the array itself when it already lives on the host)."""
    return array.get() if array_module(array) is not np else np.asarray(array)


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
        lib = ctypes.CDLL(None)
        query = lib.MPIX_Query_cuda_support
        if query() == 1:
            return CudaAwareness(True, "MPIX_Query_cuda_support() = 1")
        hint = "MPIX_Query_cuda_support() = 0"
    except (AttributeError, OSError):
        hint = "no MPIX_Query_cuda_support"
    return CudaAwareness(False, f"mpi_memory_alloc_kinds={kinds or 'unset'}, {hint}")
