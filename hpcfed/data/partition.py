"""Partitioners: split sample indices over workers or clients, deterministically by seed.

Every partitioner returns one sorted index array per part; together they hold every sample
exactly once. :func:`partition` dispatches by scheme name (the config's ``data.partition``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from hpcfed.errors import HpcfedError

DIRICHLET_RETRIES = 10


def _check_parts(n_samples: int, n_parts: int, min_size: int = 1) -> None:
    if n_parts < 1:
        raise HpcfedError(f"partition: n_parts={n_parts}; need at least 1")
    if min_size < 1:
        raise HpcfedError(f"partition: min_size={min_size}; need at least 1")
    if n_samples < n_parts * min_size:
        raise HpcfedError(
            f"partition: {n_samples} samples cannot fill {n_parts} parts of at least {min_size} "
            f"(need {n_parts * min_size})"
        )


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise HpcfedError(f"partition: alpha={alpha}; need alpha > 0 (small = skewed, large = near iid)")


def iid(n_samples: int, n_parts: int, seed: int) -> list[np.ndarray]:
    """Shuffle all indices once and deal them into ``n_parts`` near-equal parts."""
    _check_parts(n_samples, n_parts)
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part) for part in np.array_split(order, n_parts)]


def _dirichlet_draw(labels: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """One label-skew draw: every class split over the parts by Dirichlet(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(n_parts, alpha))) * len(idx)).astype(int)[:-1]
        for part, piece in zip(parts, np.split(idx, cuts)):
            part.extend(piece.tolist())
    return parts


def _repair(parts: list[list[int]], min_size: int) -> None:
    """Move samples from the largest part into parts below ``min_size`` (deterministic, terminates).

    Feasible because the caller checked n_samples >= n_parts * min_size: while some part is short,
    the largest holds more than ``min_size``. Each move fills a short part or brings a donor down to
    ``min_size``, so it ends within 2 * n_parts moves.
    """
    while True:
        sizes = [len(p) for p in parts]
        small = int(np.argmin(sizes))
        need = min_size - sizes[small]
        if need <= 0:
            return
        large = int(np.argmax(sizes))
        take = min(need, sizes[large] - min_size)
        parts[small].extend(parts[large][-take:])
        del parts[large][-take:]


def dirichlet(labels: np.ndarray, n_parts: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Label skew: each class is split over parts by Dirichlet(alpha) proportions.

    Parts smaller than ``min_size`` trigger a fresh draw, at most DIRICHLET_RETRIES times; after
    that (likely at tiny alpha) samples move from the largest parts into the short ones.
    """
    labels = np.asarray(labels)
    _check_parts(len(labels), n_parts, min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_RETRIES):
        parts = _dirichlet_draw(labels, n_parts, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _repair(parts, min_size)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def shards(labels: np.ndarray, n_parts: int, classes_per_part: int, seed: int) -> list[np.ndarray]:
    """Pathological non-iid: every part holds exactly ``classes_per_part`` classes.

    Parts pick the least-used classes so far (ties broken at random), so every class is used and
    class usage differs by at most one; each class's samples are then dealt evenly over its parts.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    _check_parts(len(labels), n_parts)
    if not 1 <= classes_per_part <= len(classes):
        raise HpcfedError(f"partition: classes_per_part={classes_per_part}; allowed 1..{len(classes)} (the classes)")
    if n_parts * classes_per_part < len(classes):
        raise HpcfedError(
            f"partition: shards with {n_parts} parts x {classes_per_part} classes cannot place all "
            f"{len(classes)} classes; raise classes_per_part to {-(-len(classes) // n_parts)}"
        )
    rng = np.random.default_rng(seed)
    usage = np.zeros(len(classes), dtype=np.int64)
    members: list[list[int]] = [[] for _ in classes]
    for part in range(n_parts):
        picked = np.lexsort((rng.permutation(len(classes)), usage))[:classes_per_part]
        usage[picked] += 1
        for c in picked:
            members[c].append(part)
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for c, holders in enumerate(members):
        idx = rng.permutation(np.flatnonzero(labels == classes[c]))
        for part, piece in zip(holders, np.array_split(idx, len(holders))):
            parts[part].extend(piece.tolist())
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        raise HpcfedError(f"partition: shards left parts {empty} empty; classes too small for {n_parts} parts")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def quantity_skew(n_samples: int, n_parts: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Quantity skew: part sizes are min_size + Dirichlet(alpha) shares of the rest; labels stay iid."""
    _check_parts(n_samples, n_parts, min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    spare = n_samples - n_parts * min_size
    shares = rng.dirichlet(np.full(n_parts, alpha)) * spare
    sizes = np.floor(shares).astype(np.int64)
    rest = spare - int(sizes.sum())
    sizes[np.argsort(-(shares - sizes), kind="stable")[:rest]] += 1
    sizes += min_size
    order = rng.permutation(n_samples)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_size"),
    "shards": ("classes_per_part",),
    "quantity": ("alpha", "min_size"),
}

_SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": lambda labels, n, seed: iid(len(labels), n, seed),
    "dirichlet": lambda labels, n, seed, alpha=0.5, min_size=1: dirichlet(labels, n, alpha, seed, min_size),
    "shards": lambda labels, n, seed, classes_per_part=2: shards(labels, n, classes_per_part, seed),
    "quantity": lambda labels, n, seed, alpha=1.0, min_size=1: quantity_skew(len(labels), n, alpha, seed, min_size),
}


def partition(scheme: str, labels: np.ndarray, n_parts: int, seed: int, **params: Any) -> list[np.ndarray]:
    """Split ``labels``' sample indices into ``n_parts`` with ``scheme`` (parameters per PARAMS).

    Defaults: dirichlet alpha=0.5, quantity alpha=1.0, min_size=1, shards classes_per_part=2.
    """
    if scheme not in _SCHEMES:
        raise HpcfedError(f"data.partition={scheme!r}: allowed {', '.join(_SCHEMES)}")
    unknown = sorted(set(params) - set(PARAMS[scheme]))
    if unknown:
        allowed = ", ".join(PARAMS[scheme]) or "none"
        raise HpcfedError(f"data.partition={scheme}: unknown parameter {unknown[0]!r} (allowed: {allowed})")
    return _SCHEMES[scheme](np.asarray(labels), n_parts, seed, **params)
