"""Byzantine-robust reference rules: coordinate-wise median and trimmed mean.

They are what the actor-critic weighting is compared with, and the median is also
the reference direction of its per-node features.
"""

from __future__ import annotations

from typing import Any

from hpcfed.errors import HpcfedError
from hpcfed.xp import array_module


def _stack(updates: Any) -> Any:
    rows = list(updates)
    if not rows:
        raise HpcfedError("aggregation: no updates to combine; need at least 1")
    xp = array_module(rows[0])
    return xp.stack(rows) if not hasattr(updates, "ndim") else xp.asarray(updates)


def coordinate_median(updates: Any) -> Any:
    """Per-coordinate median of n updates ((n, P) array or list of 1-D arrays).

    Sorting along the node axis is about 3x faster than ``median(axis=0)`` for the few-row,
    many-column shapes here.
    """
    stacked = _stack(updates)
    n = stacked.shape[0]
    ordered = array_module(stacked).sort(stacked, axis=0)
    middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return middle.astype(stacked.dtype)


def trimmed_mean(updates: Any, trim: int) -> Any:
    """Per coordinate: drop the ``trim`` largest and ``trim`` smallest values, average the rest."""
    stacked = _stack(updates)
    n = stacked.shape[0]
    if trim < 0 or 2 * trim >= n:
        raise HpcfedError(f"aggregation: trim={trim} for {n} updates; need 0 <= trim < n/2 (={n / 2:g})")
    xp = array_module(stacked)
    return xp.sort(stacked, axis=0)[trim:n - trim].mean(axis=0).astype(stacked.dtype)
