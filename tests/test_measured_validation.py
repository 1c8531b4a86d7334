"""Measured validation inside training: step 0's baseline and each validation measured, the chosen step in best/,
early stopping, --keep best, resume keeping the history, and the errors for feature models that cannot be had."""

import json
import logging

import pytest
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from conftest import training_argv
from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer import setup as trainer_setup
from dreambooth_moslora.trainer import train as train_module
from dreambooth_moslora.trainer import validation_metrics
from dreambooth_moslora.trainer.arguments import parse_args
from helpers import write_images

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture
def subject(tmp_path):
    write_images(tmp_path / "subject", sizes=((64, 64),) * 3)
    return tmp_path / "subject"


def run(tiny_sdxl_dir, subject, out, feature_models, *extra, steps=3):
    dino, clip = feature_models
    argv = training_argv(tiny_sdxl_dir, subject, out, "--validation_prompt", "a photo of sks dog on the moon",
                         "--validation_steps", "1", "--num_validation_images", "1", "--num_inference_steps", "1",
                         "--validation_dino_model", str(dino), "--validation_clip_model", str(clip),
                         "--checkpointing_steps", "1", *extra, steps=steps)
    result = train_module.train(parse_args(argv))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result


def history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "validation" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def scripted_fidelity(monkeypatch):
    """Subject fidelity per validation as the test says (0 = step 0), prompt fidelity and class steady."""
    script = {}
    measure = validation_metrics.FeatureModels.measure

    def scripted(self, samples, prompts, instance_images):
        measured = measure(self, samples, prompts, instance_images)
        calls = script.setdefault("calls", [])
        calls.append(None)
        return {**measured, "dino": script["fidelity"][len(calls) - 1], "clip_i": script["fidelity"][len(calls) - 1],
                "clip_t": 0.3}

    monkeypatch.setattr(validation_metrics.FeatureModels, "measure", scripted)
    return script


def test_every_validation_is_measured_and_the_most_faithful_step_is_best_and_kept(tiny_sdxl_dir, subject, tmp_path,
                                                                                 feature_models, scripted_fidelity):
    scripted_fidelity["fidelity"] = [0.1, 0.2, 0.9, 0.5]  # steps 0 to 3
    out = tmp_path / "out"
    run(tiny_sdxl_dir, subject, out, feature_models, "--keep", "best")
    assert [record["step"] for record in history(out)] == [0, 1, 2, 3]  # the baseline, then each validation once
    assert all({"dino", "clip_i", "clip_t"} <= record.keys() for record in history(out))
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 2
    assert {p.name for p in (out / "best").glob("*.safetensors")} == {
        "moslora.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors"}
    kept, best = load_file(out / "moslora.safetensors"), load_file(out / "best" / "moslora.safetensors")
    assert kept.keys() == best.keys() and all((kept[k] == best[k]).all() for k in kept)
    last = load_file(out / "checkpoint-3" / "moslora.safetensors")
    assert any(not (kept[k] == last[k]).all() for k in kept)  # step 2's adapter, not the last step's
    report = (out / "validation" / "report.html").read_text()
    assert 'id="step-2"' in report and "http://" not in report and "https://" not in report
    assert "Step 2 was chosen" in (out / "README.md").read_text()


def test_early_stopping_ends_the_run_normally_with_a_checkpoint(tiny_sdxl_dir, subject, tmp_path, feature_models,
                                                                scripted_fidelity):
    scripted_fidelity["fidelity"] = [0.1, 0.8, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3]
    out = tmp_path / "out"
    result = run(tiny_sdxl_dir, subject, out, feature_models, "--early_stopping_patience", "2",
                 "--checkpointing_steps", "100", steps=8)
    assert result.steps == 3  # step 1 chosen; steps 2 and 3 did not beat it
    assert (out / "checkpoint-3").is_dir() and (out / "moslora.safetensors").is_file()
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 1


def test_resume_keeps_the_history_and_the_best_so_far(tiny_sdxl_dir, subject, tmp_path, feature_models):
    out = tmp_path / "out"
    run(tiny_sdxl_dir, subject, out, feature_models, steps=1)
    run(tiny_sdxl_dir, subject, out, feature_models, "--resume_from_checkpoint", "latest", steps=2)
    assert [record["step"] for record in history(out)] == [0, 1, 2]  # each step once, the first run's kept


