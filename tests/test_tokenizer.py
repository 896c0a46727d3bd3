"""Text in and out, following each checkpoint's own BOS convention, with clear errors."""

from __future__ import annotations

import pytest
import torch

import models
from conftest import PROMPTS


def test_decoder_follows_its_tokenizer_and_prepend_bos_adds_bos(llama, smollm2_tokenizer):
    text = PROMPTS[0]
    own = smollm2_tokenizer(text)["input_ids"]  # SmolLM2's tokenizer adds no BOS
    assert llama.to_tokens(text)[0].tolist() == own
    assert llama.to_tokens(text, prepend_bos=False)[0].tolist() == own
    with_bos = llama.to_tokens(text, prepend_bos=True)[0].tolist()
    assert with_bos == [smollm2_tokenizer.bos_token_id] + own
    # Already there: not added twice.
    assert llama.to_tokens(smollm2_tokenizer.bos_token + text, prepend_bos=True)[0].tolist().count(
        smollm2_tokenizer.bos_token_id) == 1


def test_encoder_follows_its_tokenizer(bert, bert_tokenizer):
    text = "The tower is tall."
    own = bert_tokenizer(text)["input_ids"]
    assert own[0] == bert_tokenizer.cls_token_id and own[-1] == bert_tokenizer.sep_token_id
    assert bert.to_tokens(text)[0].tolist() == own
    assert bert.to_tokens(text, prepend_bos=True)[0].tolist() == own
    assert bert.to_tokens(text, prepend_bos=False)[0].tolist() == own[1:-1]
    assert bert.to_str_tokens(text) == ["[CLS]", "the", "tower", "is", "tall", ".", "[SEP]"]


def test_str_tokens_and_string_round_trip(llama):
    text = PROMPTS[2]
    pieces = llama.to_str_tokens(text)
    assert "".join(pieces) == text
    assert llama.to_string(llama.to_tokens(text)) == [text]
    assert llama.to_string(llama.to_tokens(text)[0]) == text
    batch = llama.to_str_tokens([text, " mole"])
    assert batch[0] == pieces and "".join(batch[1]) == " mole"


def test_padding_mask_and_offsets(llama):
    texts = ["a mole", "one mole of carbon dioxide"]
    for side in ("left", "right"):
        tok = llama.tokenize(texts, padding_side=side)
        lengths = tok.attention_mask.sum(-1).tolist()
        assert lengths == [len(llama.to_tokens(t)[0]) for t in texts]
        short = tok.attention_mask[0]
        assert short[0 if side == "right" else -1] == 1 and short[-1 if side == "right" else 0] == 0
        # Offsets give each token's characters in its own text.
        for i, text in enumerate(texts):
            spans = [s for s, m in zip(tok.offsets[i], tok.attention_mask[i]) if m]
            pieces = [text[a:b] for a, b in spans]
            assert "".join(pieces) == text
            assert any(p.strip() == "mole" for p in pieces)


def test_too_long_text_is_refused_by_name(llama):
    n_ctx = llama.cfg.n_ctx
    long_text = " ".join(["mole"] * (n_ctx + 10))
    with pytest.raises(models.ContextLengthError, match=f"n_ctx={n_ctx}"):
        llama.to_tokens(long_text)
    with pytest.raises(models.ContextLengthError, match=f"n_ctx={n_ctx}"):
        llama(long_text)
    with pytest.raises(models.ContextLengthError, match=f"n_ctx={n_ctx}"):
        llama(torch.zeros(1, n_ctx + 1, dtype=torch.long))
    assert llama.to_tokens(long_text, truncate=True).shape[-1] == n_ctx


def test_single_token(llama):
    assert llama.to_string([llama.to_single_token(" Paris")]) == " Paris"
    with pytest.raises(ValueError, match="not one"):
        llama.to_single_token(" Eiffel Tower")


def test_bad_inputs_get_clear_errors(llama):
    with pytest.raises(TypeError, match="integers"):
        llama(torch.randn(1, 4))
    with pytest.raises(ValueError, match="return_type"):
        llama("hi", return_type="probabilities")
    with pytest.raises(ValueError, match="attention_mask"):
        llama(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 5))


@pytest.mark.slow
def test_real_models_conventions(smollm2, minilm):
    assert smollm2.to_str_tokens("The Eiffel Tower") == ["The", " E", "iffel", " Tower"]
    assert smollm2.to_str_tokens("The Eiffel Tower", prepend_bos=True)[0] == "<|im_start|>"
    assert minilm.to_str_tokens("The Eiffel Tower") == ["[CLS]", "the", "e", "##iff", "##el", "tower", "[SEP]"]
