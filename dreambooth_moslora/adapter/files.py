"""Writing files and folders so that a crash or Ctrl-C never leaves a half-written one: write beside, then rename.

Files get the mode `open()` would give them (0666 minus the umask), so a ComfyUI/A1111 server or a colleague
running as another user can read them; `mkstemp` alone would leave them 0600.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserInputError


def _default_file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path, write: Callable[[str], None]) -> Path:
    """Call write(temporary path) in the target's folder, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(path, fill: Callable[[Path], None]) -> Path:
    """Call fill(staging folder) beside the target, then swap it in: a failure while filling leaves the old folder
    as it was. The old one is moved aside, not deleted, until the new one is in place (no rename replaces a
    non-empty folder), and put back if the swap is interrupted."""
    path = Path(path)
    staging, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    if old.exists() and not path.exists():  # a crash between the two renames of an earlier swap
        old.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fill(staging)
        if path.exists():
            path.rename(old)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_pretrained_readable(model, path) -> Path:
    """`model.save_pretrained(path)` with every file written given the mode `open()` would give: diffusers writes
    its weight files through a temporary file and leaves them 0600."""
    path = Path(path)
    model.save_pretrained(path)
    mode = _default_file_mode()
    for file in path.rglob("*"):
        if file.is_file():
            os.chmod(file, mode)
    return path


def write_text_atomically(path, text: str) -> Path:
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_png_atomically(image, path) -> Path:
    return write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def check_writable_folder(path, option: str) -> Path:
    """Refuse, before any model is loaded, a folder that is a file, cannot be created or cannot be written.

    Creates nothing: a folder that does not exist yet is judged by its nearest existing parent.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise UserInputError(f"{option} {path}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == path else f"cannot be created: {existing} is a file"
        raise UserInputError(f"{option} {path} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} {path} is not writable (no write permission on {existing})")
    try:  # a read-only file system passes os.access for root; only a real write tells
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserInputError(f"{option} {path} is not writable ({error.strerror or error})") from None
    return path


def check_writable_file(path, option: str) -> Path:
    """A file we are about to write: not a folder, in a folder that can be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserInputError(f"{option} {path} is a folder; give a file name")
    check_writable_folder(path.parent, option)
    return path
