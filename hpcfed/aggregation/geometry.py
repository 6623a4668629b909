"""Inner products of node updates with a reference vector: what FLTrust and the actor-critic read.

Norms and cosines are all these rules use, so they work unchanged in the codec's coefficient
domain (an orthonormal transform restricted to a shared support keeps inner products). The cost
is 2W + 1 dot products, O(W d), on the updates' array module (numpy or cupy); only W-length
results travel to the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.xp import array_module, to_numpy


def as_rows(updates: Any) -> list[Any]:
    """The updates as a list of equal-length 1-D arrays ((n, P) array or a sequence of rows)."""
    rows = list(updates)
    if not rows:
        raise HpcfedError("aggregation: no updates to combine; need at least 1")
    size = rows[0].shape
    if any(row.ndim != 1 or row.shape != size for row in rows):
        raise HpcfedError(f"aggregation: updates must be 1-D of equal length (got shapes {[r.shape for r in rows]})")
    return rows


def inner_products(updates: Any, reference: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """(||u_i||^2, u_i . r, ||r||^2) as float64 host values, always finite.

    Computed in the updates' dtype; should that overflow (or an input hold NaN/inf), everything
    is recomputed in float64 on rescaled copies with non-finite entries counted as 0.
    """
    rows = as_rows(updates)
    if reference.shape != rows[0].shape:
        raise HpcfedError(f"aggregation: reference of shape {reference.shape}; need {rows[0].shape}, "
                          "the shape of the updates")
    xp = array_module(rows[0])
    with np.errstate(over="ignore", invalid="ignore"):   # overflow is caught below
        if xp is np:
            sq = np.array([np.dot(u, u) for u in rows], dtype=np.float64)
            dots = np.array([np.dot(u, reference) for u in rows], dtype=np.float64)
            ref_sq = float(np.dot(reference, reference))
        else:   # one stack and two reductions on the device, one small transfer
            stacked = xp.stack(rows)
            both = xp.stack([xp.einsum("ij,ij->i", stacked, stacked), stacked @ reference])
            sq, dots = to_numpy(both).astype(np.float64)
            ref_sq = float(reference @ reference)
    if np.isfinite(sq).all() and np.isfinite(dots).all() and np.isfinite(ref_sq):
        return sq, dots, ref_sq
    return _safe_inner_products(rows, reference)


def _safe_inner_products(rows: list[Any], reference: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """The slow path of :func:`inner_products`: float64 on the host, each vector scaled by its max."""

    def scaled(vector: Any) -> tuple[np.ndarray, float]:
        v = np.nan_to_num(to_numpy(vector).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(np.abs(v).max(initial=0.0))
        return (v / top if top > 0 else v), top

    ref, ref_top = scaled(reference)
    sq, dots = np.zeros(len(rows)), np.zeros(len(rows))
    for i, row in enumerate(rows):
        u, top = scaled(row)
        sq[i] = top * top * float(u @ u)
        dots[i] = top * ref_top * float(u @ ref)
    return sq, dots, ref_top * ref_top * float(ref @ ref)


def cosines(sq: np.ndarray, dots: np.ndarray, ref_sq: float) -> np.ndarray:
    """cos(u_i, r) from :func:`inner_products` (0 where either vector is zero), in [-1, 1]."""
    denom = np.sqrt(sq) * np.sqrt(ref_sq)
    cos = np.divide(dots, denom, out=np.zeros_like(sq), where=denom > 0)
    return np.clip(cos, -1.0, 1.0)
