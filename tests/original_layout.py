"""Write a diffusers SDXL pipeline as one file in the original SGM layout (A1111's and ComfyUI's), for tests.

The inverse of diffusers' single-file conversion, written from the layout itself: UNet under
`model.diffusion_model.` (input/middle/output blocks), VAE under `first_stage_model.` (LDM names, attention as 1x1
convolutions), CLIP-L under `conditioner.embedders.0.transformer.`, OpenCLIP-G under `conditioner.embedders.1.model.`
(fused in_proj, text_projection as a matrix applied on the right).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
          ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
UNET_TOP = (("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
            ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
            ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."))


def _unet_prefixes(config) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, original prefix, is a resnet) for every block of this UNet's layout."""
    per_level = config.layers_per_block + 1  # the resnets and the down/upsampler of a level
    levels = len(config.block_out_channels)
    prefixes = []
    for i, kind in enumerate(config.down_block_types):
        for j in range(config.layers_per_block):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per_level * i + j + 1}.0.", True))
            if "CrossAttn" in kind:
                prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per_level * i + j + 1}.1.", False))
        if i < levels - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per_level * (i + 1)}.0.op.", False))
    for i, kind in enumerate(config.up_block_types):
        for j in range(per_level):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per_level * i + j}.0.", True))
            if "CrossAttn" in kind:
                prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per_level * i + j}.1.", False))
        if i < levels - 1:
            slot = 2 if "CrossAttn" in kind else 1
            prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per_level * i + per_level - 1}.{slot}.", False))
    prefixes.append(("mid_block.attentions.0.", "middle_block.1.", False))
    prefixes += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    return prefixes


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    converted = {}
    for name, tensor in unet.state_dict().items():
        original = _rename_top(name, UNET_TOP)
        if original is None:
            source, target, is_resnet = next(p for p in prefixes if name.startswith(p[0]))
            rest = name[len(source):]
            original = target + (_rename_top(rest, RESNET) or rest if is_resnet else rest)
        converted["model.diffusion_model." + original] = tensor
    return converted


def _rename_top(name: str, pairs) -> str | None:
    for source, target in pairs:
        if name.startswith(source):
            return target + name[len(source):]
    return None


VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
VAE_TOP = (("conv_norm_out.", "norm_out."), ("mid_block.resnets.0.", "mid.block_1."),
           ("mid_block.resnets.1.", "mid.block_2."), ("mid_block.attentions.0.", "mid.attn_1."))


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    converted = {}
    for name, tensor in vae.state_dict().items():
        part, _, rest = name.partition(".")
        if part in ("quant_conv", "post_quant_conv"):
            converted["first_stage_model." + name] = tensor
            continue
        renamed = _rename_top(rest, VAE_TOP) or rest
        if renamed.startswith("mid.attn_1."):
            inner = renamed[len("mid.attn_1."):]
            renamed = "mid.attn_1." + (_rename_top(inner, VAE_ATTENTION) or inner)
            if tensor.ndim == 2:  # the original attention is 1x1 convolutions
                tensor = tensor[:, :, None, None]
        for kind, original in (("down_blocks", "down"), ("up_blocks", "up")):
            if renamed.startswith(kind + "."):
                index, _, inner = renamed[len(kind) + 1:].partition(".")
                level = int(index) if kind == "down_blocks" else levels - 1 - int(index)
                inner = (inner.replace("resnets.", "block.").replace("downsamplers.0.", "downsample.")
                         .replace("upsamplers.0.", "upsample."))
                renamed = f"{original}.{level}.{inner}"
        renamed = renamed.replace("conv_shortcut.", "nin_shortcut.")
        converted[f"first_stage_model.{part}.{renamed}"] = tensor
    return converted


def clip_l_to_original(text_encoder, with_text_model_level: bool = True) -> dict[str, torch.Tensor]:
    """transformers 5 names the layers without `text_model.`; SDXL files have it (and some writers drop it)."""
    converted = {}
    for name, tensor in text_encoder.state_dict().items():
        name = name.removeprefix("text_model.")
        converted["conditioner.embedders.0.transformer." + ("text_model." if with_text_model_level else "") + name] = tensor
    return converted


OPEN_CLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                   ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


def open_clip_to_original(text_encoder) -> dict[str, torch.Tensor]:
    prefix = "conditioner.embedders.1.model."
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    converted = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
        prefix + "text_projection": state.pop("text_projection.weight").T.contiguous(),
        prefix + "logit_scale": torch.tensor(4.6052),
    }
    state.pop("embeddings.position_ids", None)
    for layer in range(text_encoder.config.num_hidden_layers):
        source, target = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            converted[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{source}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for name in [n for n in state if n.startswith(source)]:
            rest = name[len(source):]
            converted[target + _rename_top(rest, OPEN_CLIP_LAYER)] = state.pop(name)
    assert not state, f"unconverted OpenCLIP weights: {sorted(state)}"
    return converted


def save_original_sdxl(pipe, path, clip_l_text_model_level: bool = True) -> Path:
    """The whole pipeline as one safetensors file, as SDXL checkpoints are shared."""
    tensors = {**unet_to_original(pipe.unet), **vae_to_original(pipe.vae),
               **clip_l_to_original(pipe.text_encoder, clip_l_text_model_level),
               **open_clip_to_original(pipe.text_encoder_2)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)
