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


# ---------------------------------------------------------------------- LightTokenizer (docs/design.md, "Loading")
from models.tokenizer import (  # noqa: E402
    LIGHT_SPEC, LightEncoding, LightTokenizer, check_light_tokenizer, transformers_tokenizer, write_light_spec,
)

TEXTS = PROMPTS + ["a mole", "", "<|im_start|>user\nhi<|im_end|>", "naïve café 東京 🗼", "  two  spaces\n"]


def _light_dir(tmp_path, tokenizer, name="light"):
    directory = tmp_path / name
    tokenizer.save_pretrained(directory)
    assert write_light_spec(directory, [tokenizer, transformers_tokenizer(directory)]) == []
    assert (directory / LIGHT_SPEC).exists()
    return directory


@pytest.fixture
def light(tmp_path, smollm2_tokenizer):
    return LightTokenizer.from_directory(_light_dir(tmp_path, smollm2_tokenizer))


@pytest.fixture(scope="module")
def light_llama(llama_dir, tmp_path_factory):
    """The llama fixture's directory with interp_tokenizer.json: models.load gives it a LightTokenizer."""
    import shutil

    from models.loading import load_tokenizer

    directory = tmp_path_factory.mktemp("light-llama")
    for f in llama_dir.iterdir():
        shutil.copy(f, directory / f.name)
    assert write_light_spec(directory, [load_tokenizer(llama_dir), transformers_tokenizer(directory)]) == []
    model = models.load(directory)
    assert isinstance(model.tokenizer, LightTokenizer)
    return model


@pytest.mark.parametrize("name", ["smollm2_tokenizer", "bert_tokenizer"])
def test_light_tokenizer_equals_transformers(request, tmp_path, name):
    """Encodings with offsets, tensors, the decoding of every id, tokens, special tokens, attributes."""
    reference = request.getfixturevalue(name)
    light = LightTokenizer.from_directory(_light_dir(tmp_path, reference))
    assert check_light_tokenizer(reference, light, texts=TEXTS) == []
    assert light._hf is None  # all of it answered without transformers


def test_directories_without_the_spec_keep_transformers_tokenizer(llama_dir, llama):
    from models.loading import load_tokenizer

    assert not isinstance(load_tokenizer(llama_dir), LightTokenizer)
    assert not isinstance(llama.tokenizer, LightTokenizer)


def test_model_text_calls_are_the_same_with_a_light_tokenizer(llama, light_llama):
    for prepend_bos in (None, True, False):
        for text in TEXTS[:4]:
            assert torch.equal(light_llama.to_tokens(text, prepend_bos=prepend_bos),
                               llama.to_tokens(text, prepend_bos=prepend_bos))
            assert light_llama.to_str_tokens(text, prepend_bos=prepend_bos) == \
                llama.to_str_tokens(text, prepend_bos=prepend_bos)
    for side in ("left", "right"):
        a, b = light_llama.tokenize(TEXTS, padding_side=side), llama.tokenize(TEXTS, padding_side=side)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attention_mask, b.attention_mask)
        assert a.offsets == b.offsets and a.padding_side == b.padding_side
    tokens = llama.to_tokens(PROMPTS[0])
    assert light_llama.to_string(tokens) == llama.to_string(tokens)
    assert light_llama.to_string(tokens[0]) == llama.to_string(tokens[0])
    assert light_llama.to_single_token(" Paris") == llama.to_single_token(" Paris")
    assert light_llama.generate(PROMPTS[0], max_new_tokens=4) == llama.generate(PROMPTS[0], max_new_tokens=4)
    assert light_llama.tokenizer._hf is None


def test_light_encoding_is_a_batch_encoding(light, smollm2_tokenizer):
    ours, theirs = light(PROMPTS[0]), smollm2_tokenizer(PROMPTS[0])
    assert isinstance(ours, LightEncoding) and dict(ours) == dict(theirs)
    assert ours.input_ids == theirs.input_ids and ours["attention_mask"] == theirs["attention_mask"]
    assert ours[0].ids == theirs[0].ids
    assert ours.tokens() == theirs.tokens() and ours.word_ids() == theirs.word_ids()  # through a BatchEncoding
    with pytest.raises(AttributeError):
        ours.token_type_ids
    batch = light([PROMPTS[0]] * 2, return_tensors="pt", return_offsets_mapping=True)
    reference = smollm2_tokenizer([PROMPTS[0]] * 2, return_tensors="pt", return_offsets_mapping=True)
    assert list(batch) == list(reference) and all(torch.equal(batch[k], reference[k]) for k in reference)
    assert light._hf is None


