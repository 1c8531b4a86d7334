"""The README.md written next to a trained adapter: what it is and how to load it everywhere."""

from __future__ import annotations

from pathlib import Path

from ..adapter.io import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE, TRIGGER_FILE
from ..pipeline.single_file import is_single_file


def model_card(base_model: str, instance_prompt: str, config, steps: int, text_encoders_trained: bool,
               validation_prompt: str | None, validation_images: list[Path], output_dir: Path,
               ema_decay: float | None = None, model_config: str | None = None, trigger: str | None = None,
               chosen: str | None = None, files_step: int | None = None) -> str:
    """`chosen`: measured validation's chosen step and why (best/ holds it); `files_step`: the step whose adapter
    the files hold (None: the last, `steps`)."""
    files_step = steps if files_step is None else files_step
    images = "\n".join(f"![{validation_prompt}]({p.relative_to(output_dir).as_posix()})" for p in validation_images)
    return f"""---
base_model: {base_model}
library_name: diffusers
tags: [stable-diffusion-xl, lora, moslora, dreambooth, text-to-image]
instance_prompt: {instance_prompt}
---
# MoSLoRA DreamBooth adapter for {base_model}

A MoSLoRA adapter ([Wu et al. 2024](https://arxiv.org/abs/2406.11909)), trained with dreambooth_moslora on the
prompt **{instance_prompt}**.

| setting | value |
| --- | --- |
| base model | `{base_model}` |
| trigger prompt | `{instance_prompt}` |
| rank / alpha | {config.rank} / {config.alpha:g} |
| mixer init | {config.mixer_init} |
| target modules | {", ".join(config.target_modules)} |
| text encoders trained | {"yes" if text_encoders_trained else "no"} |
| trigger embedding learned | {f"`{trigger}` ({TRIGGER_FILE})" if trigger else "no"} |
| training steps | {steps} |
| chosen step (`best/`) | {chosen or "not measured"} |
| these files hold | step {files_step}'s adapter{" (the chosen step, --keep best)" if files_step != steps else ""} |
| weights | {f"the exponential moving average of the trained weights (decay {ema_decay:g}), in every file" if ema_decay else "as trained"} |

## Files
- `{DIFFUSERS_FILE}`: a plain LoRA (the mixer folded in) for diffusers and PEFT.
- `{KOHYA_FILE}`: the same LoRA in kohya naming: drop it into ComfyUI's `models/loras` (*Load LoRA* node) or
  AUTOMATIC1111's `models/Lora` and write `<lora:{Path(KOHYA_FILE).stem}:1>` in the prompt.
- `{NATIVE_FILE}`: the native MoSLoRA file, mixer kept, for resuming and for `dreambooth_moslora.load_moslora`.
{_trigger_files(trigger)}
## Use with diffusers
```python
import torch
from diffusers import StableDiffusionXLPipeline
{_base_pipeline(base_model, model_config)}
pipe.load_lora_weights("path/to/this/folder")   # reads {DIFFUSERS_FILE}{_trigger_loading(trigger)}
image = pipe("{validation_prompt or instance_prompt}").images[0]
```

## Validation images
{images or "(none: train with --validation_prompt to get some)"}
"""


def _trigger_files(trigger: str | None) -> str:
    if not trigger:
        return ""
    return f"""- `{TRIGGER_FILE}`: the learned embedding of `{trigger}`, needed with either LoRA: copy it to
  AUTOMATIC1111's `embeddings/{trigger}.safetensors` (prompts stay as they are) or ComfyUI's
  `models/embeddings/{trigger}.safetensors` (write `embedding:{trigger}` where the prompt says `{trigger}`).
"""


def _trigger_loading(trigger: str | None) -> str:
    if not trigger:
        return ""
    return f"""
from safetensors.torch import load_file
embedding = load_file("path/to/this/folder/{TRIGGER_FILE}")   # the learned `{trigger}`
pipe.load_textual_inversion(embedding["clip_l"], token="{trigger}", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(embedding["clip_g"], token="{trigger}", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"""


def _base_pipeline(base_model: str, model_config: str | None) -> str:
    """The base as stock diffusers loads it; a single file through our reader, since diffusers' from_single_file
    leaves its text_projection unloaded (NaN images)."""
    if not is_single_file(base_model):
        return f'''
pipe = StableDiffusionXLPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")'''
    return f'''from dreambooth_moslora.single_file import load_single_file_components

# a single-file base: diffusers' from_single_file would leave its text_projection unloaded (NaN images)
parts = load_single_file_components("{base_model}", "{model_config}", torch.float16)
pipe = StableDiffusionXLPipeline.from_pretrained("{model_config}", **parts, torch_dtype=torch.float16).to("cuda")'''
