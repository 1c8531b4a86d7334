"""A job's adapters as files to download, and images generated with them by `dreambooth-moslora generate`.

The output folder and best/ hold all three formats; a checkpoint holds the native file only, so its diffusers
and kohya files are exported on first request into the job's exports/ (written atomically by the exporters).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from PIL import Image

from ..adapter.errors import UserInputError
from ..adapter.files import write_text_atomically
from ..adapter.io import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE, export_diffusers, export_kohya
from .jobs import cli_command, option_words, process_alive
from .progress import checkpoint_names, job_args

FORMATS = {"native": (NATIVE_FILE, None), "diffusers": (DIFFUSERS_FILE, export_diffusers),
           "kohya": (KOHYA_FILE, export_kohya)}


def adapter_folder(job: Path, checkpoint: str) -> Path:
    """The folder of one of the job's adapters, by the name checkpoint_names gives it; nothing else."""
    output = job / "output"
    if checkpoint not in checkpoint_names(output):
        raise UserInputError(f"no adapter {checkpoint!r} in this job (have: {', '.join(checkpoint_names(output))})")
    return output if checkpoint == "final" else output / checkpoint


def adapter_file(job: Path, checkpoint: str, file_format: str) -> Path:
    if file_format not in FORMATS:
        raise UserInputError(f"unknown format {file_format!r}; one of {', '.join(FORMATS)}")
    name, exporter = FORMATS[file_format]
    folder = adapter_folder(job, checkpoint)
    if (folder / name).is_file():
        return folder / name
    return exporter(folder / NATIVE_FILE, job / "exports" / checkpoint / name)


def start_generation(job: Path, record: dict, checkpoint: str, prompts: list[str], seed: int, count: int,
                     guidance: float, steps: int) -> str:
    """`generate` with the job's base model (record: its job.json) and one of its adapters, into generated/N/,
    in the job's working folder; returns N."""
    args = job_args(record)
    adapter = adapter_folder(job, checkpoint) / NATIVE_FILE
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise UserInputError("write at least one prompt")
    root = job / "generated"
    root.mkdir(exist_ok=True)
    number = 1 + max((int(p.name) for p in root.glob("*") if p.name.isdigit()), default=0)
    while True:  # a second request at the same moment (a double click) takes the next number, not a 500
        folder = root / str(number)
        try:
            folder.mkdir()
            break
        except FileExistsError:
            number += 1
    command = [*option_words("pretrained_model_name_or_path", args.pretrained_model_name_or_path),
               *option_words("adapter", str(adapter)),
               *(option_words("model_config", args.model_config) if args.model_config else []),
               *[word for prompt in prompts for word in option_words("prompt", prompt)], "--seed", str(seed),
               "--num_images_per_prompt", str(count), "--guidance_scale", str(guidance),
               "--num_inference_steps", str(steps), "--height", str(args.resolution), "--width", str(args.resolution),
               "--output_dir", str(folder / "images")]
    with open(folder / "generate.log", "w", encoding="utf-8") as log:
        try:
            pid = subprocess.Popen(cli_command("generate", command), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=record["cwd"]).pid
        except OSError as error:  # e.g. its working folder is gone: failed, not "starting" for ever
            log.write(f"error: generate could not start: {error}\n")
            pid = None
    write_text_atomically(folder / "request.json", json.dumps({"checkpoint": checkpoint, "prompts": prompts,
                                                                "pid": pid}))
    return str(number)


def generations(job: Path) -> list[dict]:
    """Each generation, newest first: its images (relative to the job) with their PNG metadata, and its state."""
    found = []
    for folder in sorted((p for p in (job / "generated").glob("*") if p.name.isdigit()), key=lambda p: -int(p.name)):
        request = json.loads((folder / "request.json").read_text()) if (folder / "request.json").is_file() else {}
        log = (folder / "generate.log").read_text(errors="replace") if (folder / "generate.log").is_file() else ""
        running = not request or process_alive(request.get("pid"), str(folder))  # no request yet: starting
        error = re.search(r"^error: .*$", log, re.M)
        images = [{"path": str(p.relative_to(job)), "parameters": _parameters(p)}
                  for p in sorted((folder / "images").glob("*.png")) if p.name != "grid.png"]
        state = "running" if running else "failed" if error or not images else "done"
        found.append({"number": folder.name, "checkpoint": request.get("checkpoint"), "state": state,
                      "message": error.group(0) if error else "", "images": images})
    return found


def _parameters(image: Path) -> str:
    with Image.open(image) as opened:
        return opened.text.get("parameters", "")
