"""The adapter's moving average: its arithmetic, its swap in and out, and a run that exports it and resumes it."""

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch import nn

from conftest import training_argv
from dreambooth_moslora.arguments import parse_args
from dreambooth_moslora.ema import AdapterEMA
from dreambooth_moslora.errors import UserInputError
from dreambooth_moslora.train import train
from helpers import write_images

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_the_average_follows_the_warmed_up_decay_and_swaps_in_and_out():
    weight = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = AdapterEMA({"w": weight}, decay=0.9)
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 6.0]))
    ema.update(step=1)  # warm-up: min(0.9, 2 / 11)
    keep = 2 / 11
    expected = torch.tensor([1.0, 2.0]) * keep + torch.tensor([3.0, 6.0]) * (1 - keep)
    assert torch.allclose(ema.shadow["w"], expected)
    assert ema.decay_at(1000) == 0.9
    with ema.applied():
        assert torch.allclose(weight, expected)
    assert torch.equal(weight.detach(), torch.tensor([3.0, 6.0]))


@pytest.fixture
def subject(tmp_path):
    write_images(tmp_path / "subject", sizes=((64, 64), (64, 64), (64, 64)))
    return tmp_path / "subject"


def _run(tiny_sdxl_dir, subject, out, *extra):
    result = train(parse_args(training_argv(tiny_sdxl_dir, subject, out, "--use_ema", "--ema_decay", "0.8",
                                            "--checkpointing_steps", "2", *extra, steps=None)))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def test_the_exported_adapter_is_the_average_and_resuming_continues_it_exactly(tiny_sdxl_dir, subject, tmp_path):
    _run(tiny_sdxl_dir, subject, tmp_path / "straight", "--max_train_steps", "4", "--ema_device", "cpu")
    _run(tiny_sdxl_dir, subject, tmp_path / "resumed", "--max_train_steps", "2")
    _run(tiny_sdxl_dir, subject, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    exported = load_file(tmp_path / "straight" / "moslora.safetensors")
    trained = load_file(tmp_path / "straight" / "checkpoint-4" / "moslora.safetensors")
    b = next(k for k in exported if k.endswith("lora_B.weight"))
    assert not torch.allclose(exported[b], trained[b])  # the average lags the trained weights
    resumed = load_file(tmp_path / "resumed" / "moslora.safetensors")
    assert all(torch.allclose(exported[k], resumed[k], atol=1e-6) for k in exported)
    assert "moving average" in (tmp_path / "straight" / "README.md").read_text()


def test_resuming_with_ema_from_a_run_without_it_is_refused(tiny_sdxl_dir, subject, tmp_path):
    train(parse_args(training_argv(tiny_sdxl_dir, subject, tmp_path / "out", "--checkpointing_steps", "1", steps=1)))
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(UserInputError, match="trained without --use_ema"):
        _run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
