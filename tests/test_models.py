import functools
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from conftest import perturb_adapters
from dreambooth_moslora import MoSLoRAConfig, inject_moslora
from dreambooth_moslora.adapter.config import TEXT_ENCODER_TARGETS
from dreambooth_moslora.adapter.inject import moslora_layers
from dreambooth_moslora.pipeline.models import enable_text_encoder_checkpointing, load_base_models


def test_a_separate_vae_replaces_the_bases_without_the_bases_being_read(tiny_sdxl_dir, tmp_path):
    base = shutil.copytree(tiny_sdxl_dir, tmp_path / "base")
    for weights in (base / "vae").glob("*.safetensors"):
        weights.unlink()  # reading the base's VAE would now fail
    torch.manual_seed(1)
    AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae")).save_pretrained(tmp_path / "vae")
    models = load_base_models(str(base), vae_name_or_path=str(tmp_path / "vae"))
    expected = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in models.vae.state_dict().items())


class Transformers4Encoder(nn.Module):
    """A CLIP text encoder behind transformers 4.x's checkpointing API: one method, reentrant unless told
    otherwise, and no input gradients switched on (4.x does that only for PEFT models)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": True}  # 4.x's default
        self.model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(checkpoint, **gradient_checkpointing_kwargs))


@pytest.mark.parametrize("api", ["installed", "transformers 4.x"])
def test_text_encoder_adapters_get_gradients_under_checkpointing(api):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=16))
    inject_moslora(model, MoSLoRAConfig(rank=2, target_modules=TEXT_ENCODER_TARGETS))
    perturb_adapters(model)  # with B = 0, A would get no gradient whatever the checkpointing
    layers = list(moslora_layers(model).values())
    forwards = []
    layers[0].register_forward_hook(lambda *_: forwards.append(1))
    encoder = model if api == "installed" else Transformers4Encoder(model)
    enable_text_encoder_checkpointing(encoder)
    encoder.train()
    hidden = encoder(torch.randint(0, 100, (2, 7))).last_hidden_state
    assert hidden.requires_grad, "the checkpointed layers cut the graph: the adapters get no gradient"
    hidden.square().mean().backward()
    assert len(forwards) == 2  # recomputed in the backward: checkpointing is on
    assert all(l.lora_A.grad.abs().max() > 0 and l.lora_B.grad.abs().max() > 0 for l in layers)
