import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import sample
from dreambooth_moslora.adapter.adapters import detect_format, load_adapter, read_update_factors, resolve_adapter_file
from dreambooth_moslora.adapter.errors import AdapterFileError
from dreambooth_moslora.adapter.inject import moslora_layers
from dreambooth_moslora.adapter.io import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE


def test_a_folder_means_its_native_file_then_diffusers_then_kohya(trained, tmp_path):
    assert resolve_adapter_file(trained["dir"]).name == NATIVE_FILE
    (tmp_path / KOHYA_FILE).write_bytes((trained["dir"] / KOHYA_FILE).read_bytes())
    assert resolve_adapter_file(tmp_path).name == KOHYA_FILE
    with pytest.raises(AdapterFileError, match="holds no adapter file"):
        resolve_adapter_file(tmp_path / "..")
    with pytest.raises(AdapterFileError, match="adapter file not found"):
        resolve_adapter_file(tmp_path / "missing.safetensors")


def test_formats_are_detected_from_content(trained, tmp_path):
    assert [detect_format(trained["dir"] / f) for f in (NATIVE_FILE, DIFFUSERS_FILE, KOHYA_FILE)] == [
        "native", "diffusers", "kohya"]
    save_file({"weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(AdapterFileError, match="is not a LoRA or MoSLoRA adapter file"):
        detect_format(tmp_path / "model.safetensors")


@pytest.mark.parametrize("name", [NATIVE_FILE, DIFFUSERS_FILE, KOHYA_FILE])
def test_every_format_loads_to_the_same_images_fused_or_not(trained, tiny_pipe, name):
    load_adapter(tiny_pipe, trained["dir"] / name, fuse=name == KOHYA_FILE)
    assert (sample(tiny_pipe) - trained["image"]).abs().max() < 1e-4


def test_adapter_scale_applies_to_plain_lora_files(trained, tiny_pipe):
    load_adapter(tiny_pipe, trained["dir"] / DIFFUSERS_FILE, scale=0.0)
    assert (sample(tiny_pipe) - trained["base_image"]).abs().max() < 1e-5


def test_a_plain_lora_for_another_base_is_one_clear_error(trained, tiny_pipe, tmp_path):
    tensors = load_file(trained["dir"] / DIFFUSERS_FILE)
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith("lora_A.weight"))
    tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)
    save_file(tensors, tmp_path / DIFFUSERS_FILE)
    with pytest.raises(AdapterFileError, match="does not fit this pipeline"):
        load_adapter(tiny_pipe, tmp_path / DIFFUSERS_FILE)
    assert (sample(tiny_pipe) - trained["base_image"]).abs().max() < 1e-6


def test_update_factors_agree_across_formats(trained):
    _, native, _ = read_update_factors(trained["dir"] / NATIVE_FILE)
    _, diffusers, _ = read_update_factors(trained["dir"] / DIFFUSERS_FILE)
    kind, kohya, _ = read_update_factors(trained["dir"] / KOHYA_FILE)
    assert kind == "kohya" and len(native) == len(diffusers) == len(kohya)
    name = "unet.mid_block.attentions.0.transformer_blocks.1.attn1.to_v"
    layer = moslora_layers(trained["pipe"].unet)[name.removeprefix("unet.")]
    for factors, key in ((native, name), (diffusers, name),
                         (kohya, "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_v")):
        down, up = factors[key]
        torch.testing.assert_close(up @ down, layer.delta_weight(), rtol=1e-5, atol=1e-6)
