import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.pipeline.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    mean_cross_similarity,
    mean_paired_similarity,
    mean_self_similarity,
)


def _unit(n, d=8, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_identical_embeddings_have_similarity_one():
    a = _unit(1).repeat(4, 1)
    assert mean_cross_similarity(a, a) == pytest.approx(1.0)
    assert mean_self_similarity(a) == pytest.approx(1.0)
    assert mean_paired_similarity(a, a) == pytest.approx(1.0)


def test_cross_similarity_is_symmetric_and_self_similarity_skips_the_diagonal():
    a, b = _unit(3, seed=1), _unit(5, seed=2)
    assert mean_cross_similarity(a, b) == pytest.approx(mean_cross_similarity(b, a))
    expected = sum((a[i] @ a[j]).item() for i in range(3) for j in range(3) if i != j) / 6
    assert mean_self_similarity(a) == pytest.approx(expected)
    assert mean_paired_similarity(a, -a) == pytest.approx(-1.0)
    with pytest.raises(UserInputError, match="at least two"):
        mean_self_similarity(a[:1])


def test_feature_models_embed_identical_images_identically(feature_models):
    dino_dir, clip_dir = feature_models
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (48, 40), (200, 30, 30)),
              Image.new("RGB", (40, 48), (10, 200, 90))]
    for embedder in (DinoEmbedder(str(dino_dir)), ClipEmbedder(str(clip_dir))):
        embeddings = embedder.images(images)
        assert embeddings.norm(dim=-1) == pytest.approx(torch.ones(3), abs=1e-5)
        assert mean_cross_similarity(embeddings[:1], embeddings[1:2]) == pytest.approx(1.0, abs=1e-5)
    texts = ClipEmbedder(str(clip_dir)).texts(["a photo of a dog", "a photo of a dog", "a red mug"])
    assert mean_paired_similarity(texts[:1], texts[1:2]) == pytest.approx(1.0, abs=1e-5)


def test_a_missing_feature_model_is_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="could not load the DINO model"):
        DinoEmbedder(str(tmp_path / "nothing"))
