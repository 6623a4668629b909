"""Log lines that carry the rank, and a progress display for rank 0."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


def setup_logging(rank: int, level: int = logging.INFO) -> logging.Logger:
    """The 'hpcfed' logger writing '[rank R] message' lines to stderr."""
    logger = logging.getLogger("hpcfed")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


class Progress:
    """A tqdm bar on a terminal; plain log lines at each report otherwise (batch jobs, CI)."""

    def __init__(self, total: int, initial: int = 0, unit: str = "step") -> None:
        self.log = logging.getLogger("hpcfed")
        self.total = total
        self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True) if sys.stderr.isatty() else None

    def advance(self, **metrics: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    def report(self, step: int, **metrics: float) -> None:
        """A milestone (evaluation): shown in the bar, or logged as one line."""
        text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(f"step {step}/{self.total} {text}")
        else:
            self.log.info("step %d/%d %s", step, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
