"""Stopping a run when asked: SIGTERM (what Slurm and other schedulers send before they kill a job) and Ctrl-C.

The first SIGTERM or Ctrl-C only records the request; the trainer stops at the next safe point (after the optimizer
step in progress, between two evaluation batches, never inside a checkpoint write), saves a resumable state at that
step, says so in one line and exits with 128 + the signal's number. A second Ctrl-C stops at once
(KeyboardInterrupt), as impatient users expect.
"""

from __future__ import annotations

import signal
import threading


class TrainingInterrupted(Exception):
    """The run stopped on a signal after saving its state; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequested(Exception):
    """Raised inside the loop at a safe point once a stop was asked for."""


class StopSignals:
    """While entered, SIGTERM and SIGINT set :attr:`received` instead of ending the process (the main thread only:
    Python delivers signals there; elsewhere, and with ``enabled=False``, nothing changes)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.received = self.received or signum

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def guard(self, items):
        """``items``, raising StopRequested between two of them once a stop was asked for."""
        for item in items:
            if self.received:
                raise StopRequested
            yield item
