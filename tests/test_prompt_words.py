import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.trainer.prompt_words import has_trigger_word, read_prompts


def test_a_rare_word_is_a_trigger_and_ordinary_words_are_not():
    assert has_trigger_word("a photo of sks dog")
    assert has_trigger_word("a photo of ohwx backpack")
    assert not has_trigger_word("a photo of a dog")
    assert not has_trigger_word("A Photo of my Dog")


def test_the_class_prompt_words_are_not_a_trigger():
    assert has_trigger_word("a photo of a corgi")
    assert not has_trigger_word("a photo of a corgi", class_prompt="a photo of a corgi")


def test_prompts_from_arguments_and_files(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# subject prompts\na photo of sks dog\n\na sks dog in the snow\n")
    assert read_prompts(["first"], file) == ["first", "a photo of sks dog", "a sks dog in the snow"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UserInputError, match="has no prompts"):
        read_prompts(None, tmp_path / "empty.txt")
    with pytest.raises(UserInputError, match="prompts file not found"):
        read_prompts(None, tmp_path / "missing.txt")
    with pytest.raises(UserInputError, match="at least one --prompt"):
        read_prompts()
