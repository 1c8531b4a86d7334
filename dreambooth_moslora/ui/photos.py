"""A job's photos: the images of a named folder or the uploaded files, decoded as the trainer decodes them, written
into the job's photos/ with their captions.

The trainer skips an image it cannot decode (with a warning naming it); the job keeps only the photos it can read,
so a job never fails later on one (measured validation reads every photo of its folder), and the form says which
were left out, at the photos field.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

from PIL import UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..adapter.errors import UserInputError
from ..adapter.files import write_atomically, write_text_atomically
from ..trainer.data import IMAGE_EXTENSIONS, load_rgb
from .paths import inside, named_folder, own_images

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_CAPTION_CHARS = 2**16
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class FormErrors(UserInputError):
    """Errors by field, shown beside each field."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


def unreadable(source, name: str) -> str | None:
    """Why the trainer could not read this image (a path or a file object), or None: its own full decode, so a
    truncated file fails here too. Named by `name`, never by the object that held it."""
    try:
        load_rgb(source)
    except UnidentifiedImageError:
        return f"{name} is not a readable image (not a format PIL recognizes)"
    except (OSError, SyntaxError, ValueError) as error:
        return f"{name} is not a readable image ({error})"
    return None


def caption_of(folder: Path, name: str) -> str:
    """Its caption file, when one lies in its own folder: a link out (a.txt -> ~/.ssh/id_rsa, made by anyone who can
    reach this port) is not read, and a caption's first 64 KiB are plenty."""
    try:
        text = inside(folder, Path(name).with_suffix(".txt").name)
    except UserInputError:
        return ""
    if not text.is_file():
        return ""
    with open(text, encoding="utf-8", errors="replace") as file:
        return file.read(MAX_CAPTION_CHARS).strip()


def folder_listing(folder_text: str) -> dict:
    """What the form shows of a named folder: each readable photo with its caption, and each left out with why."""
    folder = named_folder(folder_text)
    photos, skipped = [], []
    for name, real in own_images(folder).items():
        problem = unreadable(real, name)
        if problem:
            skipped.append(f"{problem}: left out, as train leaves it out")
        else:
            photos.append({"name": name, "caption": caption_of(folder, name)})
    return {"folder": str(folder), "photos": photos, "skipped": skipped}


def upload_name(filename: str) -> str:
    """The bare file name the user chose, spaces and all: no folder, nothing hidden, no control characters."""
    name = CONTROL_CHARACTERS.sub("_", Path(filename.replace("\\", "/")).name).lstrip(".")
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        raise FormErrors({"photos": f"{filename}: not an image file (use {', '.join(IMAGE_EXTENSIONS)})"})
    return name


async def read_upload(upload: UploadFile) -> bytes:
    """Its bytes, at most MAX_UPLOAD_BYTES, decoded in a worker: a 20 MiB photo's full decode would stall every
    other request of the event loop."""
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise FormErrors({"photos": f"{upload.filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MiB"})
    problem = await run_in_threadpool(unreadable, io.BytesIO(data), upload.filename)
    if problem:
        raise FormErrors({"photos": problem})
    return data


def uploaded(files: list[tuple[str, bytes]], captions: dict):
    """Fills a job's photos/ with uploaded files, [(the name the browser sent, its bytes)], each caption found by
    the name the page knows it by."""
    named = [(original, upload_name(original), data) for original, data in files]
    stems = [Path(name).stem for _, name, _ in named]  # a.png and a.jpg would share a.txt; a second a.png would win
    if len(set(stems)) < len(stems):
        twice = next(s for s in stems if stems.count(s) > 1)
        raise FormErrors({"photos": f"two photos named {twice}: each needs a name of its own (its caption is "
                                    f"{twice}.txt)"})

    def fill(folder: Path):
        folder.mkdir()
        for original, name, data in named:
            write_atomically(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
            _write_caption(folder / name, captions.get(original, ""))
    return fill


def copied(folder_text: str, captions: dict):
    """Fills a job's photos/ with the named folder's own images that decode, each with the form's caption or else
    its caption file."""
    def fill(folder: Path):
        if not folder_text:
            raise FormErrors({"photos": "choose a folder of photos or upload some"})
        try:
            source = named_folder(folder_text)
            images = own_images(source)
        except UserInputError as error:
            raise FormErrors({"photos": str(error)}) from None
        folder.mkdir()
        for name, real in images.items():
            write_atomically(folder / name, lambda tmp, real=real: shutil.copyfile(real, tmp))
            if unreadable(folder / name, name):  # the copy is what trains: it is the one decoded
                (folder / name).unlink()
            else:
                _write_caption(folder / name, captions.get(name, caption_of(source, name)))
        if not any(folder.iterdir()):
            raise FormErrors({"photos": f"no readable images in {folder_text}"})
    return fill


def _write_caption(image: Path, caption) -> None:
    caption = str(caption).strip()
    if caption:
        write_text_atomically(image.with_suffix(".txt"), caption + "\n")
