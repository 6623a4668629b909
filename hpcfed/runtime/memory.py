"""Where a rank's message frames live, and how compute arrays get in and out of them.

- ``host``: CPU ranks. Frames are NumPy arrays that compute code reads in place.
- ``staged``: GPU ranks whose MPI is not CUDA-aware. Frames are pinned host buffers, receiving
  ones with a device twin, all allocated once: a device packet is copied into the pinned frame before a
  send, and a received payload is copied into the twin before the GPU decodes it.
- ``direct``: GPU ranks with CUDA-aware MPI. Frames are device arrays, handed to the upper-case
  mpi4py calls after a stream synchronisation (the header is mirrored on the host).

On a CPU rank ``staged`` and ``direct`` run the same code with NumPy as the array module;
``direct`` then exposes its host frames to MPI only through ``__cuda_array_interface__``
(:class:`HostCudaView`), the protocol mpi4py uses for CuPy arrays, so both paths are tested
without a GPU.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from hpcfed.xp import copy_into

TRANSFERS = ("host", "staged", "direct")


class HostCudaView:
    """Host memory exposed only through ``__cuda_array_interface__`` (what MPI sees of a CuPy array)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"data": (self.array.ctypes.data, False), "shape": self.array.shape,
                "typestr": self.array.dtype.str, "strides": None, "version": 3}


class Memory:
    """One transfer path: ``host``, ``staged`` or ``direct`` (see the module docstring)."""

    def __init__(self, transfer: str, xp: ModuleType = np) -> None:
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer '{transfer}'; allowed: {', '.join(TRANSFERS)}")
        self.transfer, self.xp = transfer, xp
        self.allocations = 0   # frame buffers allocated so far (a fixed number: none per step)

    @property
    def host_frames(self) -> bool:
        """Whether frames are host memory (their header is then read in place)."""
        return self.transfer != "direct"

    def frame_buffer(self, nbytes: int) -> Any:
        """A zeroed uint8 frame buffer of ``nbytes``."""
        self.allocations += 1
        if self.transfer == "direct":
            return self.xp.zeros(nbytes, dtype=self.xp.uint8)
        if self.transfer == "staged" and self.xp is not np:
            import cupyx  # type: ignore[import-not-found]

            return cupyx.zeros_pinned(nbytes, dtype=np.uint8)
        return np.zeros(nbytes, dtype=np.uint8)

    def data_buffer(self, nbytes: int) -> Any:
        """An uninitialised uint8 buffer for start-up data: device memory when direct, else host."""
        return self.xp.empty(nbytes, dtype=self.xp.uint8) if self.transfer == "direct" else np.empty(nbytes, np.uint8)

    def twin(self, nbytes: int) -> Any:
        """Staged frames: the device buffer a received payload is copied into (else None)."""
        if self.transfer != "staged":
            return None
        self.allocations += 1
        return self.xp.empty(nbytes, dtype=self.xp.uint8)

    def to_compute(self, view: Any, twin: Any) -> Any:
        """A frame's bytes as the compute side's array: the view itself, or (staged) a copy in the twin."""
        if twin is None:
            return view
        out = twin[:view.size]
        copy_into(out, view)
        return out

    def for_mpi(self, view: Any) -> Any:
        """What an upper-case mpi4py call gets: the array, or (direct on the host) its CUDA-array view."""
        if self.transfer == "direct" and self.xp is np:
            return HostCudaView(view)
        return view

    def ready(self) -> None:
        """Before MPI touches device memory: finish the queued GPU work that writes it."""
        if self.xp is not np:   # torch is loaded only on GPU ranks (hpcfed align runs without it)
            from hpcfed.runtime.device import synchronize

            synchronize(self.xp)


HOST = Memory("host")


def choose_transfer(setting: str, on_gpu: bool, cuda_aware: bool) -> str:
    """``mpi.transfer`` resolved for one rank: auto = direct on a GPU with CUDA-aware MPI, staged on a GPU
    without it, host on the CPU. Raises ValueError when an explicit choice cannot work."""
    if setting == "auto":
        return ("direct" if cuda_aware else "staged") if on_gpu else "host"
    if setting == "host" and on_gpu:
        raise ValueError("'host' needs CPU ranks; GPU ranks use 'staged' or 'direct'")
    if setting == "direct" and on_gpu and not cuda_aware:
        raise ValueError("'direct' needs CUDA-aware MPI (set mpi.cuda_aware: true if it is)")
    return setting
