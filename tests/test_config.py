import math

import pytest

from dreambooth_moslora import MoSLoRAConfig


def test_defaults_follow_the_paper_setting():
    config = MoSLoRAConfig()
    assert config.rank == 4 and config.alpha == 4.0 and config.scaling == 1.0
    assert config.mixer_init == "orthogonal"
    assert config.target_modules == ("to_q", "to_k", "to_v", "to_out.0")


def test_scaling_is_alpha_over_rank_or_root_rank_with_rslora():
    assert MoSLoRAConfig(rank=8, alpha=4).scaling == 0.5
    assert MoSLoRAConfig(rank=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"mixer_init": "random"}, "mixer_init must be one of"),
        ({"a_init": "zeros"}, "a_init must be one of"),
        ({"target_modules": "to_q"}, "not one string"),
        ({"target_modules": ()}, "non-empty module names"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"mixer_init": "none", "train_mixer": False}, "needs a mixer"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoSLoRAConfig(**kwargs)


def test_dict_round_trip_and_unknown_fields():
    config = MoSLoRAConfig(rank=8, alpha=16, mixer_init="kaiming", target_modules=["q_proj"], dropout=0.1,
                           train_mixer=False)
    assert MoSLoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown MoSLoRA config fields: colour"):
        MoSLoRAConfig.from_dict({**config.to_dict(), "colour": "red"})
