"""Linear probes: the logistic regression against its closed-form gradient, features against
activations read by hand from run_with_cache, and probes on labels whose answer is known
(the identity of a token, which the embedding carries at every layer)."""

from __future__ import annotations

import json
import random
from functools import partial

import pytest
import torch

from interp.positions import PositionNotFound, field_word, last_token, positions, word
from interp.probing.linear import (
    LinearProbeResult,
    collect_features,
    fit_logistic_regression,
    linear_probe,
    stratified_split,
)

close = partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)

DETS = ["My", "Your", "The", "A", "That", "This", "Her", "His"]
ADJS = ["old", "big", "small", "lazy", "happy", "young", "black", "white"]


def animal_examples(n: int = 64, seed: int = 0, tail: str = ""):
    """"<det> <adj> cat|dog<tail>" with the animal drawn at random, so nothing else predicts it."""
    rng = random.Random(seed)
    prefixes = [f"{d} {a}" for d in DETS for a in ADJS]
    rng.shuffle(prefixes)
    animals = [rng.choice(["cat", "dog"]) for _ in range(n)]
    return [{"text": f"{p} {a}{tail}", "animal": a} for p, a in zip(prefixes, animals)], animals


# ---------------------------------------------------------------------- logistic regression
def closed_form_gradient(X, y, W, b, l2, mean, std):
    """Gradient of mean cross-entropy + l2/2 ||W||^2 on standardised features, by hand."""
    Xs = (X.double() - mean) / std
    P = torch.softmax(Xs @ W + b, dim=-1)
    Y = torch.nn.functional.one_hot(y, W.shape[1]).double()
    return Xs.T @ (P - Y) / len(X) + l2 * W, (P - Y).mean(0)


