"""The synthetic corpus, the training loop, and the shipped attention-only models."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models.attn_only import SPECS, train_spec
from models.synthetic import BOS, CorpusConfig, SyntheticCorpus
from models.training import TrainConfig, train


def test_corpus_is_reproducible_and_has_its_structure():
    corpus = SyntheticCorpus(CorpusConfig(seed=0))
    a = corpus.sample(64, torch.Generator().manual_seed(5))
    b = corpus.sample(64, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.shape == (64, 128) and (a[:, 0] == BOS).all() and (a[:, 1:] != BOS).all()
    assert torch.equal(SyntheticCorpus(CorpusConfig(seed=0)).transitions, corpus.transitions)
    # Roughly half the rows are one segment repeated to the end.
    periodic = sum(any(torch.equal(row[1:1 + n], row[1 + n:1 + 2 * n]) and torch.equal(row[1:1 + n], row[1 + 2 * n:1 + 3 * n])
                       for n in range(10, 41)) for row in a)
    assert 20 <= periodic <= 44


def test_planted_skip_trigrams_fire():
    corpus = SyntheticCorpus(CorpusConfig(seed=0, p_periodic=0.0, p_repeat=0.0))
    x = corpus.sample(256, torch.Generator().manual_seed(1))
    fired = total = 0
    for a, b, c in corpus.rules:
        for row in x:
            seq = row.tolist()
            for pos in range(1, len(seq) - 1):
                if seq[pos] == b and a in seq[1:pos]:
                    total += 1
                    fired += seq[pos + 1] == c
    assert total > 100
    assert fired / total > 0.85  # p_trigram = 0.9, plus the chain's own chance


def test_training_is_deterministic_and_learns():
    spec = SPECS["attn-only-2l"]
    m1, r1 = train_spec(spec, progress=False, steps=30)
    m2, r2 = train_spec(spec, progress=False, steps=30)
    assert r1.losses == r2.losses
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert sum(r1.losses[-5:]) < sum(r1.losses[:5])


@pytest.mark.parametrize("name", list(SPECS))
def test_shipped_model_reproduces_its_recorded_start(name):
    """The first steps of the recorded loss curve come back from the spec and seed."""
    record = json.loads((models.REGISTRY[name].resolve() / "training.json").read_text())
    _, result = train_spec(SPECS[name], progress=False, steps=20)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(record["losses"][:20]), atol=1e-4, rtol=0)


def test_train_accepts_any_config_and_stream():
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=11, n_ctx=12, d_mlp=32,
                                   normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
                                   act_fn="silu")
    model = models.HookedTransformer(cfg)
    data = [torch.arange(12).remainder(11)[None].repeat(4, 1)] * 60  # a fixed, learnable sequence
    result = train(model, data, TrainConfig(steps=60, lr=1e-2, warmup_steps=5), progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert not model.training


@pytest.mark.parametrize("name", list(SPECS))
def test_shipped_models_load_with_card_and_tokenizer(name):
    model = models.load(name)
    directory = models.REGISTRY[name].resolve()
    assert (directory / "README.md").exists()
    assert model.cfg.attn_only and model.cfg.n_heads == 4 and 64 <= model.cfg.d_model <= 128
    assert (model.cfg.normalization_type == "LN") == ("noln" not in name)
    assert model.to_str_tokens("t5 t17 t5") == ["<bos>", "t5", "t17", "t5"]
    size = (directory / "model.safetensors").stat().st_size
    assert size < 2_000_000
