import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_moslora.world.personalization import (
    BenchmarkSettings,
    evaluation_prompts,
    results_table,
    run_benchmark,
    sign_flip_p_value,
    subject_backgrounds,
    summarize,
)
from dreambooth_moslora.world.subjects import SUBJECTS

ANALYZER_FILE = Path(__file__).resolve().parents[1] / "assets" / "world-analyzer.safetensors"


def test_sign_flip_test_is_exact_for_small_samples():
    assert sign_flip_p_value([0.1] * 9) == pytest.approx(2 / 512)
    assert sign_flip_p_value([0.1, -0.1] * 4) == 1.0
    assert 0.05 < sign_flip_p_value([0.3, -0.1, 0.2, -0.2, 0.1]) < 1.0


def test_prompts_name_backgrounds_the_subject_does_not_have():
    subject = SUBJECTS[0]
    settings = BenchmarkSettings("m", "a", "o", backgrounds_per_subject=3, images_per_prompt=2)
    prompts = evaluation_prompts(subject, settings, "sks")
    assert len(prompts) == 6 and prompts[0] == prompts[1]
    assert prompts[0][0] == f"a photo of a sks star on a {prompts[0][1]} background"
    assert not set(subject_backgrounds(subject, 8)) & set(subject.colours)
    class_prompt, background = evaluation_prompts(subject, settings, None)[0]
    assert "sks" not in class_prompt and class_prompt.endswith(f"star on a {background} background")
    assert class_prompt.split()[4] not in (background, *subject.colours)


def _run(subject, method, seed, fidelity):
    return {"subject": subject, "method": method, "seed": seed, "prior_preservation": False, "subject_fidelity": fidelity,
            "prompt_fidelity": 0.5, "class_shape_accuracy": 1.0, "class_subject_similarity": 0.2}


def test_summary_pairs_each_method_with_lora_on_the_same_subject_and_seed():
    runs = [_run(s, "lora", seed, 0.5 + 0.1 * seed) for s in ("a", "b") for seed in (0, 1)]
    runs += [_run(s, "moslora-orthogonal", seed, 0.6 + 0.1 * seed) for s in ("a", "b") for seed in (0, 1)]
    floor = {m: 0.1 for m in ("subject_fidelity", "prompt_fidelity", "class_shape_accuracy", "class_subject_similarity")}
    results = {"settings": {"methods": ["lora", "moslora-orthogonal"], "prior_preservation": [False]},
               "subjects": {"a": {"real_vs_real": 0.9, "untrained": floor}, "b": {"real_vs_real": 0.8, "untrained": floor}},
               "runs": runs}
    summary = summarize(results)
    assert summary["methods"]["lora|no prior"]["subject_fidelity"]["mean"] == pytest.approx(0.55)
    paired = summary["paired_vs_lora"]["moslora-orthogonal|no prior"]["subject_fidelity"]
    assert paired["mean_difference"] == pytest.approx(0.1) and paired["pairs"] == 4
    assert paired["p_value"] == pytest.approx(2 / 16)
    results["summary"] = summary
    table = results_table(results)
    assert "| moslora-orthogonal | no prior | 0.650 ± 0.058" in table
    assert "real vs real (ceiling) | | 0.850 ± 0.071" in table


def test_the_benchmark_runs_end_to_end_and_the_control_keeps_its_mixer(untrained_mini_dir, tmp_path, fresh_accelerate):
    settings = BenchmarkSettings(
        base_model=str(untrained_mini_dir), analyzer_file=str(ANALYZER_FILE), output_dir=str(tmp_path),
        subjects=(SUBJECTS[0].name,), methods=("lora", "moslora-orthogonal", "fixed-orthogonal"), seeds=(0,),
        prior_preservation=(False, True), prior_methods=("lora", "fixed-orthogonal"), steps=2, num_class_images=2, backgrounds_per_subject=2,
        images_per_prompt=1, inference_steps=2,
    )
    results = run_benchmark(settings, log=lambda _: None)
    assert len(results["runs"]) == 5
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["paired_vs_lora"].keys() == {"moslora-orthogonal|no prior", "fixed-orthogonal|no prior", "fixed-orthogonal|prior"}
    assert "fixed-orthogonal" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert len(list((tmp_path / "class-images" / SUBJECTS[0].name).glob("*.png"))) == 2
    for method, frozen in (("fixed-orthogonal", True), ("moslora-orthogonal", False)):
        weights = load_file(str(tmp_path / "runs" / SUBJECTS[0].name / f"{method}-seed0-noprior" / "moslora.safetensors"))
        mixer = next(v for k, v in weights.items() if k.endswith("lora_mixer.weight"))
        off_identity = (mixer @ mixer.T - torch.eye(mixer.shape[0])).abs().max().item()
        assert (off_identity < 1e-5) == frozen, (method, off_identity)