def noisy_three_classes(n=90, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.randn(3, d, generator=g)
    # Features on different scales and offsets, so the standardisation matters.
    X = (centres[y] + 1.5 * torch.randn(n, d, generator=g)) * torch.logspace(-2, 2, d) + 7.0
    return X, y


@pytest.mark.parametrize("l2", [1e-2, 1.0])
def test_logistic_regression_gradient_vanishes_at_optimum(l2):
    X, y = noisy_three_classes()
    probe = fit_logistic_regression(X, y, n_classes=3, l2=l2)
    W, b = probe
    assert W.shape == (6, 3) and b.shape == (3,)
    # The standardisation is the training set's mean and population std.
    close(probe.mean, X.double().mean(0))
    close(probe.std, ((X.double() - X.double().mean(0)) ** 2).mean(0).sqrt())
    gW, gb = closed_form_gradient(X, y, W, b, l2, X.double().mean(0), X.double().std(0, unbiased=False))
    assert gW.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    # Not the trivial optimum: the data has signal, the fit uses it.
    assert W.abs().max() > 1e-2 and probe.accuracy(X, y) > 0.5
    # predict() applies the stored standardisation to raw features.
    Xs = (X.double() - probe.mean) / probe.std
    assert torch.equal(probe.predict(X), (Xs @ W + b).argmax(-1))
    

def test_logistic_regression_separable_and_deterministic():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(40) % 2
    X = torch.randn(40, 10, generator=g)
    X[:, 3] += 6.0 * (2 * y - 1)  # one direction separates the classes by a wide margin
    first = fit_logistic_regression(X, y, n_classes=2, l2=1e-3)
    assert first.accuracy(X, y) == 1.0
    second = fit_logistic_regression(X.clone(), y.clone(), n_classes=2, l2=1e-3)
    assert torch.equal(first.W, second.W) and torch.equal(first.b, second.b)
    # directions are the weights in raw coordinates: the raw logit difference is X @ directions + const.
    raw = X.double() @ first.directions
    diffs = first.logits(X) - raw
    close(diffs, diffs[:1].expand_as(diffs))
    # A constant feature cannot divide by a zero std.
    X[:, 0] = 5.0
    assert torch.isfinite(fit_logistic_regression(X, y, 2).W).all()


def test_stratified_split_keeps_class_proportions():
    y = torch.tensor([0] * 12 + [1] * 8 + [2] * 4)
    train, test = stratified_split(y, 0.25, seed=3)
    assert sorted(train.tolist() + test.tolist()) == list(range(24))
    assert torch.bincount(y[test]).tolist() == [3, 2, 1]
    assert torch.equal(stratified_split(y, 0.25, seed=3)[1], test)
    assert not torch.equal(stratified_split(y, 0.25, seed=4)[1], test)


# ---------------------------------------------------------------------- features
def by_hand(model, text, name, pos):
    """The activation at `pos` of `text` run alone, every hook point cached."""
    _, cache = model.run_with_cache(text)
    return cache[name][0, pos].reshape(-1)  # per-head activations flattened head-major


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_collect_features_matches_run_with_cache(fixture, request, monkeypatch):
    model = request.getfixturevalue(fixture)
    texts = ["The cat", "A small dog sat on the mat", "Hello there my old friend", "Why", "A small dog sat on a rug"]
    calls = []
    real = model.run_with_cache

    def spy(*args, **kwargs):
        calls.append(kwargs["names_filter"])
        out, cache = real(*args, **kwargs)
        calls.append(set(cache))
        return out, cache

    monkeypatch.setattr(model, "run_with_cache", spy)
    feats = collect_features(model, texts, hook="resid_post", layers=[1, 0], batch_size=2)
    assert feats.shape == (2, 5, 64)
    wanted = {"blocks.1.hook_resid_post", "blocks.0.hook_resid_post"}
    assert all(set(c) == wanted for c in calls)  # exactly the hooks asked for, nothing more cached
    # Lengths 2, 7, 5, 1, 7: four groups, the two 7-token prompts share a batch.
    assert len(calls) == 2 * 4
    monkeypatch.undo()
    for i, text in enumerate(texts):
        close(feats[0, i], by_hand(model, text, "blocks.1.hook_resid_post", -1))
        close(feats[1, i], by_hand(model, text, "blocks.0.hook_resid_post", -1))

    embed = collect_features(model, texts, hook="hook_embed", position=0)
    assert embed.shape == (1, 5, 64)
    for i, text in enumerate(texts):
        close(embed[0, i], model.W_E[model.to_tokens(text)[0, 0]])

    z = collect_features(model, texts, hook="z", layers=[-1], position=last_token())
    assert z.shape == (1, 5, 4 * 16)  # heads flattened
    for i, text in enumerate(texts):
        close(z[0, i], by_hand(model, text, "blocks.1.attn.hook_z", -1))

    final = collect_features(model, texts[:2], hook="ln_final.hook_normalized")
    for i, text in enumerate(texts[:2]):
        close(final[0, i], by_hand(model, text, "ln_final.hook_normalized", -1))


def test_collect_features_on_an_encoder(bert):
    texts = ["the cat sat", "a dog barked at the moon"]
    feats = collect_features(bert, texts, hook="normalized_resid_post", layers=[0], position=1)
    for i, text in enumerate(texts):
        close(feats[0, i], by_hand(bert, text, "blocks.0.hook_normalized_resid_post", 1))


def test_multi_token_word_reduced(llama):
    text = "The Eiffel Tower is tall"
    assert llama.to_str_tokens(text)[1:3] == [" E", "iffel"]  # the word is tokens 1 and 2
    _, cache = llama.run_with_cache(text)
    for reduce, expected in [("mean", lambda a: a[1:3].mean(0)), ("first", lambda a: a[1]), ("last", lambda a: a[2])]:
        feats = collect_features(llama, [text, {"text": "In Paris the Eiffel Tower is tall"}], layers=[0, 1],
                                 position=word("Eiffel"), reduce=reduce)
        for layer in (0, 1):
            close(feats[layer, 0], expected(cache["resid_post", layer][0]))
    # A dict example's fields feed field selectors.
    feats = collect_features(llama, [{"text": text, "w": "Tower"}], layers=[0], position=field_word("w"))
    close(feats[0, 0], cache["resid_post", 0][0, 3])


# ---------------------------------------------------------------------- probes
@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_token_identity_is_decodable_and_control_is_not(fixture, request):
    model = request.getfixturevalue(fixture)
    examples, animals = animal_examples()
    result = linear_probe(model, examples, animals)
    assert isinstance(result, LinearProbeResult)
    assert result.layers == [0, 1] and result.classes == ["cat", "dog"]
    assert result.n_train + result.n_test == 64 and result.n_test == 16
    assert result.test_accuracy[0] >= 0.9 and (result.test_accuracy >= 0.8).all()
    assert (result.train_accuracy == 1.0).all()
    assert (result.control_accuracy <= 0.75).all()
    assert result.best_layer() in (0, 1)
    assert 0.5 <= result.chance <= 9 / 16
    # Integer labels are the same problem: the same classes in the same order give the same numbers.
    as_ints = linear_probe(model, examples, [int(a == "dog") for a in animals])
    assert torch.equal(as_ints.test_accuracy, result.test_accuracy)
    assert torch.equal(as_ints.control_accuracy, result.control_accuracy)
    assert as_ints.classes == [0, 1]


def test_probe_at_a_word_inside_the_sentence(llama):
    examples, animals = animal_examples(tail=" sat there")
    at_word = linear_probe(llama, examples, animals, position=field_word("animal"), layers=[0], control=False)
    assert at_word.test_accuracy[0] >= 0.9
    assert torch.isnan(at_word.control_accuracy).all()
    # Same features as reading the animal's position: the third token of each prompt.
    by_index = linear_probe(llama, examples, animals, position=2, layers=[0], control=False)
    assert torch.equal(by_index.test_accuracy, at_word.test_accuracy)


def test_result_frame_plot_save(llama, tmp_path):
    examples, animals = animal_examples(32)
    result = linear_probe(llama, examples, animals, hook="mlp_out", seed=1)
    frame = result.to_frame()
    assert list(frame["layer"]) == [0, 1]
    assert frame["test_accuracy"].tolist() == result.test_accuracy.tolist()
    assert frame["selectivity"].tolist() == pytest.approx((result.test_accuracy - result.control_accuracy).tolist())
    from matplotlib.figure import Figure

    fig = result.plot()
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["test", "control", "chance"]
    assert "<table" in result._repr_html_() and "<svg" in result._repr_html_()
    page = result.save(tmp_path)
    assert page.exists() and "<svg" in page.read_text()
    data = json.loads((tmp_path / "linear_probe.json").read_text())
    assert data["classes"] == ["cat", "dog"] and len(data["layers"]) == 2
    assert data["best_layer"] == result.best_layer()
    single = linear_probe(llama, examples, animals, hook="hook_embed", control=False)
    assert single.layers == ["hook_embed"] and isinstance(single.plot(), Figure)
    single.save(tmp_path / "single")  # strict JSON: the missing control is null, not NaN
    assert json.loads((tmp_path / "single" / "linear_probe.json").read_text())["layers"][0]["control_accuracy"] is None


def test_errors(llama):
    examples, animals = animal_examples(8)
    with pytest.raises(ValueError, match="8 examples but 7 labels"):
        linear_probe(llama, examples, animals[:7])
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(llama, examples, ["cat"] * 8)
    with pytest.raises(ValueError, match="fewer than 2 examples"):
        linear_probe(llama, examples, ["cat"] * 7 + ["dog"])
    texts = ["the cat sat", "the dog sat", "a cat sat", "one bird flew"]
    with pytest.raises(PositionNotFound, match="one bird flew"):
        linear_probe(llama, texts, ["a", "b", "a", "b"], position=word("sat"))
    with pytest.raises(PositionNotFound, match="one bird flew"):
        collect_features(llama, texts, position=lambda p: [] if "bird" in p.text else [0])

    def no_noun(prompt):  # a selector whose own message does not name the prompt
        if "bird" in prompt.text:
            raise PositionNotFound("no noun")
        return [1]

    with pytest.raises(PositionNotFound, match="example 3 .'one bird flew'.: no noun"):
        collect_features(llama, texts, position=no_noun)
    with pytest.raises(PositionNotFound, match="'one bird'"):
        collect_features(llama, ["the cat sat down", "one bird"], position=positions(3))
    with pytest.raises(ValueError, match="takes no layers"):
        collect_features(llama, texts, hook="hook_embed", layers=[0])
    with pytest.raises(ValueError, match="outside"):
        collect_features(llama, texts, layers=[2])
    with pytest.raises(ValueError, match="reduce"):
        collect_features(llama, texts, reduce="max")
    with pytest.raises(KeyError, match="hook_resid_pots"):
        collect_features(llama, texts, hook="blocks.0.hook_resid_pots")


# ---------------------------------------------------------------------- a real model
# A causal model sees only what precedes "mole", so the context that decides its sense comes
# first, and no two sentences share the words up to "mole" (their features would be identical).
ANIMAL = [
    "The gardener found a tunnel dug by a mole under the lawn.",
    "My dog chased a mole across the field.",
    "Deep in the soil, the blind mole hunts for worms.",
    "Farmers hate it when a furry mole ruins their crops.",
    "The owl swooped down and caught the mole at dusk.",
    "Our cat brought a dead mole to the doorstep.",
    "With its huge front claws, the mole digs very fast.",
    "The fresh hill of earth showed where the mole had been digging.",
    "Earthworms are the favourite food of the mole.",
    "Under the meadow lives a small velvety mole.",
    "The star-nosed mole is a small animal of the wetlands.",
    "A fox sniffed the ground looking for a mole.",
]
CHEMISTRY = [
    "In chemistry, one mole of carbon weighs twelve grams.",
    "The chemist dissolved one mole of salt in water.",
    "At standard pressure, a mole of gas fills about twenty-two litres.",
    "Avogadro's number is the count of particles in one mole.",
    "For the reaction we need half a mole of sulfuric acid.",
    "The combustion produced exactly one mole of water vapour.",
    "How many grams of oxygen are there in a mole?",
    "The gas constant is measured in joules per mole per kelvin.",
    "The molar mass is the weight of one mole of a substance.",
    "Titration showed that a tenth of a mole of base was used.",
    "The stoichiometry problem asked for the mole ratio of hydrogen to oxygen.",
    "A chemistry student weighed out a mole of copper sulfate.",
]


@pytest.mark.slow
def test_mole_sense_on_smollm2(smollm2):
    texts = ANIMAL + CHEMISTRY
    labels = ["animal"] * len(ANIMAL) + ["chemistry"] * len(CHEMISTRY)
    result = linear_probe(smollm2, texts, labels, position=word("mole", sub="last"), test_fraction=0.5)
    print("\n" + result.to_frame().to_string(index=False))
    assert len(result.layers) == 30 and result.n_test == 12
    best = result.layers.index(result.best_layer())
    assert result.test_accuracy[best] >= 0.75
    assert result.test_accuracy[best] > result.control_accuracy[best]
    # The sense is read from context: averaged over layers the probe beats its control clearly.
    assert result.test_accuracy.mean() > result.control_accuracy.mean() + 0.2
