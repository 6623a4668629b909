"""One array module, numpy or cupy: the leaf helpers that pure code (codec, aggregation) uses.

Imports neither torch nor MPI, so ``hpcfed.codec`` and ``hpcfed.aggregation`` load without them.
Pure code takes ``xp`` from :func:`array_module` or :func:`get_xp` and never checks for CuPy itself.
"""

from __future__ import annotations

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

def copy_into(dst: Any, src: Any) -> None:
    """``dst[...] = src`` across host and device memory (same size, contiguous)."""
    dst_host, src_host = array_module(dst) is np, array_module(src) is np
    if dst_host and not src_host:
        src.get(out=dst)
    elif src_host and not dst_host:
        dst.set(src)
    else:
        dst[...] = src
