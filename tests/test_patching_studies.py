"""The IOI and factual-recall studies: their datasets, and the study pipeline end to end."""

from __future__ import annotations

import json

import pytest

from analyses.factual import factual_pairs
from analyses.ioi import ioi_pairs
from analyses.patching_study import PairSet, answer_ids, run_study


def _lengths(tokenizer, texts):
    return {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}


@pytest.mark.parametrize("make", [ioi_pairs, factual_pairs])
def test_pairs_line_up_token_by_token_with_one_token_answers(smollm2_tokenizer, make):
    pairs = make()
    assert len(_lengths(smollm2_tokenizer, pairs.clean + pairs.corrupted)) == 1
    for a in pairs.clean_answer + pairs.corrupted_answer:
        assert len(smollm2_tokenizer(a, add_special_tokens=False)["input_ids"]) == 1, a
    assert all(a != b for a, b in zip(pairs.clean_answer, pairs.corrupted_answer))


def test_ioi_set_swaps_names_in_at_least_twenty_pairs():
    pairs = ioi_pairs()
    assert len(pairs.clean) >= 20
    for clean, corrupted, io, s in zip(pairs.clean, pairs.corrupted, pairs.clean_answer, pairs.corrupted_answer):
        # The clean prompt mentions the subject twice and the indirect object once; the corrupted one the reverse.
        assert clean.count(s.strip()) == 2 and clean.count(io.strip()) == 1
        assert corrupted.count(io.strip()) == 2 and corrupted.count(s.strip()) == 1
    assert "Eiffel Tower" in factual_pairs().clean[0] and factual_pairs().clean_answer[0] == " Paris"


def test_answers_must_be_single_tokens(llama):
    with pytest.raises(ValueError, match="one token"):
        answer_ids(llama, [" Mary", " Xq7zzvbnm"])
    with pytest.raises(ValueError, match="same length"):
        PairSet("x", ["a"], ["b", "c"], [" a"], [" b"])


def test_study_pipeline_end_to_end(llama, tmp_path):
    # The random LLaMA reads SmolLM2's tokenizer, so the real IOI prompts run through every step quickly.
    study = run_study(llama, ioi_pairs(2), progress=False, require_solved=False, log=lambda *a: None)
    for kind in ("resid_pre", "z"):
        for direction in ("denoise", "noise"):
            key = f"{kind}/{direction}"
            assert study.maps[key].per_prompt.shape[0] == 2
            assert study.attribution[key].shape == study.maps[key].shape
            assert -1 <= study.agreement[key]["pearson"] <= 1
    assert study.paths["resid"].shape == (2, 4)
    assert study.paths["heads"].shape[0] == min(r[0] for r in study.receivers)
    index = study.save(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["n_pairs"] == 2 and "resid_pre/denoise" in data["maps"]
    html = index.read_text()
    assert "Path patching" in html and "<svg" in html
    frame = study.to_frame()
    assert set(frame["sweep"]) == set(study.maps)


@pytest.mark.slow
def test_studies_keep_only_the_pairs_smollm2_solves(smollm2):
    from analyses.patching_study import solved_pairs

    dropped = []
    kept = solved_pairs(smollm2, ioi_pairs(), log=dropped.append)
    assert len(kept.clean) >= 20 and len(kept.clean) + len(dropped) == len(ioi_pairs().clean)
    assert all("Michael and Sarah were at the school" not in c for c in kept.clean)  # the pair it gets wrong
    assert len(solved_pairs(smollm2, factual_pairs(), log=dropped.append).clean) >= 6


@pytest.mark.slow
def test_smollm2_ioi_behaviour_and_maps(smollm2):
    from interp.patching import activation_patch, attribution_patch, compare, logit_diff

    pairs = ioi_pairs().take(3)
    correct, wrong = answer_ids(smollm2, pairs.clean_answer), answer_ids(smollm2, pairs.corrupted_answer)
    metric = logit_diff(correct, wrong, normalized=True)
    layers = [0, 8, 16, 24, 29]
    maps = {d: activation_patch(smollm2, pairs.clean, pairs.corrupted, kind="resid_pre", by="layer_pos", metric=metric,
                                direction=d, layers=layers, progress=False) for d in ("denoise", "noise")}
    # SmolLM2 does IOI: the clean run prefers the indirect object, the corrupted run the other name.
    assert (maps["denoise"].clean_metric > 1).all() and (maps["denoise"].corrupted_metric < -1).all()
    # Denoising the layer-0 stream at the second name's position restores most of the answer; noising it breaks it.
    s2 = 9  # "When Mary and John went to the store, John ..." -> " John" at position 9
    assert maps["denoise"].mean[0, s2] > 0.8 and maps["noise"].mean[0, s2] < 0.2
    # The two directions are different maps (not mirror images): compare effect sizes.
    d, n = maps["denoise"].mean, 1 - maps["noise"].mean
    assert float((d - n).abs().max()) > 0.05
    exact = activation_patch(smollm2, pairs.clean, pairs.corrupted, kind="z", by="head", metric=metric,
                             layers=list(range(16, 30)), progress=False)
    approx = attribution_patch(smollm2, pairs.clean, pairs.corrupted, kind="z", by="head", metric=metric,
                               layers=list(range(16, 30)))
    assert compare(exact, approx)["pearson"] > 0.8
