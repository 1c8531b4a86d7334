import torch

from dreambooth_moslora.adapter.functional import delta_weight, fold_mixer, low_rank_forward, low_rank_svd, truncate_lora


def _factors(rank=3, features_in=7, features_out=5, mixer=True):
    torch.manual_seed(1)
    return (
        torch.randn(rank, features_in, dtype=torch.float64),
        torch.randn(rank, rank, dtype=torch.float64) if mixer else None,
        torch.randn(features_out, rank, dtype=torch.float64),
    )


def test_delta_weight_is_scaled_b_m_a():
    lora_A, mixer, lora_B = _factors()
    torch.testing.assert_close(delta_weight(lora_A, mixer, lora_B, 0.5), 0.5 * lora_B @ mixer @ lora_A)


def test_without_a_mixer_delta_weight_is_plain_lora():
    lora_A, _, lora_B = _factors(mixer=False)
    torch.testing.assert_close(delta_weight(lora_A, None, lora_B, 2.0), 2.0 * lora_B @ lora_A)


def test_folded_pair_reproduces_the_update_exactly():
    lora_A, mixer, lora_B = _factors()
    down, up = fold_mixer(lora_A, mixer, lora_B, 0.25)
    assert down.shape == lora_A.shape and up.shape == lora_B.shape
    torch.testing.assert_close(up @ down, delta_weight(lora_A, mixer, lora_B, 0.25))


def test_low_rank_forward_equals_the_dense_update_on_batched_tokens():
    lora_A, mixer, lora_B = _factors()
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    expected = x @ delta_weight(lora_A, mixer, lora_B, 0.5).T
    torch.testing.assert_close(low_rank_forward(x, lora_A, mixer, lora_B, 0.5), expected)


def test_low_rank_svd_matches_the_dense_svd_without_forming_it():
    lora_A, mixer, lora_B = _factors(rank=3, features_in=9, features_out=6)
    down, up = fold_mixer(lora_A, mixer, lora_B, 0.5)
    left, singular_values, right = low_rank_svd(down, up)
    torch.testing.assert_close(singular_values, torch.linalg.svdvals(up @ down)[:3])
    torch.testing.assert_close(left * singular_values @ right, up @ down)


def test_truncate_lora_keeps_the_largest_directions():
    lora_A, mixer, lora_B = _factors(rank=3, features_in=9, features_out=6)
    down, up = fold_mixer(lora_A, mixer, lora_B, 1.0)
    small_down, small_up = truncate_lora(down, up, 2)
    assert small_down.shape == (2, 9) and small_up.shape == (6, 2)
    singular_values = torch.linalg.svdvals(up @ down)
    error = torch.linalg.matrix_norm(up @ down - small_up @ small_down)
    torch.testing.assert_close(error, singular_values[2:].norm())


def test_under_autocast_the_mixer_product_stays_in_the_adapter_dtype():
    lora_A, mixer, lora_B = (t.float() for t in _factors(rank=3, features_in=7, features_out=5))
    x = torch.randn(4, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = low_rank_forward(x, lora_A, mixer, lora_B, 1.0)
    torch.testing.assert_close(mixed.float(), x @ (lora_B @ mixer @ lora_A).T, rtol=3e-2, atol=3e-2)
