from dreambooth_moslora.prompt_words import has_trigger_word


def test_a_rare_word_is_a_trigger_and_ordinary_words_are_not():
    assert has_trigger_word("a photo of sks dog")
    assert has_trigger_word("a photo of ohwx backpack")
    assert not has_trigger_word("a photo of a dog")
    assert not has_trigger_word("A Photo of my Dog")


def test_the_class_prompt_words_are_not_a_trigger():
    assert has_trigger_word("a photo of a corgi")
    assert not has_trigger_word("a photo of a corgi", class_prompt="a photo of a corgi")
