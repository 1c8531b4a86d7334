import json

import pytest
import torch
from torch import nn

from dreambooth_moslora import MoSLoRAConfig, inject_moslora, moslora_parameters
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.checkpoint import (
    checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(6, 6)
        self.to_v = nn.Linear(6, 6)
        self.config = type("Config", (), {"layers_per_block": 1, "down_block_types": ("A",)})()


def _trained(seed=0, config=MoSLoRAConfig(rank=2)):
    torch.manual_seed(seed)
    model = Tiny()
    inject_moslora(model, config)
    optimizer = torch.optim.AdamW(moslora_parameters(model), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        model.to_v(model.to_q(torch.randn(4, 6))).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_save_and_load_restore_adapter_optimizer_and_schedule(tmp_path):
    model, optimizer, scheduler = _trained(seed=0)
    path = save_checkpoint(tmp_path, 3, {"unet": model}, optimizer, scheduler, base_model="tiny")
    assert path.name == "checkpoint-3" and not list(tmp_path.glob(".*tmp"))
    other, other_optimizer, other_scheduler = _trained(seed=1)
    other_scheduler.step()  # a schedule elsewhere than the saved one's, so loading it shows
    assert load_checkpoint(path, {"unet": other}, other_optimizer, other_scheduler) == 3
    for a, b in zip(moslora_parameters(model), moslora_parameters(other)):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), other_optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert other_scheduler.last_epoch == 3 and other_scheduler.get_last_lr() == pytest.approx([1e-2 / 4])
    assert json.loads((path / "training_state.json").read_text())["global_step"] == 3


def test_a_checkpoint_of_another_adapter_config_is_refused(tmp_path):
    model, optimizer, scheduler = _trained()
    path = save_checkpoint(tmp_path, 1, {"unet": model}, optimizer, scheduler, base_model="tiny")
    other, other_optimizer, other_scheduler = _trained(config=MoSLoRAConfig(rank=2, mixer_init="kaiming"))
    with pytest.raises(UserInputError, match="trained with another unet adapter"):
        load_checkpoint(path, {"unet": other}, other_optimizer, other_scheduler)


def test_latest_pruning_and_bad_paths(tmp_path):
    model, optimizer, scheduler = _trained()
    assert resolve_checkpoint(tmp_path, "latest") is None
    for step in (2, 10, 4):
        save_checkpoint(tmp_path, step, {"unet": model}, optimizer, scheduler, base_model="tiny")
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-10"
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
    with pytest.raises(UserInputError, match="not a training checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def test_the_fp16_grad_scaler_is_saved_and_restored(tmp_path):
    """A CPU GradScaler stands in for the CUDA one that fp16 training on a GPU keeps."""
    model, optimizer, scheduler = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    scaler.update(new_scale=1024.0)
    scaler._growth_tracker = torch.tensor(2, dtype=torch.int32)
    path = save_checkpoint(tmp_path, 3, {"unet": model}, optimizer, scheduler, base_model="tiny", grad_scaler=scaler)
    other, other_optimizer, other_scheduler = _trained(seed=1)
    restored = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    load_checkpoint(path, {"unet": other}, other_optimizer, other_scheduler, grad_scaler=restored)
    assert restored.get_scale() == 1024.0 and restored.state_dict() == scaler.state_dict()
