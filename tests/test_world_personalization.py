import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_moslora.world import personalization
from dreambooth_moslora.world.personalization import (
    BenchmarkSettings,
    choose_checkpoint,
    choose_setting,
    evaluation_prompts,
    run_benchmark,
    subject_backgrounds,
    tune,
    validation_backgrounds,
)
from dreambooth_moslora.world.subjects import SUBJECTS, TUNING_SUBJECTS

ANALYZER_FILE = Path(__file__).resolve().parents[1] / "assets" / "world-analyzer.safetensors"


def test_prompts_name_backgrounds_the_subject_does_not_have():
    subject = SUBJECTS[0]
    assert (subject.class_noun, subject.colours) == ("star", ("red", "yellow"))
    settings = BenchmarkSettings("m", "a", "o", backgrounds_per_subject=3, images_per_prompt=2)
    # the world's colours in order (red, orange, yellow, green, blue, ...) less the star's red and yellow
    assert evaluation_prompts(subject, settings, "sks") == [
        (f"a photo of a sks star on a {bg} background", bg) for bg in ("orange", "orange", "green", "green", "blue",
                                                                       "blue")]
    # the class: a star of another background's colour, never its own background's
    assert evaluation_prompts(subject, settings, None) == [
        (f"a photo of a {colour} star on a {bg} background", bg)
        for colour, bg in (("green", "orange"),) * 2 + (("blue", "green"),) * 2 + (("orange", "blue"),) * 2]
    assert subject_backgrounds(subject, 8) == ["orange", "green", "blue", "purple", "white", "black"]


def test_the_chosen_setting_keeps_the_class_when_any_does():
    rows = [{"learning_rate": 1e-4, "step": 200, "subject_fidelity": 0.5, "class_shape_accuracy": 1.0},
            {"learning_rate": 1e-3, "step": 100, "subject_fidelity": 0.6, "class_shape_accuracy": 0.95},
            {"learning_rate": 1e-3, "step": 200, "subject_fidelity": 0.7, "class_shape_accuracy": 0.2}]
    assert choose_setting(rows, 0.9) == {"learning_rate": 1e-3, "steps": 100}
    assert choose_setting(rows, 0.99) == {"learning_rate": 1e-4, "steps": 200}
    assert choose_setting(rows[2:], 0.9) == {"learning_rate": 1e-3, "steps": 200}  # none keeps it: the best fidelity


def test_a_checkpoint_is_chosen_by_its_validation_measures_not_the_reported_ones():
    points = [{"step": 100, "subject_fidelity": 0.9, "validation_subject_fidelity": 0.5, "validation_class_shape_accuracy": 1.0},
              {"step": 200, "subject_fidelity": 0.1, "validation_subject_fidelity": 0.6, "validation_class_shape_accuracy": 0.95},
              {"step": 400, "subject_fidelity": 0.2, "validation_subject_fidelity": 0.7, "validation_class_shape_accuracy": 0.5}]
    assert choose_checkpoint(points) == 200
    assert choose_checkpoint(points, min_class_shape_accuracy=0.4) == 400
    settings = BenchmarkSettings("m", "a", "o", backgrounds_per_subject=4, validation_backgrounds=2, images_per_prompt=1,
                                 validation_images_per_prompt=1)
    # the star's backgrounds are orange, green, blue, purple, white, black: the reported measures take four
    assert [bg for _, bg in evaluation_prompts(SUBJECTS[0], settings, "sks")] == ["orange", "green", "blue", "purple"]
    assert validation_backgrounds(SUBJECTS[0], settings) == ["white", "black"]
    assert [bg for _, bg in evaluation_prompts(SUBJECTS[0], settings, "sks", validation=True)] == ["white", "black"]


def _settings(base, tmp_path, **changes):
    common = dict(base_model=str(base), analyzer_file=str(ANALYZER_FILE), output_dir=str(tmp_path),
                  subjects=(SUBJECTS[0].name,), seeds=(0,), steps=4, curve_steps=(2, 4), num_class_images=2,
                  backgrounds_per_subject=2, images_per_prompt=1, validation_images_per_prompt=1, inference_steps=2)
    return BenchmarkSettings(**{**common, **changes})


