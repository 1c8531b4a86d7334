"""Measured validation inside training: step 0's baseline and each validation measured, the chosen step in best/,
early stopping, --keep best, resume keeping the history, and the errors for feature models that cannot be had."""

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image
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
    """Subject fidelity per validation as the test says (0 = step 0; None: the run dies there), prompt fidelity
    and class steady."""
    script = {}
    measure = validation_metrics.FeatureModels.measure

    def scripted(self, samples, prompts, instance_images):
        measured = measure(self, samples, prompts, instance_images)
        calls = script.setdefault("calls", [])
        calls.append(None)
        if script["fidelity"][len(calls) - 1] is None:
            raise RuntimeError("the process died in this validation")
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
    assert len(scripted_fidelity["calls"]) == 4  # steps 0 to 3, the stopping step measured once
    assert not (out / "validation" / "final-step-3").exists()  # nor sampled again for the final validation
    assert "validation/step-3/" in (out / "README.md").read_text()


def test_with_ema_the_validations_and_best_are_the_average(tiny_sdxl_dir, subject, tmp_path, feature_models,
                                                           scripted_fidelity):
    scripted_fidelity["fidelity"] = [0.1, 0.2, 0.9, 0.3]
    out = tmp_path / "out"
    run(tiny_sdxl_dir, subject, out, feature_models, "--use_ema", "--ema_decay", "0.8", "--keep", "best")
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 2
    average = out / "checkpoint-2" / "moslora.safetensors"  # a checkpoint's adapter file holds the average
    assert _same_adapter(out / "best" / "moslora.safetensors", average)
    trained = load_file(out / "checkpoint-2" / "trained_weights.safetensors")
    averaged = load_file(average)
    assert any(not (averaged[f"{k}.weight"] == trained[k]).all() for k in trained)  # the two differ at step 2


def test_resume_keeps_the_history_and_the_best_so_far(tiny_sdxl_dir, subject, tmp_path, feature_models,
                                                     scripted_fidelity):
    scripted_fidelity["fidelity"] = [0.1, 0.9, 0.5]  # steps 0 to 2: step 1 stays the best across the resume
    out = tmp_path / "out"
    run(tiny_sdxl_dir, subject, out, feature_models, steps=1)
    step_1 = load_file(out / "best" / "moslora.safetensors")
    run(tiny_sdxl_dir, subject, out, feature_models, "--resume_from_checkpoint", "latest", "--keep", "best", steps=2)
    assert [record["step"] for record in history(out)] == [0, 1, 2]  # each step once, the first run's kept
    assert [r["dino"] for r in history(out)] == [0.1, 0.9, 0.5]
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 1
    kept = load_file(out / "moslora.safetensors")
    assert all((kept[k] == step_1[k]).all() for k in step_1)
    assert "Step 1 was chosen" in (out / "README.md").read_text()


