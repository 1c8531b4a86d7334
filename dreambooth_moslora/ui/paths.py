"""Which paths the UI may touch: files inside a job folder, and the images of a folder the user named.

A request names a path relative to one of those roots; `../`, absolute paths and symbolic links that lead out are
refused, so no endpoint reads or serves anything else.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ..adapter.errors import UserInputError
from ..trainer.data import image_files


def inside(root, relative: str) -> Path:
    """`root/relative`, refused unless it stays inside root once every symbolic link is followed."""
    parts = PurePosixPath(relative).parts
    if not relative or PurePosixPath(relative).is_absolute() or "\\" in relative or ".." in parts or "\0" in relative:
        raise UserInputError(f"refused path {relative!r}: only paths inside the folder, without '..'")
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise UserInputError(f"refused path {relative!r}: it leads out of the folder")
    return path


def named_folder(folder: str) -> Path:
    """A folder the user typed into the form, as an absolute path; it must exist."""
    if "\0" in folder:  # else resolve() raises ValueError: a 500, not the user's error
        raise UserInputError(f"folder not found: {folder!r}")
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise UserInputError(f"folder not found: {folder}")
    return path


def folder_image(folder: str, name: str) -> Path:
    """One of the images the trainer would read from a named folder, by its bare name: nothing else is served."""
    path = inside(named_folder(folder), name)
    if path not in {p.resolve() for p in image_files(named_folder(folder))}:
        raise UserInputError(f"refused {name!r}: not an image of {folder}")
    return path
