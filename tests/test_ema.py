"""The adapter's moving average: its arithmetic, its swap in and out, and a run that exports it and resumes it."""

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch import nn

from conftest import training_argv
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.ema import AdapterEMA
from dreambooth_moslora.trainer.train import train
from helpers import write_images

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_the_average_is_diffusers_emamodels_step_for_step_and_swaps_in_and_out():
    from diffusers.training_utils import EMAModel

    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(3, generator=generator))
    ema = AdapterEMA({"w": weight}, decay=0.9)
    reference = EMAModel([weight], decay=0.9)
    for step in range(1, 40):
        with torch.no_grad():
            weight.add_(torch.randn(3, generator=generator))
        ema.update(step)
        reference.step([weight])
        torch.testing.assert_close(ema.shadow["w"], reference.shadow_params[0], rtol=1e-6, atol=1e-6)
    trained = weight.detach().clone()
    with ema.applied():
        assert torch.equal(weight.detach(), ema.shadow["w"])
    assert torch.equal(weight.detach(), trained)


@pytest.fixture
def subject(tmp_path):
    write_images(tmp_path / "subject", sizes=((64, 64), (64, 64), (64, 64)))
    return tmp_path / "subject"


def _run(tiny_sdxl_dir, subject, out, *extra):
    result = train(parse_args(training_argv(tiny_sdxl_dir, subject, out, "--use_ema", "--ema_decay", "0.8",
                                            "--checkpointing_steps", "2", *extra, steps=None)))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def test_checkpoints_and_the_export_hold_the_average_element_for_element(tiny_sdxl_dir, subject, tmp_path,
                                                                          monkeypatch):
    """The average is recomputed here by diffusers' EMAModel from the weights after each step, so a checkpoint that
    kept the trained weights (or an average one step off) fails."""
    from diffusers.training_utils import EMAModel

    from dreambooth_moslora.trainer import ema as ema_module

    references, update = {}, ema_module.AdapterEMA.update

    def update_both(self, step):
        if not references:
            references.update(names=list(self.parameters), model=EMAModel(
                [self.shadow[name].clone() for name in self.parameters], decay=self.decay))
        references["model"].step([p.detach().clone().requires_grad_() for p in self.parameters.values()])
        references[step] = [t.clone() for t in references["model"].shadow_params]
        update(self, step)

    monkeypatch.setattr(ema_module.AdapterEMA, "update", update_both)
    _run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "4", "--ema_device", "cpu")
    for step in (2, 4):
        saved = load_file(tmp_path / "out" / f"checkpoint-{step}" / "moslora.safetensors")
        averaged = dict(zip(references["names"], references[step]))
        for name, average in averaged.items():  # "unet.<module>.lora_B" is "unet.<module>.lora_B.weight" there
            torch.testing.assert_close(saved[f"{name}.weight"], average, rtol=1e-5, atol=1e-6)
    exported = load_file(tmp_path / "out" / "moslora.safetensors")
    last = load_file(tmp_path / "out" / "checkpoint-4" / "moslora.safetensors")
    assert all(torch.equal(exported[k], last[k]) for k in exported)
    assert "moving average" in (tmp_path / "out" / "README.md").read_text()


def test_resuming_continues_the_trained_weights_and_their_average_exactly(tiny_sdxl_dir, subject, tmp_path):
    _run(tiny_sdxl_dir, subject, tmp_path / "straight", "--max_train_steps", "4", "--ema_device", "cpu")
    _run(tiny_sdxl_dir, subject, tmp_path / "resumed", "--max_train_steps", "2")
    _run(tiny_sdxl_dir, subject, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    for name in ("moslora.safetensors", "checkpoint-4/trained_weights.safetensors"):
        straight, resumed = (load_file(tmp_path / run / name) for run in ("straight", "resumed"))
        assert straight.keys() == resumed.keys()
        assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight), name
    trained = load_file(tmp_path / "straight" / "checkpoint-4" / "trained_weights.safetensors")
    exported = load_file(tmp_path / "straight" / "moslora.safetensors")
    b = next(k for k in trained if k.endswith("lora_B"))
    assert not torch.allclose(trained[b], exported[f"{b}.weight"])  # the average lags the trained weights


def test_resuming_with_ema_from_a_run_without_it_is_refused(tiny_sdxl_dir, subject, tmp_path):
    train(parse_args(training_argv(tiny_sdxl_dir, subject, tmp_path / "out", "--checkpointing_steps", "1", steps=1)))
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(UserInputError, match="trained without --use_ema"):
        _run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")


def test_resuming_an_ema_checkpoint_without_ema_goes_on_from_the_trained_weights(tiny_sdxl_dir, subject, tmp_path,
                                                                                caplog):
    """It once went on from the average (the checkpoint's adapter file) and said nothing."""
    import logging

    _run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "2")
    with caplog.at_level(logging.WARNING, logger="dreambooth_moslora"):
        train(parse_args(training_argv(tiny_sdxl_dir, subject, tmp_path / "out", "--checkpointing_steps", "2",
                                       "--resume_from_checkpoint", "latest", steps=2)))  # no step left to take
    trained = load_file(tmp_path / "out" / "checkpoint-2" / "trained_weights.safetensors")
    exported = load_file(tmp_path / "out" / "moslora.safetensors")
    assert all(torch.equal(exported[f"{k}.weight"], trained[k]) for k in trained)
    assert "the moving average is dropped" in caplog.text
