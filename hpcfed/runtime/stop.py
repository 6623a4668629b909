"""Graceful stop: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or preemption).

The handler only raises a flag; the training loops agree on a step, write a checkpoint
there, and every rank exits with EXIT_RESUMABLE so a job script can requeue and resume.
"""

from __future__ import annotations

import signal

EXIT_RESUMABLE = 75   # EX_TEMPFAIL: "checkpointed; run again with --resume"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set when this process received SIGTERM or SIGUSR1."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
