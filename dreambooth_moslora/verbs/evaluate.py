"""The DreamBooth evaluation protocol for one subject and one or more adapters, with the same seeds for each.

For each adapter, N images for each of the 25 benchmark prompts (with the trigger), then DINO and CLIP-I
(generated vs real) and CLIP-T (image vs its prompt without the trigger), beside the real-vs-real ceiling.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ..adapter.errors import UserInputError
from ..adapter.files import write_text_atomically
from ..pipeline.generate import GenerationSettings, generate_images, load_pipeline
from ..pipeline.metrics import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    ClipEmbedder,
    DinoEmbedder,
    mean_cross_similarity,
    mean_paired_similarity,
    mean_self_similarity,
)
from ..pipeline.models import check_base_model
from ..trainer.data import image_files, load_rgb
from ..trainer.dreambooth_prompts import LIVE_SUBJECT_PROMPTS, OBJECT_PROMPTS
from ..trainer.prompt_words import read_prompts

PROMPT_LISTS = {"object": OBJECT_PROMPTS, "live": LIVE_SUBJECT_PROMPTS}


def benchmark_prompts(kind: str, token: str, noun: str, prompts_file=None) -> list[tuple[str, str]]:
    """(prompt with the trigger, the same prompt without it) for each benchmark or file prompt."""
    if prompts_file is not None:
        with_trigger = read_prompts(prompts_file=prompts_file)
    else:
        with_trigger = [p.format(token=token, noun=noun) for p in PROMPT_LISTS[kind]]
    return [(p, " ".join(word for word in p.split() if word != token)) for p in with_trigger]


def evaluate_adapters(base_model: str, adapters: dict[str, str | None], subject_dir, token: str, noun: str,
                      output_dir, prompt_kind: str = "object", prompts_file=None,
                      settings: GenerationSettings = GenerationSettings(num_images_per_prompt=4),
                      dino_model: str = DEFAULT_DINO, clip_model: str = DEFAULT_CLIP,
                      device: str | None = None, dtype: str | None = None, model_config=None) -> dict:
    """Generate with each adapter (None: the base model alone), measure, write metrics.json and metrics.md."""
    if not adapters:
        raise UserInputError("give at least one adapter to evaluate")
    check_base_model(base_model, model_config)
    output_dir = Path(output_dir)
    prompts = benchmark_prompts(prompt_kind, token, noun, prompts_file)
    real = [load_rgb(p) for p in image_files(subject_dir)]
    dino, clip = DinoEmbedder(dino_model), ClipEmbedder(clip_model)
    real_dino, real_clip = dino.images(real), clip.images(real)
    results = {
        "subject": str(subject_dir), "base_model": base_model, "prompts": [p for p, _ in prompts],
        "images_per_prompt": settings.num_images_per_prompt, "seed": settings.seed,
        "real_vs_real": {"dino": mean_self_similarity(real_dino), "clip_i": mean_self_similarity(real_clip)},
        "adapters": {},
    }
    for name, adapter in adapters.items():
        pipe = load_pipeline(base_model, adapter, settings, device=device, dtype=dtype, model_config=model_config)
        paths = generate_images(pipe, [p for p, _ in prompts], settings, output_dir / "images" / name,
                                adapter_name=str(adapter or "none"))
        del pipe
        generated = [Image.open(p).convert("RGB") for p in paths]
        texts = [plain for _, plain in prompts for _ in range(settings.num_images_per_prompt)]
        generated_clip = clip.images(generated)
        results["adapters"][name] = {
            "adapter": str(adapter) if adapter else None,
            "dino": mean_cross_similarity(dino.images(generated), real_dino),
            "clip_i": mean_cross_similarity(generated_clip, real_clip),
            "clip_t": mean_paired_similarity(generated_clip, clip.texts(texts)),
        }
    write_text_atomically(output_dir / "metrics.json", json.dumps(results, indent=2))
    write_text_atomically(output_dir / "metrics.md", metrics_table(results))
    return results


def metrics_table(results: dict) -> str:
    """Markdown: one row per adapter, and the real-vs-real ceiling."""
    lines = ["| adapter | DINO | CLIP-I | CLIP-T |", "| --- | --- | --- | --- |"]
    for name, row in results["adapters"].items():
        lines.append(f"| {name} | {row['dino']:.3f} | {row['clip_i']:.3f} | {row['clip_t']:.3f} |")
    ceiling = results["real_vs_real"]
    lines.append(f"| real vs real (ceiling) | {ceiling['dino']:.3f} | {ceiling['clip_i']:.3f} | |")
    return "\n".join(lines) + "\n"


def parse_adapter_specs(specs: list[str]) -> dict[str, str | None]:
    """`name=path` pairs (a bare path is named after its folder); `name=none` is the base model alone."""
    adapters = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).resolve().name, "", spec)
        if name in adapters:
            raise UserInputError(f"adapter name {name!r} is used twice; name them with name=path")
        adapters[name] = None if path.lower() == "none" else path
    return adapters


