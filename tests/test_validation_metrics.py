import base64
import os
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.validation_metrics import (
    CONTEXTS,
    FeatureModels,
    ValidationPrompt,
    append_metrics,
    read_metrics,
    validation_prompts,
    write_report,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ANALYZER = ASSETS / "world-analyzer.safetensors"


def _noise(count, size, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _prompts(class_prompt="a photo of a dog"):
    return validation_prompts("a photo of sks dog", ["sks dog in a bucket"], class_prompt, None)


def test_prompts_are_the_users_then_contexts_then_the_class_and_plain_ones_lack_the_trigger():
    prompts = _prompts()
    assert [p.kind for p in prompts] == ["user"] + ["context"] * len(CONTEXTS) + ["class"]
    assert prompts[0] == ValidationPrompt("sks dog in a bucket", "dog in a bucket", "user")
    assert all(p.prompt.startswith("a photo of sks dog,") for p in prompts if p.kind == "context")
    assert prompts[-1] == ValidationPrompt("a photo of a dog", "a photo of a dog", "class")
    assert all("sks" in p.prompt and "sks" not in p.plain and "dog" in p.plain for p in prompts[:-1])
    assert [p.kind for p in _prompts(class_prompt=None)] == ["user"] + ["context"] * len(CONTEXTS)


def test_given_trigger_words_are_removed_and_a_repeated_prompt_is_sampled_once():
    prompts = validation_prompts("a photo of zwx cat", ["a photo of zwx cat, on a beach"], None, {"ZWX"})
    assert [p.prompt for p in prompts].count("a photo of zwx cat, on a beach") == 1
    assert all("zwx" not in p.plain and "cat" in p.plain for p in prompts)


def _samples(prompts, subject_images, class_images):
    return {p.prompt: (class_images if p.kind == "class" else subject_images) for p in prompts}


@pytest.fixture(scope="module")
def dino_clip(feature_models):
    dino, clip = feature_models
    return FeatureModels.load(str(dino), str(clip), None)


def test_dino_clip_rank_identical_samples_above_random_ones_and_measure_the_class(dino_clip):
    prompts = _prompts()
    photo = Image.open(ASSETS / "subject" / "00.jpg").convert("RGB")
    instance, noise = [photo, photo], _noise(2, 64, seed=0)
    same = dino_clip.measure(_samples(prompts, [photo, photo], noise), prompts, instance)
    other = dino_clip.measure(_samples(prompts, noise, [photo, photo]), prompts, instance)
    assert set(same) == {"dino", "clip_i", "clip_t", "class_similarity"}
    assert same["dino"] == pytest.approx(1, abs=1e-4) and same["clip_i"] == pytest.approx(1, abs=1e-4)
    assert other["dino"] < same["dino"] - 1e-3 and other["clip_i"] < same["clip_i"] - 1e-3
    assert other["class_similarity"] == pytest.approx(1, abs=1e-4)  # the class samples alone decide it
    assert same["class_similarity"] < other["class_similarity"] - 1e-3
    without_class = _prompts(class_prompt=None)
    assert "class_similarity" not in dino_clip.measure(_samples(without_class, noise, []), without_class, instance)


def test_clip_t_reads_each_subject_sample_with_its_plain_prompt(dino_clip, monkeypatch):
    prompts, read = _prompts(), []
    texts = dino_clip.clip.texts
    monkeypatch.setattr(dino_clip.clip, "texts", lambda t: read.extend(t) or texts(t))
    dino_clip.measure(_samples(prompts, _noise(2, 48, seed=1), _noise(3, 48, seed=2)), prompts, _noise(1, 48, 3))
    assert read == [p.plain for p in prompts if p.kind != "class" for _ in range(2)]


def test_the_analyzer_measures_the_subject_and_the_class_but_has_no_clip_t():
    models = FeatureModels.load(None, None, str(ANALYZER))
    prompts = _prompts()
    render = Image.open(ASSETS / "world-subject" / "00.png").convert("RGB")
    instance, noise = [render], _noise(2, 32, seed=4)
    same = models.measure(_samples(prompts, [render, render], noise), prompts, instance)
    other = models.measure(_samples(prompts, noise, [render]), prompts, instance)
    assert set(same) == {"subject", "class_similarity"}
    assert same["subject"] == pytest.approx(1, abs=1e-4) and other["subject"] < same["subject"] - 1e-3
    assert other["class_similarity"] > same["class_similarity"] + 1e-3


@pytest.mark.parametrize("which, option", [("dino", "--validation_dino_model"), ("clip", "--validation_clip_model"),
                                           ("analyzer", "--validation_metrics_model")])
def test_a_model_that_cannot_be_loaded_names_the_option_that_fixes_it(feature_models, tmp_path, which, option):
    dino, clip = feature_models
    paths = {"dino": str(dino), "clip": str(clip), "analyzer": None, which: str(tmp_path / "missing")}
    with pytest.raises(UserInputError, match=option):
        FeatureModels.load(paths["dino"], paths["clip"], paths["analyzer"])


def test_metrics_round_trip_truncate_at_a_resume_and_a_resumed_step_replaces_the_future(tmp_path):
    path = tmp_path / "validation" / "metrics.jsonl"
    assert read_metrics(path) == []
    records = [{"step": s, "dino": 0.5 + s / 1000, "clip_t": 0.3} for s in (0, 100, 200)]
    for record in records:
        append_metrics(path, record)
    assert read_metrics(path) == records
    assert read_metrics(path, up_to_step=150) == records[:2]
    assert len(path.read_text().splitlines()) == 3
    resumed = {"step": 100, "dino": 0.9, "clip_t": 0.2}
    append_metrics(path, resumed)
    assert read_metrics(path) == [records[0], resumed]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.jsonl"]  # no temporary file left beside it
    path.write_text(json.dumps(records[0]) + "\n{\"step\": 1\n")
    with pytest.raises(UserInputError, match="line 2"):
        read_metrics(path)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.chosen_rows, self.in_chosen = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append((attrs["src"], self.in_chosen, attrs["title"]))
        if tag == "tr":
            self.in_chosen = attrs.get("class") == "chosen"
            if self.in_chosen:
                self.chosen_rows.append(attrs["id"])


def test_report_embeds_every_photo_and_sample_draws_the_curves_and_highlights_the_chosen_step(tmp_path):
    prompts = _prompts()
    instance = []
    for index, image in enumerate(_noise(3, 300, seed=5)):
        instance.append(tmp_path / f"photo-{index}.png")
        image.save(instance[-1])
    samples_by_step = {}
    for step in (0, 100, 200):
        samples_by_step[step] = {}
        for column, prompt in enumerate(prompts):
            paths = [tmp_path / f"s{step}-{column}-{i}.png" for i in range(2)]
            for path, image in zip(paths, _noise(2, 256, seed=step + column)):
                image.save(path)
            samples_by_step[step][prompt.prompt] = paths
    history = [{"step": s, "dino": 0.4 + s / 1000, "clip_t": 0.3 - s / 10000, "class_similarity": 0.2}
               for s in samples_by_step]
    path = write_report(tmp_path / "validation" / "report.html", history, instance, samples_by_step, prompts, 100)
    text = path.read_text()
    found = _Images()
    found.feed(text)
    assert len(found.sources) == len(instance) + len(samples_by_step) * len(prompts)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for source, _, _ in found.sources:
        assert source.startswith("data:image/png;base64,")
        thumbnail = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert max(thumbnail.size) <= 128
    assert found.chosen_rows == ["step-100"]
    assert [title for _, chosen, title in found.sources if chosen] == [f"step 100: {p.prompt}" for p in prompts]
    assert text.count("<polyline") == 3 and "chosen-line" in text


def test_redrawing_the_report_decodes_only_the_new_steps_samples(tmp_path, monkeypatch):
    """The report is redrawn at every validation; it once decoded every past step's PNGs again each time."""
    from dreambooth_moslora.trainer import validation_metrics

    prompts = _prompts()[:1]
    samples_by_step, history = {}, []
    opened, open_image = [], validation_metrics.Image.open

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(validation_metrics.Image, "open", counting)
    for step in (0, 100, 200):
        paths = [tmp_path / f"s{step}-{i}.png" for i in range(2)]
        for path, image in zip(paths, _noise(2, 64, seed=step)):
            image.save(path)
        samples_by_step[step] = {prompts[0].prompt: paths}
        history.append({"step": step, "dino": 0.5})
        opened.clear()
        write_report(tmp_path / "report.html", history, [], samples_by_step, prompts, None)
        assert sorted(opened) == [f"s{step}-0.png", f"s{step}-1.png"]
    paths[0].write_bytes(paths[1].read_bytes())  # a file rewritten (a resumed run's new samples) is read again
    os.utime(paths[0], ns=(0, 1))
    opened.clear()
    write_report(tmp_path / "report.html", history, [], samples_by_step, prompts, None)
    assert sorted(opened) == ["s200-0.png", "s200-1.png"]
