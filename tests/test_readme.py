"""The README's examples are run, so they cannot drift from the code."""

import re
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
