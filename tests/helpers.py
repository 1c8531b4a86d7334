"""Small image folders for tests, drawn here so the tests never depend on files outside the repository; a spy on
the dtypes a training run really computes in."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder, sizes=((96, 64), (64, 96), (80, 80)), seed=0, suffix=".png") -> list[Path]:
    """Random-coloured images of the given (width, height) sizes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = folder / f"{index:02d}{suffix}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_two_subjects(folder) -> Path:
    """A dataset file and its folders: a dog (repeats 2, base-model prior, masks from alpha) and a cat sharing a
    class concept, each with its own trigger."""
    folder = Path(folder)
    for path in write_images(folder / "dog", sizes=((64, 64), (80, 64))):
        Image.open(path).convert("RGBA").save(path)
    write_images(folder / "cat", sizes=((64, 64),), seed=1)
    write_images(folder / "cats", sizes=((64, 64),), seed=2)
    path = folder / "dataset.toml"
    path.write_text("""
[[concept]]
name = "dog"
image_dir = "dog"
instance_prompt = "a photo of sks dog"
repeats = 2
alpha_mask = true
prior = "base_model"
class_prompt = "a photo of a dog"

[[concept]]
name = "cat"
image_dir = "cat"
instance_prompt = "a photo of zwx cat"

[[concept]]
role = "class"
image_dir = "cats"
class_prompt = "a photo of a cat"
""")
    return path


def save_tiny_feature_models(folder) -> tuple[Path, Path]:
    """A tiny random ViT (stands in for DINO) and a tiny random CLIP, each with its processor, saved locally."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from dreambooth_moslora.pipeline.tiny import tiny_clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)
    ViTModel(ViTConfig(**vit)).save_pretrained(folder / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")
    tokenizer = tiny_clip_tokenizer()
    vocab = len(tokenizer)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vit, projection_dim=16)).save_pretrained(folder / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder / "clip")
    return folder / "dino", folder / "clip"


def record_training_dtypes(monkeypatch) -> dict:
    """What the UNet sees at its first call in a training step (not what the files written afterwards hold): the
    dtypes of its frozen linear and conv weights and their bytes, the adapter's, the text encoders' and the VAE's,
    the UNet's input, and inside the forward an adapted layer's input and output dtypes and the autocast in force."""
    import torch
    from torch import nn

    import dreambooth_moslora.trainer.step as step
    import dreambooth_moslora.trainer.train as training
    from dreambooth_moslora import moslora_parameters
    from dreambooth_moslora.adapter.inject import moslora_layers

    seen, loop = {}, []
    original_step, original_predict = training.TrainingLoop.micro_step, step.predict

    def inside(layer, inputs, output):
        """Within the UNet's forward, where accelerate's autocast is in force."""
        device = output.device.type
        seen.update(layer_input=inputs[0].dtype, layer_output=output.dtype,
                    autocast=torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)

    def micro_step(self, *args):
        loop[:] = [self]
        return original_step(self, *args)

    def recording(unet, noisy, timesteps, prompt_embeds, pooled, time_ids, dtype):
        if seen:
            return original_predict(unet, noisy, timesteps, prompt_embeds, pooled, time_ids, dtype)
        (self,) = loop
        model = self.accelerator.unwrap_model(unet)
        hook = next(iter(moslora_layers(model).values())).register_forward_hook(inside)
        prediction = original_predict(unet, noisy, timesteps, prompt_embeds, pooled, time_ids, dtype)
        hook.remove()
        frozen = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.requires_grad]
        seen.update(
            frozen={w.dtype for w in frozen},
            frozen_bytes=sum(w.untyped_storage().nbytes() for w in frozen),
            frozen_numel=sum(w.numel() for w in frozen),
            adapter={p.dtype for p in moslora_parameters(model)},
            text_encoders={p.dtype for e in self.models.text_encoders for p in e.parameters()},
            vae={p.dtype for p in self.models.vae.parameters()},
            unet_input=dtype,
        )
        return prediction

    monkeypatch.setattr(training.TrainingLoop, "micro_step", micro_step)
    monkeypatch.setattr(step, "predict", recording)
    return seen
