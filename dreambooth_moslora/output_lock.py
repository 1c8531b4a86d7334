"""One training run per output folder: a lock file naming the run that holds it.

Two runs writing checkpoints into one folder delete each other's temporary files and crash, so the second run
is refused at start. A lock left by a process that no longer exists (killed, machine crashed) is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserInputError

logger = logging.getLogger(__name__)
LOCK_FILE = ".dreambooth-moslora.lock"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _is_stale(holder: dict) -> bool:
    """Only a lock of this machine can be judged; one from another host is trusted."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _process_exists(pid)


def _try_create(lock: Path) -> bool:
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as file:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, file)
    return True


@contextmanager
def output_folder_lock(output_dir, enabled: bool = True):
    """Hold the folder for this run; on exit release it, and remove the folder when this run created it empty."""
    if not enabled:
        yield
        return
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_FILE
    if not _try_create(lock):
        holder = _read_holder(lock)
        if not _is_stale(holder):
            raise UserInputError(
                f"--output_dir {output_dir} is in use by another training run (PID {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to finish or choose "
                f"another --output_dir. If that run no longer exists, delete {lock}"
            )
        logger.info("taking over %s from PID %s, which no longer runs", lock, holder.get("pid"))
        lock.unlink(missing_ok=True)
        if not _try_create(lock):
            raise UserInputError(f"--output_dir {output_dir} was taken by another run just now")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