def test_other_calls_go_to_transformers_and_stay_there(light, smollm2_tokenizer):
    """Anything LightTokenizer does not answer itself builds the transformers tokenizer, which then
    answers everything, so state is never split."""
    chat = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    assert light._hf is None
    expected = smollm2_tokenizer.apply_chat_template(chat, tokenize=False)
    assert light.apply_chat_template(chat, tokenize=False) == expected
    assert light._hf is not None
    assert light.encode(PROMPTS[0]) == smollm2_tokenizer.encode(PROMPTS[0])
    assert dict(light(PROMPTS[0])) == dict(smollm2_tokenizer(PROMPTS[0]))
    assert light.bos_token_id == smollm2_tokenizer.bos_token_id


def test_unsupported_arguments_are_answered_by_transformers(tmp_path, smollm2_tokenizer):
    light = LightTokenizer.from_directory(_light_dir(tmp_path, smollm2_tokenizer))
    padded = light(["a mole", PROMPTS[0]], padding=True, return_tensors="pt")
    reference = smollm2_tokenizer(["a mole", PROMPTS[0]], padding=True, return_tensors="pt")
    assert all(torch.equal(padded[k], reference[k]) for k in reference)
    light = LightTokenizer.from_directory(_light_dir(tmp_path, smollm2_tokenizer, "again"))
    with pytest.raises(ValueError):  # ragged rows: transformers' own error
        light(["a mole", PROMPTS[0]], return_tensors="pt")
    light = LightTokenizer.from_directory(_light_dir(tmp_path, smollm2_tokenizer, "third"))
    assert light.decode([1, 2, 3], clean_up_tokenization_spaces=True) == \
        smollm2_tokenizer.decode([1, 2, 3], clean_up_tokenization_spaces=True)


def test_settable_attributes_carry_over(light, llama_dir, tmp_path):
    light.padding_side = "left"
    light.pad_token = "<|endoftext|>"
    assert light.padding_side == "left" and light.pad_token_id == light.convert_tokens_to_ids("<|endoftext|>")
    light.bos_token_id = 2
    assert light.bos_token == light.convert_ids_to_tokens(2)
    assert light._hf is None
    hf = light.transformers_tokenizer
    assert hf.padding_side == "left" and hf.pad_token == "<|endoftext|>" and hf.bos_token_id == 2
    light.padding_side = "right"  # now forwarded
    assert hf.padding_side == "right"


def test_copies_and_saving(light, smollm2_tokenizer, tmp_path):
    import copy

    from models.loading import load_tokenizer

    twin = copy.deepcopy(light)
    assert dict(twin(TEXTS, return_offsets_mapping=True)) == dict(light(TEXTS, return_offsets_mapping=True))
    light.save_pretrained(tmp_path / "saved")
    assert light._hf is None  # saving did not switch it over
    again = transformers_tokenizer(tmp_path / "saved")  # transformers reads what it saved
    assert check_light_tokenizer(again, light, texts=TEXTS[:3]) == []
    reloaded = load_tokenizer(tmp_path / "saved")  # and the copy loads back light
    assert isinstance(reloaded, LightTokenizer) and check_light_tokenizer(smollm2_tokenizer, reloaded) == []
    light.padding_side = "left"
    light.save_pretrained(tmp_path / "left")
    assert load_tokenizer(tmp_path / "left").padding_side == "left"


def test_a_tokenizer_that_differs_gets_no_spec(tmp_path, smollm2_tokenizer):
    directory = tmp_path / "differs"
    smollm2_tokenizer.save_pretrained(directory)
    other = transformers_tokenizer(directory)
    other.padding_side = "left"
    assert write_light_spec(directory, [smollm2_tokenizer, other])
    assert not (directory / LIGHT_SPEC).exists()