def _same_adapter(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_second_run_into_a_used_folder_is_refused_or_starts_afresh(tiny_sdxl_dir, subject, tmp_path,
                                                                    feature_models, scripted_fidelity, monkeypatch):
    """The same command twice: the second run once took the first one's step 0, history and best/."""
    scripted_fidelity["fidelity"] = [0.1, 0.9, 0.2] + [0.1, 0.2, 0.8]  # the first run's steps 0-2, the second's
    out = tmp_path / "out"
    run(tiny_sdxl_dir, subject, out, feature_models, "--keep", "best", steps=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_setup, "load_base_models", lambda *a, **k: pytest.fail("a model was loaded"))
        with pytest.raises(UserInputError, match="--overwrite_output_dir") as refused:
            run(tiny_sdxl_dir, subject, out, feature_models, "--keep", "best", steps=2)
    assert "--resume_from_checkpoint latest" in str(refused.value)
    run(tiny_sdxl_dir, subject, out, feature_models, "--keep", "best", "--overwrite_output_dir", steps=2)
    assert len(scripted_fidelity["calls"]) == 6  # the second run measured its own base model
    assert [r["dino"] for r in history(out)] == [0.1, 0.2, 0.8]
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 2
    assert _same_adapter(out / "moslora.safetensors", out / "best" / "moslora.safetensors")
    assert _same_adapter(out / "best" / "moslora.safetensors", out / "checkpoint-2" / "moslora.safetensors")
    assert "Step 2 was chosen" in (out / "README.md").read_text()
    (previous,) = (out / "previous-runs").iterdir()  # the first run, whole, out of the way
    assert json.loads((previous / "best" / "step.json").read_text())["step"] == 1


def test_a_resume_from_a_checkpoint_before_best_cuts_history_and_best_together(tiny_sdxl_dir, subject, tmp_path,
                                                                               feature_models, scripted_fidelity):
    """best/ moved on to step 3, then the run was lost before checkpoint-3 (here: deleted) and resumed from
    checkpoint-2: every file names one step."""
    scripted_fidelity["fidelity"] = [0.1, 0.2, 0.3, 0.9] + [0.22]
    out = tmp_path / "out"
    run(tiny_sdxl_dir, subject, out, feature_models, "--checkpointing_steps", "2", steps=3)
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 3
    shutil.rmtree(out / "checkpoint-3")
    run(tiny_sdxl_dir, subject, out, feature_models, "--checkpointing_steps", "2", "--keep", "best",
        "--resume_from_checkpoint", "latest", steps=3)
    assert [(r["step"], r["dino"]) for r in history(out)] == [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.22)]
    assert json.loads((out / "best" / "step.json").read_text())["step"] == 2
    assert _same_adapter(out / "best" / "moslora.safetensors", out / "checkpoint-2" / "moslora.safetensors")
    assert _same_adapter(out / "moslora.safetensors", out / "best" / "moslora.safetensors")
    card = (out / "README.md").read_text()
    assert "Step 2 was chosen" in card and "step 2's adapter (the chosen step" in card
    assert 'id="step-2"' in (out / "validation" / "report.html").read_text()


def test_a_validation_cut_short_after_its_checkpoint_is_done_on_resume(tiny_sdxl_dir, subject, tmp_path,
                                                                      feature_models, scripted_fidelity):
    scripted_fidelity["fidelity"] = [0.1, 0.2, None] + [0.3, 0.25]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="died"):
        run(tiny_sdxl_dir, subject, out, feature_models, "--checkpointing_steps", "2", steps=3)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert (out / "checkpoint-2").is_dir()
    run(tiny_sdxl_dir, subject, out, feature_models, "--checkpointing_steps", "2", "--resume_from_checkpoint",
        "latest", steps=3)
    assert [(r["step"], r["dino"]) for r in history(out)] == [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.25)]


def test_measured_validation_turned_on_at_a_resume_measures_the_base_model(tiny_sdxl_dir, subject, tmp_path,
                                                                           feature_models):
    """Step 0's baseline is the base model's samples, not the trained adapter's, whatever step the run is at."""
    fast = ("--learning_rate", "5e-2")
    run(tiny_sdxl_dir, subject, tmp_path / "fresh", feature_models, *fast, steps=1)
    run(tiny_sdxl_dir, subject, tmp_path / "late", feature_models, *fast, "--validation_metrics", "none", steps=2)
    run(tiny_sdxl_dir, subject, tmp_path / "late", feature_models, *fast, "--resume_from_checkpoint", "latest",
        steps=3)
    assert [record["step"] for record in history(tmp_path / "late")] == [0, 2, 3]

    def pixels(out, folder):
        return [np.asarray(Image.open(p)) for p in sorted((out / "validation" / folder).glob("*.png"))]

    fresh, late = pixels(tmp_path / "fresh", "step-0"), pixels(tmp_path / "late", "step-0")
    assert len(fresh) == len(late) > 1 and all((a == b).all() for a, b in zip(fresh, late))
    trained = pixels(tmp_path / "late", "final-step-3")
    assert any((a != b).any() for a, b in zip(fresh, trained))  # the adapter does change the samples


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


@pytest.mark.parametrize("option", [("--keep", "best"), ("--early_stopping_patience", "2")])
def test_options_that_choose_need_the_feature_models_to_load(tiny_sdxl_dir, subject, tmp_path, feature_models,
                                                             monkeypatch, option):
    """Under --validation_metrics auto they were once dropped with a warning: no best/, no early stop."""
    monkeypatch.setattr(trainer_setup, "load_base_models", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserInputError, match=f"{option[0]}.* choose among measured validations") as refused:
        run(tiny_sdxl_dir, subject, tmp_path / "out", (tmp_path / "no-dino", feature_models[1]), *option)
    assert "--validation_metrics none" not in str(refused.value)


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
