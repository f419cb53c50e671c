"""One run per output folder: a lock that main.py holds while it trains or evaluates into ``output_dir``.

The lock is an ``flock`` on ``output_dir/.run.lock``: the kernel releases it when the process ends, however it ends,
so a run killed with -9 never blocks the next one, and a second run started on the same folder is refused in one line
that names the holder (its pid, machine and start time, written into the file). Under data parallelism the launch's
main process holds it. While the lock is held nothing else writes into the folder, so what an interrupted save left
there can be removed safely (trainers/checkpoint.py: ``remove_stale``).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

LOCK_FILE = ".run.lock"


class FolderInUseError(RuntimeError):
    pass


def hold_output_dir(folder: Path) -> IO:
    """Create ``folder`` if needed and lock it for this process; the returned file holds the lock until it is closed
    or the process ends. Raises FolderInUseError when another live process holds it. Nothing in the folder changes
    until :func:`sign` (a run refused by a later check leaves it as it was)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUseError(f"{folder} is in use by {holder}: wait for that run to end, or set "
                               "manager_settings.output_dir to another folder") from None
    return handle


def sign(handle: IO) -> None:
    """Write who holds the lock into its file, for the message a second run gets."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(f"the run of process {os.getpid()} on {socket.gethostname()}, started {started}\n")
    handle.flush()
