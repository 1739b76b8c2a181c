"""The shipped prompt encoder (real all-MiniLM-L6-v2, offline): token contexts and the sentence token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engines.config import EditorConfig
from engines.model import load_prompt_encoder
from engines.text import MiniLMPromptEncoder

PROMPTS = ["a frosty january morning look", "make it cold and wintry", "make it look like a pencil sketch", ""]


@pytest.fixture(scope="module")
def encoders() -> tuple[MiniLMPromptEncoder, MiniLMPromptEncoder]:
    plain = MiniLMPromptEncoder(tokens=15)
    with_sentence = MiniLMPromptEncoder(tokens=16, sentence_token=True)
    return plain, with_sentence


def test_sentence_token_is_the_mean_of_the_prompts_own_tokens(
    encoders: tuple[MiniLMPromptEncoder, MiniLMPromptEncoder],
) -> None:
    plain, with_sentence = encoders
    tokens = plain.encode(PROMPTS)
    context = with_sentence.encode(PROMPTS)
    assert tokens.shape == (4, 15, 384) and context.shape == (4, 16, 384)
    torch.testing.assert_close(context[:, 1:], tokens)
    used = (tokens.abs().sum(-1) > 0).sum(-1, keepdim=True)
    torch.testing.assert_close(context[:, 0], tokens.sum(1) / used)
    assert (used[3] == 2).all(), "the empty prompt still has [CLS] and [SEP]"


def test_sentence_token_puts_a_paraphrase_nearest_its_own_edit(
    encoders: tuple[MiniLMPromptEncoder, MiniLMPromptEncoder],
) -> None:
    sentence = F.normalize(encoders[1].encode(PROMPTS[:3])[:, 0], dim=-1)
    frosty, cold, pencil = sentence
    assert frosty @ cold > frosty @ pencil


def test_editor_config_chooses_the_sentence_token() -> None:
    config = EditorConfig(prompt_encoder="minilm+sentence", max_prompt_tokens=16)
    encoder = load_prompt_encoder(config, Path("unused-by-minilm"))
    plain = config.model_copy(update={"prompt_encoder": "minilm"})
    assert isinstance(encoder, MiniLMPromptEncoder) and encoder.sentence_token and encoder.tokens == 16
    assert not load_prompt_encoder(plain, Path("unused-by-minilm")).sentence_token


def test_pooled_context_is_the_sentence_token_alone(
    encoders: tuple[MiniLMPromptEncoder, MiniLMPromptEncoder],
) -> None:
    pooled = MiniLMPromptEncoder(tokens=1, sentence_only=True)
    context = pooled.encode(PROMPTS)
    assert context.shape == (4, 1, 384)
    # These prompts fit in 15 tokens, so both pool the same words.
    torch.testing.assert_close(context[:, 0], encoders[1].encode(PROMPTS)[:, 0])
    # A long prompt is pooled over all its words, not cut to a token context's length: its 40th word counts.
    long = "make it look like " + " and ".join(["a faded old photograph"] * 8)
    assert not torch.allclose(pooled.encode([long + " sepia"]), pooled.encode([long + " negative"]))
    with pytest.raises(ValueError, match="a sentence-only context has 1 token, not 16"):
        MiniLMPromptEncoder(tokens=16, sentence_only=True)


def test_a_pooled_context_does_not_depend_on_the_batch_it_was_encoded_in() -> None:
    """Pooled prompts are padded to their batch's longest, not to 128 tokens: a prompt alone, beside a long one, or
    beside short ones reads the same (what the route table holds must be what a PATCHed prompt is compared with)."""
    pooled = MiniLMPromptEncoder(tokens=1, sentence_only=True)
    long = "make it look like " + " and ".join(["a faded old photograph"] * 20)
    alone = torch.cat([pooled.encode([p]) for p in PROMPTS])
    torch.testing.assert_close(pooled.encode(PROMPTS), alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled.encode([*PROMPTS, long])[:4], alone, atol=1e-5, rtol=0)


def test_editor_config_chooses_the_pooled_context() -> None:
    config = EditorConfig(prompt_encoder="minilm-pooled", max_prompt_tokens=1)
    encoder = load_prompt_encoder(config, Path("unused-by-minilm"))
    assert isinstance(encoder, MiniLMPromptEncoder) and encoder.sentence_only and encoder.tokens == 1
