"""Sample images from an SDXL pipeline with an adapter: PNGs with their settings inside, and a contact sheet."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..adapter.adapters import load_adapter, recorded_base_sha256
from ..adapter.errors import UserInputError
from ..adapter.feedback import progress_bar
from ..adapter.files import write_atomically
from .models import check_base_model, dtype_option, model_load_error
from .single_file import check_same_base, is_single_file, load_single_file_components
from .vae_tiling import fit_vae_to_card

SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++_2m": (DPMSolverMultistepScheduler, {}),
    "dpm++_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpm++_2m_sde_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True,
                                                          "algorithm_type": "sde-dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class GenerationSettings:
    negative_prompt: str | None = None
    num_images_per_prompt: int = 1
    seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    adapter_scale: float = 1.0
    fuse: bool = False
    scheduler: str | None = None
    batch_size: int = 1
    """Images per pipeline call: faster when memory allows; each image still comes from its own seed."""


def load_pipeline(base_model: str, adapter=None, settings: GenerationSettings = GenerationSettings(),
                  device: str | None = None, dtype: str | None = None, model_config=None) -> StableDiffusionXLPipeline:
    """The base pipeline on the device, with the adapter attached and the scheduler chosen. base_model is a hub id,
    a diffusers folder, or one original-layout .safetensors file whose configs are in the folder model_config."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = DTYPES[dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    check_base_model(base_model, model_config)
    if adapter is not None:
        check_same_base(recorded_base_sha256(adapter), base_model, adapter)
    try:
        if is_single_file(base_model):
            components = load_single_file_components(base_model, model_config, torch_dtype)
            pipe = StableDiffusionXLPipeline.from_pretrained(model_config, **components, **dtype_option(torch_dtype))
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(base_model, **dtype_option(torch_dtype))
    except (OSError, ValueError) as error:
        raise model_load_error(base_model, error) from None
    if settings.scheduler:
        if settings.scheduler not in SCHEDULERS:
            raise UserInputError(f"unknown scheduler {settings.scheduler!r}; one of {', '.join(SCHEDULERS)}")
        scheduler_class, options = SCHEDULERS[settings.scheduler]
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **options)
    if adapter is not None:
        load_adapter(pipe, adapter, scale=settings.adapter_scale, fuse=settings.fuse)
    fit_vae_to_card(pipe.vae)
    return pipe.to(device)


def generate_images(pipe, prompts: list[str], settings: GenerationSettings, output_dir,
                    adapter_name: str = "", show_progress: bool = True) -> list[Path]:
    """Image j of prompt i has seed (seed + j) and is named `{i:03d}-{seed + j}.png`: same seed, same image (in any
    batch, up to float rounding)."""
    output_dir = Path(output_dir)
    pipe.set_progress_bar_config(disable=True)
    paths, images = [], []
    jobs = [(i, prompt, settings.seed + j) for i, prompt in enumerate(prompts)
            for j in range(settings.num_images_per_prompt)]
    batches = [jobs[start:start + settings.batch_size] for start in range(0, len(jobs), settings.batch_size)]
    for batch in progress_bar(batches, desc="images", show=show_progress):
        generated = pipe(
            [prompt for _, prompt, _ in batch],
            negative_prompt=None if settings.negative_prompt is None else [settings.negative_prompt] * len(batch),
            num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
            height=settings.height, width=settings.width,
            generator=[torch.Generator().manual_seed(seed) for _, _, seed in batch],
        ).images
        for (index, prompt, seed), image in zip(batch, generated):
            info = _png_info(prompt, seed, settings, image.size, adapter_name)
            paths.append(write_atomically(output_dir / f"{index:03d}-{seed}.png", lambda tmp, image=image, info=info:
                                          image.save(tmp, format="PNG", pnginfo=info)))
            images.append(image)
    write_atomically(output_dir / "grid.png",
                     lambda tmp: contact_sheet(images, columns=settings.num_images_per_prompt).save(tmp, format="PNG"))
    return paths


def _png_info(prompt, seed, settings, size, adapter_name) -> PngInfo:
    """A1111-style `parameters` text, which many image viewers and tools read, plus our settings as JSON."""
    info = PngInfo()
    negative = f"\nNegative prompt: {settings.negative_prompt}" if settings.negative_prompt else ""
    info.add_text("parameters", (
        f"{prompt}{negative}\nSteps: {settings.num_inference_steps}, Sampler: {settings.scheduler or 'default'}, "
        f"CFG scale: {settings.guidance_scale}, Seed: {seed}, Size: {size[0]}x{size[1]}, "
        f"Lora: {adapter_name or 'none'}, Lora scale: {settings.adapter_scale}"
    ))
    info.add_text("dreambooth_moslora", json.dumps({**asdict(settings), "prompt": prompt, "seed": seed,
                                                    "adapter": adapter_name}))
    return info


def contact_sheet(images: list[Image.Image], columns: int, thumbnail: int = 256) -> Image.Image:
    """All images in a grid, one row per prompt, each scaled to at most `thumbnail` pixels."""
    thumbs = []
    for image in images:
        copy = image.copy()
        copy.thumbnail((thumbnail, thumbnail))
        thumbs.append(copy)
    width, height = max(t.width for t in thumbs), max(t.height for t in thumbs)
    rows = math.ceil(len(thumbs) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, thumb in enumerate(thumbs):
        sheet.paste(thumb, ((index % columns) * width, (index // columns) * height))
    return sheet
