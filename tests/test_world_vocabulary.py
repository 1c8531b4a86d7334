from transformers import CLIPTokenizer

from dreambooth_moslora.world.render import COLOURS, SHAPES, Scene
from dreambooth_moslora.world.vocabulary import TRIGGER_WORDS, build_world_tokenizer, vocabulary_words


def test_every_vocabulary_word_is_one_token(world_tokenizer):
    words = vocabulary_words()
    assert set(COLOURS) | set(SHAPES) | set(TRIGGER_WORDS) | {"dog", "backpack", "photo"} <= set(words)
    for word in words:
        assert len(world_tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_a_caption_is_one_token_per_word_and_unknown_words_still_tokenize(world_tokenizer):
    caption = Scene("star", "red", "blue").caption
    assert len(world_tokenizer(caption, add_special_tokens=False).input_ids) == len(caption.split())
    pieces = world_tokenizer.convert_ids_to_tokens(world_tokenizer("qzv", add_special_tokens=False).input_ids)
    assert "".join(pieces).replace("</w>", "") == "qzv" and len(pieces) > 1


def test_the_tokenizer_is_deterministic_and_survives_save_and_load(world_tokenizer, tmp_path):
    assert build_world_tokenizer().get_vocab() == world_tokenizer.get_vocab()
    world_tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a photo of a sks star on a speckled blue background"
    assert reloaded(text).input_ids == world_tokenizer(text).input_ids
    assert reloaded.model_max_length == 77
