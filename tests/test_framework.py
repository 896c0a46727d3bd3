"""The framework's phenomena on the shipped models (Olsson et al. protocol), and the study's report."""

from __future__ import annotations

import json

import pytest
import torch

import models
from analyses.framework import framework_study
from interp import circuits
from interp.probing import prefix_matching_scores, previous_token_scores, repeated_random_tokens


@pytest.fixture(scope="module", params=["attn-only-2l", "attn-only-2l-noln"])
def two_layer(request):
    return models.load(request.param)


def test_two_layer_model_has_a_copying_induction_head_built_on_a_previous_token_head(two_layer):
    probe = repeated_random_tokens(two_layer, 25, 4, batch=32, seed=0)
    prefix = prefix_matching_scores(two_layer, tokens=probe)
    head = int(prefix[1].argmax())
    assert prefix[1, head] >= 0.5
    assert circuits.eigenvalue_positivity(circuits.full_ov(two_layer, 1, head)) >= 0.9
    prev = int(previous_token_scores(two_layer, probe)[0].argmax())

    def ablate(z, hook):
        z = z.clone()
        z[:, :, prev] = 0.0
        return z

    with two_layer.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)]):
        ablated = prefix_matching_scores(two_layer, tokens=probe)
    assert ablated[1, head] < 0.5 * prefix[1, head]


def test_induction_lives_in_the_composed_k_circuit(two_layer):
    probe = repeated_random_tokens(two_layer, 25, 4, batch=16, seed=1)
    head = int(prefix_matching_scores(two_layer, tokens=probe)[1].argmax())
    prev = int(previous_token_scores(two_layer, probe)[0].argmax())
    composed = circuits.k_composition_circuit(two_layer, 0, prev, 1, head)
    direct = circuits.full_qk(two_layer, 1, head)
    assert circuits.eigenvalue_positivity(composed) > 0.9
    assert circuits.top1_diagonal_accuracy(composed) > 0.8
    assert circuits.eigenvalue_positivity(direct) < 0.5
    assert circuits.top1_diagonal_accuracy(direct) < 0.2
    # Reported, not gated: the raw K-composition score and its random baseline.
    scores = circuits.composition_scores(two_layer, "K")
    assert scores.scores[0, prev, 1, head] > 0 and 0.05 < scores.baseline < 0.15


@pytest.mark.parametrize("name", ["attn-only-1l", "attn-only-1l-noln"])
def test_one_layer_model_has_no_induction_head(name):
    model = models.load(name)
    assert prefix_matching_scores(model, batch=32).max() < 0.15


def test_framework_study_and_report(tmp_path):
    result = framework_study(n_examples=16)
    assert len(result.to_frame()) == 8
    assert result.path_error < 1e-3
    assert len(result.planted_found) >= 4, "the 1-layer model's top skip-trigrams recover planted rules"
    assert result.direct_path_bigram_accuracy > 0.5
    best = max(result.induction_heads, key=lambda lh: float(result.prefix_matching[lh]))
    assert result.prefix_matching[best] >= 0.5 and result.prefix_after_ablation[best] < 0.5 * result.prefix_matching[best]
    index = result.save(tmp_path / "framework")
    page = index.read_text()
    assert page.count("var CircuitsVis=") == 1 and page.count('data-component="AttentionHeads"') == 2
    assert "K-composition" in page and "<svg" in page
    data = json.loads((tmp_path / "framework" / "framework.json").read_text())
    torch.testing.assert_close(torch.tensor(data["prefix_matching"]), result.prefix_matching)
