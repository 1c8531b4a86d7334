import json

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.pipeline.generate import GenerationSettings
from dreambooth_moslora.verbs.evaluate import benchmark_prompts, evaluate_adapters, parse_adapter_specs
from helpers import write_images


def test_benchmark_prompts_with_and_without_the_trigger(tmp_path):
    prompts = benchmark_prompts("live", "sks", "dog")
    assert len(prompts) == 25
    assert prompts[10] == ("a sks dog wearing a red hat", "a dog wearing a red hat")
    assert benchmark_prompts("object", "sks", "can")[0] == ("a sks can in the jungle", "a can in the jungle")
    file = tmp_path / "p.txt"
    file.write_text("a photo of zwx cat\n")
    assert benchmark_prompts("object", "zwx", "cat", file) == [("a photo of zwx cat", "a photo of cat")]


def test_adapter_specs():
    assert parse_adapter_specs(["lora=out/lora", "base=none", "out/moslora"]) == {
        "lora": "out/lora", "base": None, "moslora": "out/moslora"}
    with pytest.raises(UserInputError, match="used twice"):
        parse_adapter_specs(["a=x", "a=y"])


def test_evaluation_compares_adapters_with_the_same_seeds(trained, tiny_sdxl_dir, feature_models, tmp_path):
    write_images(tmp_path / "subject", sizes=((64, 64), (80, 64), (64, 80)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog\na sks dog on the beach\n")
    dino, clip = feature_models
    results = evaluate_adapters(
        str(tiny_sdxl_dir), {"moslora": str(trained["dir"]), "base": None, "base again": None},
        tmp_path / "subject", "sks", "dog", tmp_path / "eval", prompts_file=prompts,
        settings=GenerationSettings(num_images_per_prompt=2, num_inference_steps=2), dino_model=str(dino),
        clip_model=str(clip), device="cpu",
    )
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == results
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| moslora |" in table and "real vs real (ceiling)" in table
    rows = results["adapters"]
    assert rows["base"] == {**rows["base again"], "adapter": None}  # same seeds: same images, same scores
    assert rows["moslora"]["dino"] != rows["base"]["dino"]
    for row in rows.values():
        assert all(-1 <= row[m] <= 1 for m in ("dino", "clip_i", "clip_t"))
    assert len(list((tmp_path / "eval" / "images" / "moslora").glob("0*.png"))) == 4
    assert -1 <= results["real_vs_real"]["dino"] <= 1
