import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import perturb_adapters, sample
from dreambooth_moslora import MoSLoRAConfig, inject_moslora, merge_moslora
from dreambooth_moslora.adapter.inject import moslora_layers
from dreambooth_moslora.adapter.io import (
    DIFFUSERS_FILE,
    KOHYA_FILE,
    NATIVE_FILE,
    AdapterFileError,
    export_diffusers,
    export_kohya,
    kohya_module_name,
    load_moslora,
    read_moslora,
    save_moslora,
)


def _state(pipe):
    return {
        f"{name}.{key}": value.clone()
        for name in ("unet", "text_encoder", "text_encoder_2")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def _assert_unchanged(pipe, before):
    after = _state(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_native_file_schema_and_metadata(trained):
    path = trained["dir"] / NATIVE_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert metadata["format"] == "moslora" and metadata["format_version"] == "1"
    assert metadata["base_model"] == "tiny"
    configs = json.loads(metadata["configs"])
    assert configs["unet"]["alpha"] == 2 and configs["text_encoder"]["mixer_init"] == "kaiming"
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_mixer.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in keys


def test_native_save_then_load_is_exact(trained, tiny_pipe):
    assert (trained["image"] - trained["base_image"]).abs().max() > 1e-2
    loaded = load_moslora(tiny_pipe, trained["dir"] / NATIVE_FILE)
    assert set(loaded) == {"unet", "text_encoder", "text_encoder_2"}
    for component in loaded:
        ours, theirs = moslora_layers(getattr(tiny_pipe, component)), moslora_layers(getattr(trained["pipe"], component))
        for name in ours:
            assert torch.equal(ours[name].delta_weight(), theirs[name].delta_weight())
    assert torch.equal(sample(tiny_pipe), trained["image"])


def test_fused_loading_gives_the_same_images_with_the_base_architecture(trained, tiny_pipe):
    keys = set(tiny_pipe.unet.state_dict())
    load_moslora(tiny_pipe, trained["dir"] / NATIVE_FILE, fuse=True)
    assert not moslora_layers(tiny_pipe.unet) and set(tiny_pipe.unet.state_dict()) == keys
    assert (sample(tiny_pipe) - trained["image"]).abs().max() < 1e-4


def test_scale_zero_is_the_base_model(trained, tiny_pipe):
    load_moslora(tiny_pipe, trained["dir"] / NATIVE_FILE, scale=0.0)
    assert (sample(tiny_pipe) - trained["base_image"]).abs().max() < 1e-5


@pytest.mark.parametrize("weight_name", [DIFFUSERS_FILE, KOHYA_FILE])
def test_stock_diffusers_loads_each_export_and_gives_the_native_images(trained, tiny_pipe, weight_name):
    tiny_pipe.load_lora_weights(trained["dir"], weight_name=weight_name)
    image = sample(tiny_pipe)
    assert (image - trained["image"]).abs().max() < 1e-4
    assert (image - trained["base_image"]).abs().max() > 1e-2


def test_exports_fold_mixer_and_scale_into_a_plain_lora(trained):
    unet_layers = moslora_layers(trained["pipe"].unet)
    name = "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_out.0"
    diffusers = load_file(trained["dir"] / DIFFUSERS_FILE)
    down, up = diffusers[f"unet.{name}.lora_A.weight"], diffusers[f"unet.{name}.lora_B.weight"]
    torch.testing.assert_close(up @ down, unet_layers[name].delta_weight())
    kohya = load_file(trained["dir"] / KOHYA_FILE)
    key = "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_out_0"
    assert torch.equal(kohya[f"{key}.lora_down.weight"], down) and torch.equal(kohya[f"{key}.lora_up.weight"], up)
    assert kohya[f"{key}.alpha"].item() == 4.0
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    with safe_open(str(trained["dir"] / KOHYA_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_network_dim"] == "4"


def test_kohya_names_follow_sgm_numbering_for_sdxl():
    lpb = [2, 2, 2]
    assert kohya_module_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", lpb) == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert kohya_module_name("unet", "down_blocks.2.attentions.1.proj_in", lpb) == "lora_unet_input_blocks_8_1_proj_in"
    assert kohya_module_name("unet", "mid_block.attentions.0.transformer_blocks.9.attn2.to_k", lpb) == (
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k"
    )
    assert kohya_module_name("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_v", lpb) == (
        "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_v"
    )
    assert kohya_module_name("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", lpb) == (
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_v"
    )
    assert kohya_module_name("unet", "down_blocks.1.attentions.1.proj_out", [1, 1, 1]) == (
        "lora_unet_input_blocks_4_1_proj_out"
    )
    assert kohya_module_name("text_encoder", "text_model.encoder.layers.3.mlp.fc1", lpb) == (
        "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    )


def test_mixer_none_file_has_no_mixer_keys_and_reloads(tmp_path, tiny_sdxl_dir, tiny_pipe):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    inject_moslora(pipe.unet, MoSLoRAConfig(mixer_init="none"))
    perturb_adapters(pipe.unet)
    save_moslora(tmp_path / NATIVE_FILE, pipe.unet)
    assert not any("lora_mixer" in k for k in load_file(tmp_path / NATIVE_FILE))
    load_moslora(tiny_pipe, tmp_path / NATIVE_FILE)
    assert torch.equal(sample(tiny_pipe), sample(pipe))


def _rewrite(src, dst, edit):
    with safe_open(str(src), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(src)
    edit(tensors, metadata)
    save_file(tensors, dst, metadata=metadata)
    return dst


def _drop_one(tensors, metadata):
    del tensors["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight"]


def _drop_module(tensors, metadata):
    for key in [k for k in tensors if ".mid_block.attentions.0.transformer_blocks.0.attn1.to_k." in k]:
        del tensors[key]


def _extra_module(tensors, metadata):
    for part in ("lora_A", "lora_mixer", "lora_B"):
        key = f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.{part}.weight"
        tensors[key.replace("transformer_blocks.0", "transformer_blocks.7")] = tensors[key].clone()


def _wider(tensors, metadata):
    for key in [k for k in tensors if ".mid_block.attentions.0.transformer_blocks.0.attn1.to_k." in k]:
        tensor = tensors[key]
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.cat([tensor, tensor], dim=1)


def _no_format(tensors, metadata):
    metadata.pop("format")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_one, r"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k has \['lora_B', 'lora_mixer'\]"),
        (_drop_module, "missing weights for unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k"),
        (_extra_module, "transformer_blocks.7.attn1.to_k is not a target layer of this pipeline"),
        (_wider, "mid_block.attentions.0.transformer_blocks.0.attn1.to_k is 64→32 in the adapter"),
        (_no_format, "not a native MoSLoRA file"),
    ],
)
def test_a_bad_file_is_refused_and_leaves_the_pipeline_unchanged(trained, tiny_pipe, tmp_path, edit, message):
    bad = _rewrite(trained["dir"] / NATIVE_FILE, tmp_path / "bad.safetensors", edit)
    before = _state(tiny_pipe)
    with pytest.raises(AdapterFileError, match=message):
        load_moslora(tiny_pipe, bad)
    _assert_unchanged(tiny_pipe, before)


def test_foreign_and_broken_files_are_named(trained, tiny_pipe, tmp_path):
    before = _state(tiny_pipe)
    with pytest.raises(AdapterFileError, match="looks like a diffusers/PEFT LoRA"):
        load_moslora(tiny_pipe, trained["dir"] / DIFFUSERS_FILE)
    with pytest.raises(AdapterFileError, match="looks like a kohya-style LoRA"):
        load_moslora(tiny_pipe, trained["dir"] / KOHYA_FILE)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04pickle-like bytes, not safetensors")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_moslora(tiny_pipe, garbage)
    with pytest.raises(AdapterFileError, match="adapter file not found"):
        load_moslora(tiny_pipe, tmp_path / "missing.safetensors")
    _assert_unchanged(tiny_pipe, before)


def test_loading_twice_is_refused(trained, tiny_pipe):
    load_moslora(tiny_pipe, trained["dir"] / NATIVE_FILE)
    with pytest.raises(AdapterFileError, match="already has a MoSLoRA adapter"):
        load_moslora(tiny_pipe, trained["dir"] / NATIVE_FILE)


def test_read_moslora_exposes_configs_and_base(trained):
    adapter = read_moslora(trained["dir"] / NATIVE_FILE)
    assert adapter.base_model == "tiny" and adapter.unet_layers_per_block == [2, 2, 2]
    assert adapter.configs["text_encoder_2"].rank == 2


def test_merged_model_saves_the_adapter_not_the_merge(tmp_path, tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    inject_moslora(pipe.unet, MoSLoRAConfig())
    perturb_adapters(pipe.unet)
    merge_moslora(pipe.unet)
    save_moslora(tmp_path / NATIVE_FILE, pipe.unet)
    assert not any(k.endswith("base_layer.weight") for k in load_file(tmp_path / NATIVE_FILE))


@pytest.mark.parametrize("exporter, down_key, up_key", [
    (export_diffusers, "unet.{}.lora_A.weight", "unet.{}.lora_B.weight"),
    (export_kohya, "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_out_0.lora_down.weight",
     "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight"),
])
def test_export_at_a_lower_rank_is_the_best_truncation(trained, tmp_path, exporter, down_key, up_key):
    name = "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_out.0"
    exporter(trained["dir"] / NATIVE_FILE, tmp_path / "small.safetensors", rank=2)
    small = load_file(tmp_path / "small.safetensors")
    down, up = small[down_key.format(name)], small[up_key.format(name)]
    assert down.shape[0] == 2 and up.shape[1] == 2
    full = moslora_layers(trained["pipe"].unet)[name].delta_weight()
    singular_values = torch.linalg.svdvals(full.double())
    error = torch.linalg.matrix_norm((full - up @ down).double())
    torch.testing.assert_close(error, singular_values[2:].norm(), rtol=1e-4, atol=1e-6)


def test_compression_error_is_zero_at_full_rank_and_grows_as_rank_drops(trained):
    adapter = read_moslora(trained["dir"] / NATIVE_FILE)
    errors = [adapter.compression_error(rank) for rank in (4, 3, 2, 1)]
    assert errors[0] == pytest.approx(0, abs=1e-7)
    assert errors == sorted(errors) and 0 < errors[-1] < 1
