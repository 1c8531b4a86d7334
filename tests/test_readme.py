"""The README's examples are run, so they cannot drift from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(marker: str) -> str:
    """The fenced code block right after the HTML comment `<!-- marker -->`."""
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no block marked {marker}"
    return match.group(1)


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


def test_quickstart_and_the_verbs_after_it_run_offline(tmp_path, feature_models):
    (tmp_path / "assets").symlink_to(README.parent / "assets")
    run_commands(shell_commands("example: quickstart"), tmp_path)
    out = tmp_path / "outputs" / "quickstart"
    for name in ("moslora.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"):
        assert (out / name).is_file()
    steps = re.search(r"--max_train_steps (\d+)", readme_block("example: quickstart")).group(1)
    assert len(list((out / "validation" / f"final-step-{steps}").glob("000-*.png"))) == 4

    run_commands(shell_commands("example: cli-verbs"), tmp_path)
    assert len(list((tmp_path / "outputs" / "samples").glob("*.png"))) == 5  # 2 prompts x 2 images + grid
    assert (out / "lora_kohya_rank2.safetensors").is_file()
    # the evaluate example as written, with the two hub models swapped for tiny local ones (no download here)
    dino, clip = feature_models
    evaluate = [c.replace("facebook/dino-vits16", str(dino)).replace("openai/clip-vit-base-patch32", str(clip))
                for c in shell_commands("example: evaluate")]
    run_commands(evaluate, tmp_path)
    assert "| moslora |" in (tmp_path / "outputs" / "eval" / "metrics.md").read_text()


def test_every_training_option_is_documented():
    from dreambooth_moslora.arguments import build_parser

    text = README.read_text()
    options = [o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")]
    missing = [o for o in options if o != "--help" and f"`{o}`" not in text]
    assert not missing, f"README does not document {missing}"
