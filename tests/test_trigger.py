from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import training_argv
from dreambooth_moslora import load_moslora
from dreambooth_moslora.adapter.errors import AdapterFileError, UserInputError
from dreambooth_moslora.adapter.inject import moslora_layers
from dreambooth_moslora.adapter.io import NATIVE_FILE, TRIGGER_FILE, read_moslora
from dreambooth_moslora.adapter.trigger import TriggerEmbedding, install_trigger_embedding, trigger_token
from dreambooth_moslora.trainer.arguments import parse_args
from dreambooth_moslora.trainer.train import train
from helpers import write_images

pytestmark = pytest.mark.usefixtures("fresh_accelerate")
MINI_SDXL = Path(__file__).resolve().parents[1] / "assets" / "mini-sdxl"
TRIGGER_OPTIONS = ("--train_trigger_embedding", "sks", "--trigger_embedding_lr", "1e-2", "--resolution", "32")


def test_only_the_trigger_row_is_replaced_and_only_its_vector_learns():
    table = nn.Embedding(10, 4).requires_grad_(False)
    wrapper = TriggerEmbedding(table, "t", 3, vector=torch.full((4,), 7.0))
    ids = torch.tensor([[1, 3, 5, 3]])
    out = wrapper(ids)
    torch.testing.assert_close(out[0, [0, 2]], table.weight[[1, 5]])
    assert (out[0, [1, 3]] == 7).all()
    out.sum().backward()
    assert (wrapper.vector.grad == 2).all() and table.weight.grad is None


def test_a_trigger_must_be_one_token(world_tokenizer):
    assert trigger_token(world_tokenizer, "sks") == "sks</w>"
    with pytest.raises(UserInputError, match="4 tokens"):
        trigger_token(world_tokenizer, "qqzz")


def test_a_vector_of_another_width_is_refused():
    encoder = _Encoder(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="width 4"):
        install_trigger_embedding(encoder, "t", 3, torch.zeros(5))
    install_trigger_embedding(encoder, "t", 3)
    with pytest.raises(ValueError, match="already"):
        install_trigger_embedding(encoder, "t", 3)


class _Encoder(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def get_input_embeddings(self):
        return self.table

    def set_input_embeddings(self, value):
        self.table = value


@pytest.fixture
def subject(tmp_path):
    write_images(tmp_path / "subject", sizes=((40, 32), (32, 32)))
    return tmp_path / "subject"


def run(base_dir, subject, output_dir, *extra):
    return train(parse_args(training_argv(base_dir, subject, output_dir, *TRIGGER_OPTIONS, *extra)))


def prompt_embeddings(pipe, prompt):
    return pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]


def stock_pipeline(path):
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_learned_trigger_reaches_every_loader_and_leaves_other_prompts_alone(subject, tmp_path):
    out = tmp_path / "out"
    result = run(MINI_SDXL, subject, out, "--max_train_steps", "2")
    assert out / TRIGGER_FILE in result.files
    base = stock_pipeline(MINI_SDXL)
    exported = load_file(out / TRIGGER_FILE)
    sks = base.tokenizer.convert_tokens_to_ids("sks</w>")
    assert exported["clip_l"].shape == (1, 64) and exported["clip_g"].shape == (1, 64)
    assert not torch.allclose(exported["clip_l"][0], base.text_encoder.get_input_embeddings().weight[sks])

    ours = stock_pipeline(MINI_SDXL)
    load_moslora(ours, out / NATIVE_FILE)
    stock = stock_pipeline(MINI_SDXL)
    stock.load_lora_weights(out)
    stock.load_textual_inversion(exported["clip_l"], token="sks", text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    stock.load_textual_inversion(exported["clip_g"], token="sks", text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2)
    subject_prompt, class_prompt = "a photo of sks dog", "a photo of a dog"
    torch.testing.assert_close(prompt_embeddings(ours, subject_prompt), prompt_embeddings(stock, subject_prompt))
    assert not torch.allclose(prompt_embeddings(ours, subject_prompt), prompt_embeddings(base, subject_prompt))
    torch.testing.assert_close(prompt_embeddings(ours, class_prompt), prompt_embeddings(base, class_prompt))
    assert "load_textual_inversion" in (out / "README.md").read_text()


def test_resume_continues_the_trigger_exactly(subject, tmp_path):
    from accelerate.state import AcceleratorState

    run(MINI_SDXL, subject, tmp_path / "straight", "--max_train_steps", "4", "--checkpointing_steps", "2")
    AcceleratorState._reset_state(reset_partial_state=True)
    run(MINI_SDXL, subject, tmp_path / "split", "--max_train_steps", "2")
    AcceleratorState._reset_state(reset_partial_state=True)
    run(MINI_SDXL, subject, tmp_path / "split", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    straight = read_moslora(tmp_path / "straight" / NATIVE_FILE).trigger_vectors
    split = read_moslora(tmp_path / "split" / NATIVE_FILE).trigger_vectors
    for component in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(split[component], straight[component], rtol=0, atol=1e-6)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(UserInputError, match="another trigger embedding"):
        train(parse_args(training_argv(MINI_SDXL, subject, tmp_path / "split", "--resolution", "32",
                                       "--max_train_steps", "6", "--resume_from_checkpoint", "latest")))


def test_a_trigger_outside_the_prompt_or_the_vocabulary_is_refused(tiny_sdxl_dir, subject, tmp_path):
    with pytest.raises(UserInputError, match="not a word of the instance prompt"):
        parse_args(training_argv(MINI_SDXL, subject, tmp_path / "out", "--train_trigger_embedding", "zwx"))
    with pytest.raises(UserInputError, match="3 tokens"):  # the tiny model's tokenizer spells "sks" s, k, s
        run(tiny_sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "1")
    assert not (tmp_path / "out" / NATIVE_FILE).exists()


def test_a_trigger_the_pipeline_has_no_token_for_is_refused_untouched(subject, tmp_path):
    run(MINI_SDXL, subject, tmp_path / "out", "--max_train_steps", "1")
    native = tmp_path / "out" / NATIVE_FILE
    with safe_open(str(native), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, native, metadata={**metadata, "trigger_token": "unknownword</w>"})  # another tokenizer's
    pipe = stock_pipeline(MINI_SDXL)
    with pytest.raises(AdapterFileError, match="does not fit this pipeline's text_encoder"):
        load_moslora(pipe, native)
    assert not moslora_layers(pipe.unet)
    save_file(tensors, native, metadata={**metadata, "trigger_token": ""})
    with pytest.raises(AdapterFileError, match="incomplete trigger embedding"):
        read_moslora(native)


def test_the_verbs_show_and_export_the_trigger(subject, tmp_path, trained, capsys):
    from dreambooth_moslora.verbs.cli import main

    run(MINI_SDXL, subject, tmp_path / "out", "--max_train_steps", "1")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "trigger     sks</w>" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "out" / NATIVE_FILE), "--format", "trigger", "--output",
                 str(tmp_path / "again.safetensors")]) == 0
    again, written = load_file(tmp_path / "again.safetensors"), load_file(tmp_path / "out" / TRIGGER_FILE)
    assert again.keys() == written.keys() == {"clip_l", "clip_g"}
    assert all(torch.equal(again[k], written[k]) for k in again)
    assert main(["export", str(trained["dir"] / NATIVE_FILE), "--format", "trigger", "--output",
                 str(tmp_path / "none.safetensors")]) == 2
    assert "has no learned trigger embedding" in capsys.readouterr().err
    assert not (tmp_path / "none.safetensors").exists()
