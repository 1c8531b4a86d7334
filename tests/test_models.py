import shutil

import torch
from diffusers import AutoencoderKL

from dreambooth_moslora.models import load_base_models


def test_a_separate_vae_replaces_the_bases_without_the_bases_being_read(tiny_sdxl_dir, tmp_path):
    base = shutil.copytree(tiny_sdxl_dir, tmp_path / "base")
    for weights in (base / "vae").glob("*.safetensors"):
        weights.unlink()  # reading the base's VAE would now fail
    torch.manual_seed(1)
    AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae")).save_pretrained(tmp_path / "vae")
    models = load_base_models(str(base), vae_name_or_path=str(tmp_path / "vae"))
    expected = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in models.vae.state_dict().items())
