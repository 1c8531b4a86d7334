from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.world.analyzer import (
    ATTRIBUTES,
    FEATURES,
    accuracy,
    analyze,
    embed,
    load_analyzer,
    save_analyzer,
    train_analyzer,
)
from dreambooth_moslora.world.render import Scene, render, sample_scene
from dreambooth_moslora.world.subjects import SUBJECTS, render_subject

ANALYZER_FILE = Path(__file__).resolve().parents[1] / "assets" / "world-analyzer.safetensors"


@pytest.fixture(scope="module")
def analyzer():
    return load_analyzer(ANALYZER_FILE)


def test_the_shipped_analyzer_reads_every_attribute_of_fresh_renders(analyzer):
    rng = np.random.default_rng(2024)  # not a seed the analyzer was trained or validated with
    scenes = [sample_scene(rng) for _ in range(400)]
    found = accuracy(analyzer, [render(s) for s in scenes], scenes)
    assert set(found) == set(ATTRIBUTES)
    assert all(value >= 0.95 for value in found.values()), found


def test_analyze_names_the_attributes(analyzer):
    image = render(Scene("heart", "orange", "blue", size=0.33))
    assert analyze(analyzer, [image]) == [{"shape": "heart", "colour": "orange", "background": "blue"}]


def test_embeddings_are_unit_vectors_that_tell_subjects_apart(analyzer):
    rng = np.random.default_rng(0)
    groups = [embed(analyzer, [render_subject(s, rng) for _ in range(6)]) for s in SUBJECTS]
    assert groups[0].shape == (6, FEATURES)
    torch.testing.assert_close(groups[0].norm(dim=-1), torch.ones(6))
    within = [(g @ g.T).mean().item() for g in groups]
    across = [(a @ b.T).mean().item() for i, a in enumerate(groups) for b in groups[i + 1:]]
    assert min(within) > max(across)


def test_training_is_reproducible_and_the_file_round_trips(tmp_path):
    first, again = train_analyzer(steps=2, batch_size=8, seed=3, log=lambda _: None), train_analyzer(steps=2, batch_size=8, seed=3, log=lambda _: None)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    save_analyzer(first, tmp_path / "analyzer.safetensors")
    reloaded = load_analyzer(tmp_path / "analyzer.safetensors")
    image = [render(Scene("star", "red", "white"))]
    torch.testing.assert_close(embed(reloaded, image), embed(first, image))


def test_a_file_that_is_not_an_analyzer_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserInputError, match="not a world analyzer file"):
        load_analyzer(tmp_path / "other.safetensors")
