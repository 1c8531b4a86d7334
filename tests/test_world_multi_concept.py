"""The two-subjects benchmark at toy size: each subject alone and both from one dataset file, measured per subject
with its own trigger, leakage included; adapters already trained are not trained again."""

import json
from pathlib import Path

import pytest

from dreambooth_moslora.trainer.dataset_config import load_dataset_config
from dreambooth_moslora.world import multi_concept
from dreambooth_moslora.world.multi_concept import MEASURES, run_multi_concept
from dreambooth_moslora.world.personalization import BenchmarkSettings
from dreambooth_moslora.world.subjects import SUBJECTS

ANALYZER_FILE = Path(__file__).resolve().parents[1] / "assets" / "world-analyzer.safetensors"


def test_two_subjects_alone_and_together_are_measured_each_with_its_trigger(untrained_mini_dir, tmp_path,
                                                                           fresh_accelerate, monkeypatch):
    settings = BenchmarkSettings(base_model=str(untrained_mini_dir), analyzer_file=str(ANALYZER_FILE),
                                 output_dir=str(tmp_path), seeds=(0,), steps=2, prior_mode="base_model",
                                 class_prompts=2, backgrounds_per_subject=1, images_per_prompt=1, inference_steps=2,
                                 instance_images=2, train_text_encoder=False)
    pair = (SUBJECTS[0].name, SUBJECTS[1].name)
    results = run_multi_concept(settings, pair, log=lambda _: None)
    star, egg = pair
    assert [(r["adapter"], r["subject"]) for r in results["runs"]] == [
        ("untrained", star), ("untrained", egg), (f"{star} alone", star), (f"{egg} alone", egg), ("both", star),
        ("both", egg)]
    assert all(-1 <= r["leakage"] <= 1 and set(MEASURES) <= r.keys() for r in results["runs"])
    both = load_dataset_config(tmp_path / "runs" / "both-seed0" / "dataset.toml")
    assert [(c.name, c.instance_prompt, c.prior) for c in both.concepts] == [
        (star, "a photo of a sks star", "base_model"), (egg, "a photo of a zwx circle", "base_model")]
    state = json.loads((tmp_path / "runs" / "both-seed0" / "checkpoint-4" / "training_state.json").read_text())
    assert state["global_step"] == state["schedule"]["steps"] == 4  # two subjects: twice the steps of one alone
    assert f"| both | {egg} |" in (tmp_path / "results.md").read_text()

    def refuse(*_args):
        raise AssertionError("an adapter trained already was trained again")

    monkeypatch.setattr(multi_concept, "_train_concepts", refuse)
    again = run_multi_concept(settings, pair, log=lambda _: None)
    assert [r["leakage"] for r in again["runs"]] == pytest.approx([r["leakage"] for r in results["runs"]])
