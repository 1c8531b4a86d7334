import numpy as np
import pytest

from dreambooth_moslora.world.report import (comparison_table, curve_plot, curve_summary, results_table,
                                             sign_flip_p_value, summarize)


def test_sign_flip_test_is_exact_for_small_samples():
    assert sign_flip_p_value([0.1] * 9) == pytest.approx(2 / 512)
    assert sign_flip_p_value([0.1, -0.1] * 4) == 1.0
    assert 0.05 < sign_flip_p_value([0.3, -0.1, 0.2, -0.2, 0.1]) < 1.0


def _run(subject, method, seed, fidelity):
    return {"subject": subject, "method": method, "seed": seed, "prior_preservation": False, "step": 100 * (seed + 1),
            "subject_fidelity": fidelity,
            "normalized_fidelity": fidelity, "oracle_normalized_fidelity": fidelity, "prompt_fidelity": 0.5,
            "class_shape_accuracy": 1.0, "class_subject_similarity": 0.2}


def test_summary_pairs_each_method_with_lora_on_the_same_subject_and_seed():
    runs = [_run(s, "lora", seed, 0.5 + 0.1 * seed) for s in ("a", "b") for seed in (0, 1)]
    runs += [_run(s, "moslora-orthogonal", seed, 0.6 + 0.1 * seed) for s in ("a", "b") for seed in (0, 1)]
    floor = {m: 0.1 for m in ("subject_fidelity", "prompt_fidelity", "class_shape_accuracy", "class_subject_similarity")}
    results = {"settings": {"methods": ["lora", "moslora-orthogonal"]},
               "subjects": {"a": {"real_vs_real": 0.9, "oracle": 0.8, "untrained": floor},
                            "b": {"real_vs_real": 0.8, "oracle": 0.7, "untrained": floor}},
               "runs": runs}
    summary = summarize(results)
    assert summary["methods"]["lora|no prior"]["subject_fidelity"]["mean"] == pytest.approx(0.55)
    paired = summary["paired_vs_lora"]["moslora-orthogonal|no prior"]["subject_fidelity"]
    assert paired["mean_difference"] == pytest.approx(0.1) and paired["pairs"] == 4
    assert paired["p_value"] == pytest.approx(2 / 16)
    results["summary"] = summary
    table = results_table(results)
    assert "| moslora-orthogonal | no prior | 0.650 ± 0.058" in table
    assert "real vs real (ceiling) | | 0.850 ± 0.071" in table and "through the VAE | | 0.750 ± 0.071" in table
    assert "| moslora-orthogonal | no prior | b | 0.650 | 0.650 | 1.000 | 100, 200 |" in table  # per subject, each seed's step


def test_two_benchmarks_pair_run_by_run():
    before = {"runs": [_run(s, "lora", seed, 0.5) for s in ("a", "b") for seed in (0, 1)]}
    after = {"runs": [_run(s, "lora", seed, 0.5 + 0.1 * seed) for s in ("a", "b") for seed in (0, 1, 2)]
             + [_run("a", "moslora-orthogonal", 0, 0.9)]}  # no counterpart: not compared
    table = comparison_table(before, after)
    assert "| lora | no prior | 4 | +0.050 | 0.50 | +0.000 | 1.00 |" in table  # seed 2 has no pair
    assert "moslora-orthogonal" not in table


def test_curves_average_over_subjects_and_seeds_and_plot():
    results = {"curves": [{"method": "lora", "step": s, "normalized_fidelity": v}
                          for s, v in ((100, 0.2), (100, 0.4), (200, 0.5), (200, 0.7))]}
    curves = curve_summary(results)
    assert [(s, round(m, 6)) for s, m, _ in curves["lora"]] == [(100, 0.3), (200, 0.6)]
    image = curve_plot(curves, "title", "y")
    assert image.size == (560, 360) and len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 2
