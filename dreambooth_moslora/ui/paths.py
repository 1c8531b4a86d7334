"""Which paths the UI may touch: files inside a job folder, and the images of a folder the user named.

A request names a path relative to one of those roots; `../`, absolute paths and symbolic links that lead out are
refused, so no endpoint reads, copies or serves anything else.
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


def own_images(folder: Path) -> dict[str, Path]:
    """The images `train` would read from a folder, by name, each a regular file inside it once every link is
    followed (its real path): a link out (leak.png -> /etc/passwd) is neither listed, served nor copied."""
    images = {}
    for image in image_files(folder):
        try:
            real = inside(folder, image.name)
        except UserInputError:
            continue
        if real.is_file():
            images[image.name] = real
    return images


def folder_image(folder: str, name: str) -> Path:
    """One of a named folder's own images, by its bare name: nothing else is served."""
    images = own_images(named_folder(folder))
    if name not in images:
        raise UserInputError(f"refused {name!r}: not an image of {folder}")
    return images[name]
