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


def test_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block("example: python-api"), "README.md", "exec"), {})
    assert (tmp_path / "my-adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_quickstart_runs_offline_and_writes_every_output(tmp_path):
    commands = [line for line in readme_block("example: quickstart").replace("\\\n", " ").splitlines()
                if line.strip() and not line.startswith("pip install")]
    (tmp_path / "assets").symlink_to(README.parent / "assets")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "quickstart"
    for name in ("moslora.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"):
        assert (out / name).is_file()
    assert len(list((out / "validation" / "final-step-200").glob("*.png"))) == 4


def test_every_training_option_is_documented():
    from dreambooth_moslora.arguments import build_parser

    text = README.read_text()
    options = [o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")]
    missing = [o for o in options if o != "--help" and f"`{o}`" not in text]
    assert not missing, f"README does not document {missing}"
