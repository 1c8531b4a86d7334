import json

import torch
from diffusers import UNet2DConditionModel

from conftest import sample
from dreambooth_moslora.pipeline.tiny import save_tiny_sdxl_pipeline


def test_tiny_pipeline_has_the_sdxl_layout(tiny_sdxl_dir):
    index = json.loads((tiny_sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.down_block_types[0] == "DownBlock2D"


def test_tiny_pipeline_samples_64px_deterministically(tiny_pipe):
    image = sample(tiny_pipe, seed=3)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert torch.equal(image, sample(tiny_pipe, seed=3))
    assert not torch.equal(image, sample(tiny_pipe, seed=4))


def test_same_seed_gives_the_same_weights_and_another_seed_differs(tmp_path, tiny_sdxl_dir):
    again = save_tiny_sdxl_pipeline(tmp_path / "again", seed=0)
    other = save_tiny_sdxl_pipeline(tmp_path / "other", seed=1)
    reference, same, different = (
        UNet2DConditionModel.from_pretrained(path, subfolder="unet").state_dict()
        for path in (tiny_sdxl_dir, again, other)
    )
    assert all(torch.equal(value, same[key]) for key, value in reference.items())
    assert not torch.equal(reference["conv_in.weight"], different["conv_in.weight"])


def test_tokenizer_covers_any_text_and_stops_at_77(tiny_pipe):
    ids = tiny_pipe.tokenizer("a photo of sks dog, ünïcode ✓", truncation=True).input_ids
    assert tiny_pipe.tokenizer.unk_token_id not in ids[1:-1]
    long = tiny_pipe.tokenizer("word " * 100, truncation=True, max_length=77).input_ids
    assert len(long) == 77