def test_the_benchmark_runs_end_to_end_and_the_control_keeps_its_mixer(untrained_mini_dir, tmp_path, fresh_accelerate):
    settings = _settings(untrained_mini_dir, tmp_path, methods=("lora", "moslora-orthogonal", "fixed-orthogonal"),
                         ablation_methods=("lora",), tuned={"moslora-orthogonal": {"learning_rate": 2e-3, "steps": 2}},
                         text_encoder_lr_scale=3.0, trigger_embedding_lr=5e-3)
    results = run_benchmark(settings, log=lambda _: None)
    assert [(r["method"], r["prior_preservation"]) for r in results["runs"]] == [
        ("lora", True), ("moslora-orthogonal", True), ("fixed-orthogonal", True), ("lora", False)]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["paired_vs_lora"].keys() == {"moslora-orthogonal|prior", "fixed-orthogonal|prior"}
    subject = saved["subjects"][SUBJECTS[0].name]
    assert 0 < subject["oracle"] <= 1
    assert {(c["method"], c["step"]) for c in saved["curves"]} == {(m, s) for m in ("lora", "moslora-orthogonal")
                                                                   for s in (2, 4)}
    for name in ("results.md", "samples.png", "fidelity-vs-steps.png"):
        assert (tmp_path / name).stat().st_size > 0
    reported = {r["method"]: r for r in saved["runs"] if r["prior_preservation"]}
    # the tuned method at its tuned step (a checkpoint), the others at the runs' end
    assert {m: r["step"] for m, r in reported.items()} == {"lora": 4, "moslora-orthogonal": 2, "fixed-orthogonal": 4}
    floor = subject["untrained"]["subject_fidelity"]
    for run in reported.values():  # 0 at the untrained model, 1 at the ceiling
        fidelity = run["subject_fidelity"]
        assert run["normalized_fidelity"] == pytest.approx((fidelity - floor) / (subject["real_vs_real"] - floor))
        assert run["oracle_normalized_fidelity"] == pytest.approx((fidelity - floor) / (subject["oracle"] - floor))
    runs = tmp_path / "runs" / SUBJECTS[0].name
    state = json.loads((runs / "moslora-orthogonal-lr0.002-seed0-prior" / "checkpoint-2" / "training_state.json").read_text())
    # its own rate; the text encoders' 3x; the trigger's own
    assert state["lr_scheduler"]["base_lrs"] == pytest.approx([2e-3, 6e-3, 5e-3])
    classes = sorted((tmp_path / "class-images" / SUBJECTS[0].name).glob("*.txt"))
    assert len(classes) == 2 and len({c.read_text() for c in classes}) == 2  # made from two coloured class prompts
    assert all(" star on a " in c.read_text() and c.read_text().split()[4] != "star" for c in classes)
    captions = sorted((tmp_path / "instance-images" / SUBJECTS[0].name).glob("*.txt"))
    assert len(captions) == 5 and all(c.read_text().startswith("a photo of a sks star on a ") for c in captions)
    for method, frozen in (("fixed-orthogonal", True), ("moslora-orthogonal", False)):
        weights = load_file(str(next(runs.glob(f"{method}-*-prior")) / "moslora.safetensors"))
        mixer = next(v for k, v in weights.items() if k.endswith("lora_mixer.weight"))
        off_identity = (mixer @ mixer.T - torch.eye(mixer.shape[0])).abs().max().item()
        assert (off_identity < 1e-5) == frozen, (method, off_identity)
        assert {"trigger.text_encoder", "trigger.text_encoder_2"} <= weights.keys()


def test_tuning_uses_the_tuning_subject_and_writes_the_grid(untrained_mini_dir, tmp_path, fresh_accelerate):
    settings = _settings(untrained_mini_dir, tmp_path, methods=("lora",), prior_mode="base_model",
                         train_text_encoder=False)
    subject = TUNING_SUBJECTS[1]
    tuning = tune(settings, (1e-4, 1e-3), subject=subject, log=lambda _: None)
    assert tuning["subject"] == subject.name not in [s.name for s in SUBJECTS]
    assert (tmp_path / "instance-images" / subject.name).is_dir()
    assert {(r["learning_rate"], r["step"]) for r in tuning["grid"]} == {(1e-4, 2), (1e-4, 4), (1e-3, 2), (1e-3, 4)}
    chosen = tuning["chosen"]["lora"]
    assert chosen in [{"learning_rate": r["learning_rate"], "steps": r["step"]} for r in tuning["grid"]]
    assert (tmp_path / "tuning.md").read_text().count("✓") == 1
    ticked = next(line for line in (tmp_path / "tuning.md").read_text().splitlines() if "✓" in line)
    assert ticked.startswith(f"| lora | {chosen['learning_rate']:g} | {chosen['steps']} |")
    def refuse(*_args, **_kwargs):
        raise AssertionError("a measured run was trained or measured again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(personalization, "_train_adapter", refuse)
        patch.setattr(personalization.SubjectBench, "measure_adapter", refuse)
        again = tune(settings, (1e-4, 1e-3), subject=subject, log=lambda _: None)
    assert again["grid"] == tuning["grid"]
    assert not (tmp_path / "class-images").exists()  # the base-model prior needs no class images


def test_selecting_checkpoints_reports_each_run_at_its_validation_choice(untrained_mini_dir, tmp_path, fresh_accelerate,
                                                                        monkeypatch):
    """Measures made up per checkpoint, so the answer is known: validation prefers step 2, the reported measures
    step 4; the run is reported at step 2, with step 2's reported measures."""
    reported, chosen_by = {2: 0.1, 4: 0.8}, {2: 0.9, 4: 0.5}
    measure_adapter = personalization.SubjectBench.measure_adapter

    def measured(self, adapter, validation=False):
        metrics, samples = measure_adapter(self, adapter, validation)
        step = 2 if "checkpoint-2" in str(adapter) else 4
        metrics["subject_fidelity"] = reported[step]
        if validation:
            metrics.update(validation_subject_fidelity=chosen_by[step], validation_class_shape_accuracy=1.0)
        return metrics, samples

    monkeypatch.setattr(personalization.SubjectBench, "measure_adapter", measured)
    settings = _settings(untrained_mini_dir, tmp_path, methods=("lora",), ablation_methods=(), prior_mode="base_model",
                         train_text_encoder=False, select_checkpoint=True, curve_methods=())
    results = run_benchmark(settings, log=lambda _: None)
    (run,) = results["runs"]
    assert run["step"] == 2 and run["subject_fidelity"] == 0.1
    record = json.loads((tmp_path / "runs" / SUBJECTS[0].name / "lora-lr0.001-seed0-prior" / "metrics.json").read_text())
    assert [(p["step"], p["validation_subject_fidelity"]) for p in record["curve"]] == [(2, 0.9), (4, 0.5)]
    assert f"| {SUBJECTS[0].name} |" in (tmp_path / "results.md").read_text()
