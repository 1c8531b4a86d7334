"""The real SDXL UNet architecture, built on the meta device (no memory, no download)."""

from dreambooth_moslora import MoSLoRAConfig, inject_moslora
from dreambooth_moslora.adapter.io import unet_layers_per_block, kohya_module_name
from dreambooth_moslora.pipeline.sdxl import build_sdxl_unet


def test_sdxl_unet_has_the_published_size_and_560_attention_projections():
    unet = build_sdxl_unet(device="meta")
    assert round(sum(p.numel() for p in unet.parameters()) / 1e9, 3) == 2.567
    names = inject_moslora(unet, MoSLoRAConfig(rank=4))
    assert len(names) == 560


def test_kohya_names_of_every_sdxl_projection_are_sgm_names_and_distinct():
    unet = build_sdxl_unet(device="meta")
    names = inject_moslora(unet, MoSLoRAConfig(rank=4))
    kohya = {kohya_module_name("unet", n, unet_layers_per_block(unet.config)) for n in names}
    assert len(kohya) == 560
    blocks = {k.split("_transformer_blocks")[0] for k in kohya}
    assert blocks == {
        "lora_unet_input_blocks_4_1", "lora_unet_input_blocks_5_1", "lora_unet_input_blocks_7_1",
        "lora_unet_input_blocks_8_1", "lora_unet_middle_block_1",
        *(f"lora_unet_output_blocks_{i}_1" for i in range(6)),
    }
    assert "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_out_0" in kohya
