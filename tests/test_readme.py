"""The README's and the docs' examples are run as written, so they cannot drift from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def readme_block(marker: str) -> str:
    """The fenced code block right after the HTML comment `<!-- marker -->`, in the README or a docs page."""
    found = [m.group(1) for page in PAGES
             for m in re.finditer(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", page.read_text(), re.S)]
    assert len(found) == 1, f"{len(found)} blocks marked {marker} in README.md and docs/"
    return found[0]


def test_every_docs_page_is_linked_from_the_readme_and_its_links_resolve():
    text = README.read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, page.name
    for page in PAGES:
        for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_python_api_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block("example: python-api"), "README.md", "exec"), {})
    assert (tmp_path / "my-adapter" / "pytorch_lora_weights.safetensors").is_file()
    exec(compile(readme_block("example: python-verbs"), "README.md", "exec"), {})
    assert len(list((tmp_path / "samples").glob("000-*.png"))) == 2 and (tmp_path / "samples" / "grid.png").is_file()
    assert (tmp_path / "my-adapter" / "small.safetensors").is_file()


def shell_commands(marker: str) -> list[str]:
    """A README bash block as commands: continuation lines joined, comments and pip installs left out."""
    lines = readme_block(marker).replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.startswith(("#", "pip install"))]


def run_commands(commands, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]


def test_quickstart_and_the_verbs_after_it_run_offline(tmp_path, feature_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").symlink_to(README.parent / "assets")
    run_commands(shell_commands("example: quickstart"), tmp_path)
    out = tmp_path / "outputs" / "quickstart"
    for name in ("moslora.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md",
                 "best/step.json", "best/moslora.safetensors", "validation/report.html", "validation/metrics.jsonl"):
        assert (out / name).is_file(), name
    block = readme_block("example: quickstart")
    steps = re.search(r"--max_train_steps (\d+)", block).group(1)
    every = re.search(r"--validation_steps (\d+)", block).group(1)
    assert len(list((out / "validation" / f"final-step-{steps}").glob("000-*.png"))) == 4
    assert len(list((out / "validation" / f"step-{every}").glob("000-*.png"))) == 4  # a checkpoint to compare
    assert (out / f"checkpoint-{every}" / "moslora.safetensors").is_file()

    run_commands(shell_commands("example: cli-verbs"), tmp_path)
    assert len(list((tmp_path / "outputs" / "samples").glob("*.png"))) == 5  # 2 prompts x 2 images + grid
    assert (out / "lora_kohya_rank2.safetensors").is_file()
    # the evaluate example as written, with the two hub models swapped for tiny local ones (no download here)
    dino, clip = feature_models  # tiny local stand-ins for the folders the block says to download once
    evaluate = [c.replace("models/dino-vits16", str(dino)).replace("models/clip-vit-base-patch32", str(clip))
                for c in shell_commands("example: evaluate")]
    run_commands(evaluate, tmp_path)
    table = (tmp_path / "outputs" / "eval" / "metrics.md").read_text()
    assert "| moslora |" in table and "| step-100 |" in table  # a checkpoint compared with the final adapter

    # the diffusers snippet, on the CPU line it offers, with the mini model for SDXL and the quick start's output
    snippet = (readme_block("example: load-diffusers")
               .replace('device, dtype = "cuda", torch.float16', 'device, dtype = "cpu", torch.float32')
               .replace("stabilityai/stable-diffusion-xl-base-1.0", str(README.parent / "assets" / "mini-sdxl"))
               .replace('"sks-dog"', repr(str(out)))
               .replace('("a photo of sks dog in a bucket")', '("a photo of sks dog in a bucket", num_inference_steps=2)'))
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "sks-dog-in-a-bucket.png").is_file()


def test_every_training_option_is_documented():
    from dreambooth_moslora.trainer.arguments import build_parser

    text = (ROOT / "docs" / "training.md").read_text()
    options = [o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")]
    missing = [o for o in options if o != "--help" and f"`{o}`" not in text]
    assert not missing, f"docs/training.md does not document {missing}"


def test_the_dataset_files_of_training_md_read_and_the_translated_kohya_file_trains(tmp_path, tiny_sdxl_dir,
                                                                                   fresh_accelerate):
    from dreambooth_moslora.trainer.arguments import parse_args
    from dreambooth_moslora.trainer.dataset_config import load_dataset_config
    from dreambooth_moslora.trainer.train import train
    from helpers import write_images

    example = tmp_path / "example"
    for folder in ("photos/dog", "photos/cat", "class/cat", "held-out/dog"):
        write_images(example / folder, sizes=((64, 64),))
    (example / "dataset.toml").write_text(readme_block("example: dataset-file"))
    assert [c.role for c in load_dataset_config(example / "dataset.toml").concepts] == [
        "instance", "instance", "class", "validation"]

    for seed, folder in enumerate(("train/dog", "train/cat", "reg/animal")):
        write_images(tmp_path / folder, sizes=((64, 64), (64, 80)), seed=seed)
    (tmp_path / "kohya.toml").write_text(readme_block("example: kohya-dataset"))
    result = train(parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset_config",
                               str(tmp_path / "kohya.toml"), "--output_dir", str(tmp_path / "out"), "--resolution",
                               "64", "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none"]))
    assert result.steps == 2
    assert "a photo of sks dog; a photo of ohwx cat" in (tmp_path / "out" / "README.md").read_text()
