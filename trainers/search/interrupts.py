"""SIGINT (Ctrl-C) and SIGTERM in a search: an exception in the main thread, held back while a storage call runs.

Python runs a signal's handler in the main thread between two bytecodes, so an exception raised there can land
anywhere: inside the journal's file lock, between a trial's log line and its replay in memory, between failing a
trial and queuing it again. A storage call cut there leaves a lock behind, a process whose view of the study has
skipped a line, or a clean-up that fails on the lock and records that failure instead of the interruption. Inside
:func:`deferred_interrupts` the two signals are only noted, and raised once the call is done: every storage call
(:func:`interrupt_safe`) completes or does not start.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading

from optuna.storages import BaseStorage
# Optuna's heartbeat interface (not re-exported; checked against Optuna 5.0 and 5.1): record_heartbeat is a write.
from optuna.storages._heartbeat import BaseHeartbeat

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM as an exception; a KeyboardInterrupt, so that what stops on Ctrl-C stops on either."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt(signum, frame) -> None:
    """The handler of both signals: raise at every one, not only the first. One that lands in a weakref callback or a
    destructor is swallowed by Python ("Exception ignored in ..."), and the process must still stop at the next (the
    manager forwards one to its workers)."""
    raise Interrupted(signum)


def signal_of(err: KeyboardInterrupt) -> int:
    """The signal behind ``err``; a plain KeyboardInterrupt is Python's own Ctrl-C handler's."""
    return getattr(err, "signum", signal.SIGINT)


def describe(signum: int) -> str:
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


@contextlib.contextmanager
def handled_by(handler):
    """While entered, ``handler`` handles SIGINT and SIGTERM, in the main thread. Elsewhere nothing changes: Python
    runs handlers in the main thread only, so no other thread is ever cut short."""
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM back until the block is done, then deliver them to the handlers they had.

    The handlers are swapped for one that only notes the signal. Blocking the signals with ``pthread_sigmask``
    would not do: it blocks them in the calling thread only, the kernel then hands a signal sent to the process to
    another thread (the heartbeat's, PyTorch's), and Python still raises in the main thread at its next bytecode.
    Nested blocks deliver to the enclosing one's note, so the outermost block decides when the exception comes.
    """
    received: list[int] = []
    try:
        with handled_by(lambda signum, frame: received.append(signum)):
            yield
    finally:
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)  # the restored handler runs now: raises, ignores, or ends the process


# Every call of Optuna's storage interface: the writes, and the reads (a read replays the journal's new lines into
# memory, which an interrupt between two lines would leave with one of them skipped for good).
STORAGE_CALLS = sorted(name for base in (BaseStorage, BaseHeartbeat) for name, member in vars(base).items()
                       if callable(member) and not name.startswith("_"))


def interrupt_safe(storage_class: type) -> type:
    """Decorate a storage class so that each of its STORAGE_CALLS runs whole, under :func:`deferred_interrupts`."""
    def deferring(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            with deferred_interrupts():
                return method(self, *args, **kwargs)
        return call

    for name in STORAGE_CALLS:
        if hasattr(storage_class, name):
            setattr(storage_class, name, deferring(getattr(storage_class, name)))
    return storage_class
