"""The `interp` subcommands: each runs with sockets blocked, and their numbers are checked
against independent computations (the `transformers` model, a dense eigendecomposition)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from analyses.cli import main as cli_main

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture
def offline(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)
    return attempts


def test_every_command_runs_with_sockets_blocked(offline, llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The mole dug a tunnel.\nOne mole of gas.\n")
    runs = {
        "models": ["models"],
        "models --families": ["models", "--families"],
        "heads": ["heads", "--model", "attn-only-2l", "--out", str(tmp_path / "heads")],
        "patch": ["patch", "--model", str(llama_dir), "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " Mary",
                  "--wrong", " John", "--out", str(tmp_path / "patch")],
        "circuits": ["circuits", "--model", "attn-only-2l", "--out", str(tmp_path / "circuits")],
        "cache": ["cache", "--model", str(llama_dir), "--prompts-file", str(prompts), "--names",
                  "blocks.*.hook_resid_post", "--out", str(tmp_path / "cache.pt")],
        "shift": ["shift", "--model", "minilm-l6", "--word", "mole", "--context", "The mole dug a tunnel.",
                  "--context", "One mole of gas weighs little.", "--out", str(tmp_path / "shift")],
    }
    for name, argv in runs.items():
        assert cli_main(argv) == 0, f"interp {name}: {capsys.readouterr().err}"
    assert offline == [], "a command tried to open a network connection"
    from models.convert import support_table

    assert support_table() in capsys.readouterr().out
    for page in ("heads/index.html", "patch/index.html", "circuits/index.html", "shift/index.html"):
        assert (tmp_path / page).exists(), page


def test_patch_command_numbers(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "patch"
    assert cli_main(["patch", "--model", str(llama_dir), "--clean", CLEAN, "--corrupted", CORRUPTED, "--answer",
                     " Mary", "--wrong", " John", "--method", "both", "--out", str(out)]) == 0
    numbers = json.loads((out / "patch.json").read_text())
    exact = numbers["exact"]
    # Independently, with the transformers model: the metric on the clean and corrupted prompts.
    tok = AutoTokenizer.from_pretrained(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    mary, john = tok(" Mary", add_special_tokens=False).input_ids[0], tok(" John", add_special_tokens=False).input_ids[0]

    def metric(text):
        ids = tok(text, return_tensors="pt").input_ids  # SmolLM2's tokenizer (and ours) add no BOS
        with torch.no_grad():
            logits = hf(ids).logits[0, -1]
        return float(logits[mary] - logits[john]), ids[0]

    clean_m, clean_ids = metric(CLEAN)
    corrupt_m, corrupt_ids = metric(CORRUPTED)
    assert exact["clean_metric"][0] == pytest.approx(clean_m, abs=1e-4)
    assert exact["corrupted_metric"][0] == pytest.approx(corrupt_m, abs=1e-4)
    # Denoising resid_pre of layer 0 at the one differing position makes the corrupted run the clean run.
    pos = int((clean_ids != corrupt_ids).nonzero()[0, 0])
    assert exact["mean"][0][pos] == pytest.approx(clean_m, abs=1e-4)
    assert "agreement" in numbers and -1 <= numbers["agreement"]["pearson"] <= 1


def test_cache_command_equals_transformers_hidden_states(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "acts.pt"
    assert cli_main(["cache", "--model", str(llama_dir), "--prompt", "The mole dug a tunnel", "--names",
                     "blocks.*.hook_resid_post", "--out", str(out)]) == 0
    saved = torch.load(out)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        hidden = hf(saved["tokens"], output_hidden_states=True).hidden_states
    torch.testing.assert_close(saved["activations"]["blocks.0.hook_resid_post"], hidden[1], atol=1e-4, rtol=1e-4)
    assert sorted(saved["activations"]) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_circuits_command_positivity_equals_a_dense_eigendecomposition(tmp_path):
    import models

    out = tmp_path / "circuits"
    assert cli_main(["circuits", "--model", "attn-only-2l-noln", "--out", str(out)]) == 0
    got = torch.tensor(json.loads((out / "circuits.json").read_text())["ov_positivity"])
    model = models.load("attn-only-2l-noln")  # no norms: the circuit is exactly these weights
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            full = (model.W_E @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U).double()
            eig = torch.linalg.eigvals(full)
            assert float(got[layer, head]) == pytest.approx(float(eig.real.sum() / eig.abs().sum()), abs=1e-3)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["patch", "--nope"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments: --nope" in err
    assert cli_main(["patch", "--clean", "a"]) == 1
    assert "needs --clean, --corrupted, --answer and --wrong" in capsys.readouterr().err
