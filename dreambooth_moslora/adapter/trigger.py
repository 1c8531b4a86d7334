"""The trigger word's own embedding, learned (pivotal tuning): one trainable vector per text encoder in place of
the trigger token's row of the embedding table, every other weight frozen.

Prompts without the trigger encode exactly as before, so learning it cannot move the class; and a textual-inversion
vector is what diffusers, ComfyUI and AUTOMATIC1111 load beside a LoRA, with no code of ours.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import UserInputError


class TriggerEmbedding(nn.Module):
    """A token embedding table whose trigger row comes from `vector` (fp32, trainable); the table stays frozen."""

    def __init__(self, table: nn.Embedding, token: str, token_id: int, vector: torch.Tensor | None = None):
        super().__init__()
        self.table, self.token, self.token_id = table, token, token_id
        start = table.weight[token_id] if vector is None else vector
        self.vector = nn.Parameter(start.detach().to(table.weight.device, torch.float32).clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.table(input_ids)
        is_trigger = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(is_trigger, self.vector.to(embeds.dtype), embeds)


def trigger_token(tokenizer, word: str) -> str:
    """The one vocabulary token the trigger word becomes; a word of several tokens would teach its pieces,
    which other words share, so it is refused."""
    tokens = tokenizer.tokenize(word)
    if len(tokens) != 1 or tokenizer.convert_tokens_to_ids(tokens[0]) == tokenizer.unk_token_id:
        raise UserInputError(
            f"--train_trigger_embedding {word!r} is {len(tokens)} tokens ({' '.join(tokens)}) in this model's "
            "tokenizer; its embedding can be learned only for a trigger that is one token, such as sks"
        )
    return tokens[0]


def install_trigger_embedding(text_encoder, token: str, token_id: int,
                              vector: torch.Tensor | None = None) -> TriggerEmbedding:
    """Wrap the encoder's embedding table; the trigger starts from its own row unless `vector` is given."""
    if trigger_embedding(text_encoder) is not None:
        raise ValueError("this text encoder already has a trigger embedding")
    table = text_encoder.get_input_embeddings()
    if vector is not None and tuple(vector.shape) != (table.embedding_dim,):
        raise ValueError(f"a trigger vector of shape {tuple(vector.shape)} does not fit embeddings of "
                         f"width {table.embedding_dim}")
    wrapper = TriggerEmbedding(table, token, token_id, vector)
    text_encoder.set_input_embeddings(wrapper)
    return wrapper


def trigger_embedding(model) -> TriggerEmbedding | None:
    """The model's learned trigger; None for a text encoder without one, and for any other model."""
    if not hasattr(model, "get_input_embeddings"):
        return None
    table = model.get_input_embeddings()
    return table if isinstance(table, TriggerEmbedding) else None


def trigger_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned trigger vector of a text encoder (none for any other model)."""
    found = [m.vector for m in model.modules() if isinstance(m, TriggerEmbedding)]
    return [p for p in found if p.requires_grad]


@contextmanager
def trigger_disabled(model):
    """The base model's own embedding of the trigger token inside the block (its table row), the learned vector
    again after it; for sampling only: the vector is changed in place."""
    trigger = trigger_embedding(model)
    if trigger is None:
        yield model
        return
    learned = trigger.vector.detach().clone()
    with torch.no_grad():
        trigger.vector.copy_(trigger.table.weight[trigger.token_id])
    try:
        yield model
    finally:
        with torch.no_grad():
            trigger.vector.copy_(learned)
