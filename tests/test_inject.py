import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel

from conftest import perturb_adapters
from dreambooth_moslora import (
    fuse_moslora,
    MoSLoRAConfig,
    MoSLoRALinear,
    inject_moslora,
    merge_moslora,
    moslora_parameters,
    remove_moslora,
    unmerge_moslora,
)
from dreambooth_moslora.adapter.config import TEXT_ENCODER_TARGETS
from dreambooth_moslora.adapter.inject import moslora_config


@pytest.fixture
def unet(tiny_sdxl_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


def _unet_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=generator),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 5, 64, generator=generator),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=generator),
                           "time_ids": torch.rand(2, 6, generator=generator) * 64},
    )


def _out(unet, inputs):
    return unet(**inputs).sample


def test_injects_the_four_attention_projections_of_every_transformer_block(unet):
    names = inject_moslora(unet, MoSLoRAConfig())
    blocks = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(names) == len(blocks) * 2 * 4  # attn1 and attn2, four projections each
    assert all(isinstance(unet.get_submodule(n), MoSLoRALinear) for n in names)


def test_injected_model_equals_base_until_trained_and_only_adapters_train(unet):
    inputs = _unet_inputs()
    with torch.no_grad():
        base = _out(unet, inputs)
    inject_moslora(unet, MoSLoRAConfig(rank=4))
    with torch.no_grad():  # each adapted layer is exact (test_layer); across the UNet, the CPU's matmul kernels
        # round the same strided input differently from one call to a later one (~1e-7 per layer)
        torch.testing.assert_close(_out(unet, inputs), base, rtol=1e-5, atol=1e-5)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in moslora_parameters(unet)}


def test_works_on_a_clip_text_encoder(tiny_sdxl_dir):
    encoder = CLIPTextModel.from_pretrained(tiny_sdxl_dir, subfolder="text_encoder")
    names = inject_moslora(encoder, MoSLoRAConfig(target_modules=TEXT_ENCODER_TARGETS))
    assert len(names) == encoder.config.num_hidden_layers * 4
    assert {n.rsplit(".", 1)[1] for n in names} == set(TEXT_ENCODER_TARGETS)


def test_refuses_no_match_and_double_injection(unet):
    with pytest.raises(ValueError, match="no nn.Linear in the model matches target_modules"):
        inject_moslora(unet, MoSLoRAConfig(target_modules=("q_proj",)))
    inject_moslora(unet, MoSLoRAConfig())
    with pytest.raises(ValueError, match="already has MoSLoRA layers"):
        inject_moslora(unet, MoSLoRAConfig())


def test_merge_unmerge_and_remove_restore_the_model(unet):
    original_state = {k: v.clone() for k, v in unet.state_dict().items()}
    inputs = _unet_inputs()
    with torch.no_grad():
        base = _out(unet, inputs)
    inject_moslora(unet, MoSLoRAConfig())
    perturb_adapters(unet, std=0.3)
    with torch.no_grad():
        adapted = _out(unet, inputs)
        assert (adapted - base).abs().max() > 1e-3
        merge_moslora(unet)
        torch.testing.assert_close(_out(unet, inputs), adapted, rtol=1e-4, atol=1e-4)
        unmerge_moslora(unet)
        torch.testing.assert_close(_out(unet, inputs), adapted, rtol=1e-4, atol=1e-4)
        merge_moslora(unet)
        remove_moslora(unet)
        torch.testing.assert_close(_out(unet, inputs), base, rtol=1e-4, atol=1e-4)
    assert unet.state_dict().keys() == original_state.keys()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, original_state[key], rtol=0, atol=1e-5)


def test_fuse_merges_and_drops_the_wrappers(unet):
    inputs = _unet_inputs()
    inject_moslora(unet, MoSLoRAConfig())
    perturb_adapters(unet, std=0.3)
    with torch.no_grad():
        adapted = _out(unet, inputs)
        fuse_moslora(unet)
        assert not any(isinstance(m, MoSLoRALinear) for m in unet.modules())
        torch.testing.assert_close(_out(unet, inputs), adapted, rtol=1e-4, atol=1e-4)


def test_mixer_none_has_exactly_the_parameters_of_a_peft_lora(unet, tiny_sdxl_dir):
    inject_moslora(unet, MoSLoRAConfig(rank=4, mixer_init="none"))
    ours = sum(p.numel() for p in moslora_parameters(unet))
    peft_unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    peft_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    theirs = sum(p.numel() for n, p in peft_unet.named_parameters() if "lora_" in n)
    assert ours == theirs
    with_mixer = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    names = inject_moslora(with_mixer, MoSLoRAConfig(rank=4))
    assert sum(p.numel() for p in moslora_parameters(with_mixer)) == theirs + len(names) * 16


def test_two_optimizer_steps_move_a_mixer_and_b_but_no_base_weight(unet):
    inject_moslora(unet, MoSLoRAConfig(rank=4))
    base = {n: p.clone() for n, p in unet.named_parameters() if not p.requires_grad}
    layers = [m for m in unet.modules() if isinstance(m, MoSLoRALinear)]
    start = [(m.lora_A.clone(), m.lora_mixer.clone(), m.lora_B.clone()) for m in layers]
    optimizer = torch.optim.AdamW(moslora_parameters(unet), lr=1e-2)
    for step in range(2):
        loss = _out(unet, _unet_inputs(seed=step)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer, (a, m, b) in zip(layers, start):
        assert not torch.equal(layer.lora_A, a)
        assert not torch.equal(layer.lora_mixer, m)
        assert not torch.equal(layer.lora_B, b)
    for name, param in unet.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name


def test_a_frozen_mixer_keeps_its_initial_value_while_a_and_b_learn(unet):
    inject_moslora(unet, MoSLoRAConfig(rank=4, train_mixer=False))
    layers = [m for m in unet.modules() if isinstance(m, MoSLoRALinear)]
    assert len(moslora_parameters(unet)) == 2 * len(layers)
    start = [(m.lora_A.clone(), m.lora_mixer.clone()) for m in layers]
    optimizer = torch.optim.AdamW(moslora_parameters(unet), lr=1e-2)
    for step in range(2):
        _out(unet, _unet_inputs(seed=step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for layer, (a, m) in zip(layers, start):
        assert not torch.equal(layer.lora_A, a)
        assert torch.equal(layer.lora_mixer, m)
        assert not torch.equal(layer.lora_mixer, torch.eye(4))


def test_moslora_config_reports_the_injected_config(unet):
    with pytest.raises(ValueError, match="no MoSLoRA layers"):
        moslora_config(unet)
    config = MoSLoRAConfig(rank=3, mixer_init="kaiming")
    inject_moslora(unet, config)
    assert moslora_config(unet) is config
