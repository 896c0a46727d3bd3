"""The original transformer trained here, and the study that reads it (issue 15, part 3).

The alignment threshold: the saved model's layer-1 cross-attention (the mean over its
heads) reads the aligned source word at 99.3% of the steps of 200 held-out sentences,
and its best head at 99.9%; chance is about 1/7 (one source word of ~7). We require 0.9
for the head mean: a model that learned the reordering clears it by far, while attention
that has not yet located the words (layer 0's heads of the same model) scores 0.48-0.59.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import models
from models import toy_translation as toy
from models.registry import resolve


@pytest.fixture(scope="module")
def translator():
    return models.load("translation-2l")


@pytest.fixture(scope="module")
def study(translator):
    from analyses.seq2seq import seq2seq_study

    return seq2seq_study(translator, n_sentences=200)


def test_the_grammar_reorders_and_its_alignment_is_exact():
    pair = toy.make_pair("fox", ["big", "red"], "chases", "cat", ["small"])
    assert pair.source_text == "big red fox chases small cat"
    assert pair.target == ["foxa", "redo", "bigo", "cata", "smallo", "chaseu"]
    assert [pair.source[i] for i in pair.alignment] == ["fox", "red", "big", "cat", "small", "chases"]
    assert all(toy.LEXICON[pair.source[a]] == t for t, a in zip(pair.target, pair.alignment))


def test_cross_attention_recovers_the_alignment(study):
    layer, head, score = study.best
    print(study.headline())
    assert study.exact_match >= 0.95
    assert float(study.layer_alignment.max()) >= 0.9, "the head mean of the best layer reads the aligned word"
    assert score >= 0.9 and study.alignment.shape == (2, 5)
    assert float(study.alignment[0].max()) < float(study.alignment[1].max()), "alignment is a last-layer job here"


def test_training_reproduces_its_first_recorded_losses():
    from models.translation import TranslationSpec, train_spec

    recorded = json.loads((resolve("translation-2l") / "training.json").read_text())["first_losses"]
    _, result = train_spec(TranslationSpec(), steps=len(recorded), progress=False)
    assert_close(torch.tensor(result.losses), torch.tensor(recorded), atol=1e-5, rtol=1e-5)


def test_sinusoidal_positions_stay_fixed_and_are_measured(translator, study):
    from models.encoder_decoder import sinusoidal_table

    assert torch.equal(translator.encoder.pos_embed.W_pos, sinusoidal_table(32, 64))  # training left them alone
    sim = study.position_similarity
    assert_close(sim.diagonal(), torch.ones(len(sim)), atol=1e-5, rtol=0)
    assert sim[0, 1] > sim[0, 5], "nearby positions are more alike than distant ones"
    assert 0 < study.position_variance_share < 1 and study.position_norm_ratio > 0


def test_patching_map_across_the_stacks(study):
    """Patching the object noun's source position restores the clean answer from the encoder's first layer;
    the decoder's own input is the same in both runs, so its first layer's stream restores nothing, and the
    answer arrives through cross-attention."""
    enc, dec, cross = (study.patching[k].mean for k in ("encoder resid_pre", "decoder resid_pre",
                                                         "decoder cross_attn_out"))
    obj = 4  # "a1 subj verb a2 OBJ </s>": the object noun's position
    assert float(enc[0, obj]) > 0.95 and float(enc[0].abs().sum() - enc[0, obj].abs()) < 0.1
    assert float(dec[0].abs().max()) < 1e-4
    assert float(cross[:, -1].max()) > 0.5


def test_encoder_roles_are_attention_shares(study):
    roles = study.encoder_roles
    assert roles.shape == (2, 4, 4) and (roles >= 0).all() and (roles <= 1).all()


def test_report_page(study, tmp_path):
    page = study.save(tmp_path)
    text = page.read_text()
    assert "What was run" in text and text.count("<svg") >= 5
    numbers = json.loads((tmp_path / "seq2seq.json").read_text())
    assert numbers["best"]["accuracy"] == study.best[2]
    assert len(study.to_frame()) == 10


def test_study_refuses_a_decoder_only_model(llama):
    from analyses.seq2seq import seq2seq_study

    with pytest.raises(ValueError, match="encoder-decoder"):
        seq2seq_study(llama)
