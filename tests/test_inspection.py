import math

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_moslora.adapter.inject import moslora_layers
from dreambooth_moslora.adapter.io import DIFFUSERS_FILE, KOHYA_FILE, NATIVE_FILE
from dreambooth_moslora.verbs.inspection import effective_rank, format_report, inspect_adapter


def test_effective_rank_known_cases():
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert 1 < effective_rank(torch.tensor([4.0, 1.0])) < 2
    assert effective_rank(torch.zeros(4)) == 0.0


def test_native_report(trained):
    report = inspect_adapter(trained["dir"])
    assert report["format"] == "native" and report["base_model"] == "tiny"
    assert report["components"] == ["text_encoder", "text_encoder_2", "unet"]
    assert report["configs"]["unet"]["mixer_init"] == "orthogonal" and report["configs"]["unet"]["alpha"] == 2
    assert report["parameters"] == sum(t.numel() for t in load_file(trained["dir"] / NATIVE_FILE).values())
    name = "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"
    module = report["modules"][name]
    dense = moslora_layers(trained["pipe"].unet)[name.removeprefix("unet.")].delta_weight()
    expected = torch.linalg.svdvals(dense.double())[:4].tolist()
    assert module["top_singular_values"] == pytest.approx(expected, rel=1e-4)
    assert 1 <= module["effective_rank"] <= 4
    text = format_report(report)
    assert "mixer orthogonal" in text and name in text


@pytest.mark.parametrize("name, kind", [(DIFFUSERS_FILE, "diffusers"), (KOHYA_FILE, "kohya")])
def test_plain_lora_reports_carry_the_same_spectrum(trained, name, kind):
    native = inspect_adapter(trained["dir"] / NATIVE_FILE)
    report = inspect_adapter(trained["dir"] / name)
    assert report["format"] == kind and report["base_model"] == "tiny"
    assert len(report["modules"]) == len(native["modules"])
    spectra = sorted(m["top_singular_values"][0] for m in report["modules"].values())
    expected = sorted(m["top_singular_values"][0] for m in native["modules"].values())
    assert spectra == pytest.approx(expected, rel=1e-4)
    assert all(math.isfinite(m["effective_rank"]) for m in report["modules"].values())
