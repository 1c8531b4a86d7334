"""One training run per output folder: a lock file naming the run that holds it.

Two runs writing checkpoints into one folder delete each other's temporary files and crash, so the second run
is refused at start. The run holds an exclusive `flock` on the file, which the kernel releases when the process
ends however it ends, so a lock file left by a killed run (or naming a PID since reused) is simply taken.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..adapter.errors import UserInputError

logger = logging.getLogger(__name__)
LOCK_FILE = ".dreambooth-moslora.lock"


def _read_holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _try_lock(lock: Path) -> int | None:
    """An open descriptor holding the file's flock, or None when another process holds it. A file unlinked by its
    releasing holder between our open and our flock is not the lock any more, so it is opened again."""
    while True:
        handle = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        try:
            if os.stat(lock).st_ino == os.fstat(handle).st_ino:
                return handle
        except FileNotFoundError:
            pass
        os.close(handle)


def _refuse(output_dir: Path, lock: Path, holder: dict):
    raise UserInputError(
        f"--output_dir {output_dir} is in use by another training run (PID {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to finish or choose "
        f"another --output_dir. If that run no longer exists, delete {lock}"
    )


@contextmanager
def output_folder_lock(output_dir, enabled: bool = True):
    """Hold the folder for this run; on exit release it, and remove the folder when this run created it empty.
    A lock file from another host is trusted even when unlocked: flock may not reach across a network filesystem."""
    if not enabled:
        yield
        return
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_FILE
    handle = _try_lock(lock)
    if handle is None:
        _refuse(output_dir, lock, _read_holder(lock))
    holder = _read_holder(lock)
    if holder.get("host", socket.gethostname()) != socket.gethostname():
        os.close(handle)
        _refuse(output_dir, lock, holder)
    if holder:
        logger.info("taking over %s from PID %s, which no longer holds it", lock, holder.get("pid"))
    os.ftruncate(handle, 0)
    os.write(handle, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(handle)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