def test_feature_models_asked_for_but_missing_are_one_error_before_training(tiny_sdxl_dir, subject, tmp_path,
                                                                           feature_models, monkeypatch):
    monkeypatch.setattr(trainer_setup, "load_base_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserInputError, match="--validation_dino_model"):
        run(tiny_sdxl_dir, subject, tmp_path / "out", (tmp_path / "no-dino", feature_models[1]),
            "--validation_metrics", "on")


def test_by_default_missing_feature_models_leave_plain_validation(tiny_sdxl_dir, subject, tmp_path, feature_models,
                                                                  caplog):
    with caplog.at_level(logging.WARNING, logger="dreambooth_moslora"):
        run(tiny_sdxl_dir, subject, tmp_path / "out", (tmp_path / "no-dino", feature_models[1]), steps=1)
    assert sum("validation is not measured" in r.getMessage() for r in caplog.records) == 1
    assert not (tmp_path / "out" / "validation" / "metrics.jsonl").exists()
    assert list((tmp_path / "out" / "validation" / "final-step-1").glob("*.png"))  # plain validation still ran


def test_keep_best_without_measured_validation_is_refused():
    with pytest.raises(UserInputError, match="--keep best and --early_stopping_patience"):
        parse_args(["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0",
                    "--instance_data_dir", "d", "--instance_prompt", "a photo of sks dog", "--keep", "best"])


def test_a_validation_concepts_held_out_photos_are_what_samples_are_measured_against(tiny_sdxl_dir, tmp_path,
                                                                                     feature_models, monkeypatch):
    write_images(tmp_path / "dog", sizes=((64, 64),) * 2)
    write_images(tmp_path / "held-out", sizes=((48, 40),), seed=5)  # a size no training photo has
    (tmp_path / "dataset.toml").write_text('[[concept]]\nimage_dir = "dog"\ninstance_prompt = "a photo of sks dog"\n'
                                           '[[concept]]\nrole = "validation"\nimage_dir = "held-out"\n')
    references, measure = [], validation_metrics.FeatureModels.measure

    def recording(self, samples, prompts, instance_images):
        references.append({image.size for image in instance_images})
        return measure(self, samples, prompts, instance_images)

    monkeypatch.setattr(validation_metrics.FeatureModels, "measure", recording)
    dino, clip = feature_models
    train_module.train(parse_args([
        "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset_config", str(tmp_path / "dataset.toml"),
        "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--report_to", "none", "--max_train_steps", "1",
        "--validation_prompt", "a photo of sks dog on the moon", "--validation_steps", "1",
        "--num_validation_images", "1", "--num_inference_steps", "1", "--validation_dino_model", str(dino),
        "--validation_clip_model", str(clip)]))
    assert references and all(sizes == {(48, 40)} for sizes in references)


def test_every_subject_of_a_dataset_file_is_measured_against_its_own_photos(tiny_sdxl_dir, tmp_path, feature_models,
                                                                           monkeypatch):
    write_images(tmp_path / "dog", sizes=((64, 64),) * 2)
    write_images(tmp_path / "cat", sizes=((56, 48),), seed=3)  # a size the dog's photos do not have
    (tmp_path / "dataset.toml").write_text(
        '[[concept]]\nname = "dog"\nimage_dir = "dog"\ninstance_prompt = "a photo of sks dog"\n'
        '[[concept]]\nname = "cat"\nimage_dir = "cat"\ninstance_prompt = "a photo of zwx cat"\n')
    calls, measure = [], validation_metrics.FeatureModels.measure

    def recording(self, samples, prompts, instance_images):
        calls.append(({image.size for image in instance_images}, [p.prompt for p in prompts]))
        return measure(self, samples, prompts, instance_images)

    monkeypatch.setattr(validation_metrics.FeatureModels, "measure", recording)
    dino, clip = feature_models
    out = tmp_path / "out"
    train_module.train(parse_args([  # tensorboard too: it takes numbers only, each subject's flattened
        "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset_config", str(tmp_path / "dataset.toml"),
        "--output_dir", str(out), "--resolution", "64", "--report_to", "tensorboard", "--max_train_steps", "1",
        "--validation_prompt", "a photo of zwx cat on the moon", "--validation_steps", "1",
        "--num_validation_images", "1", "--num_inference_steps", "1", "--validation_dino_model", str(dino),
        "--validation_clip_model", str(clip)]))
    dog, cat = calls[0], calls[1]  # step 0: the dog, then the cat
    assert dog[0] == {(64, 64)} and cat[0] == {(56, 48)}
    assert "a photo of zwx cat on the moon" in cat[1] and "a photo of zwx cat on the moon" not in dog[1]
    assert any("sks dog" in p for p in dog[1]) and not any("sks dog" in p for p in cat[1])
    records = history(out)
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        assert set(record["subjects"]) == {"dog", "cat"}
        assert record["dino"] == pytest.approx((record["subjects"]["dog"]["dino"] + record["subjects"]["cat"]["dino"]) / 2)
    assert "cat/clip_t" in (out / "validation" / "report.html").read_text()  # each subject's curves too
    assert list((out / "logs").rglob("events.out.tfevents.*"))
