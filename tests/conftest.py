"""Shared fixtures: the bundled real models, their `transformers` twins, and small random
GPT-2 / LLaMA (GQA, untied) / BERT checkpoints that the tests build and save themselves."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

import models
from models.registry import resolve

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "American shrew mole",
    "One mole of carbon dioxide weighs about forty-four grams, while",
    "The doctor decided to take a biopsy of the mole",
]
TOL = dict(atol=1e-4, rtol=1e-5)


from family_specs import randomize_  # noqa: E402  (every parameter random, norm weights around 1)


# ---------------------------------------------------------------------- real models
@pytest.fixture(scope="session")
def smollm2():
    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        resolve("smollm2-135m"), dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def minilm():
    return models.load("minilm-l6")


@pytest.fixture(scope="session")
def minilm_hf():
    from transformers import AutoModel

    return AutoModel.from_pretrained(resolve("minilm-l6"), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from models.loading import load_tokenizer

    return load_tokenizer(resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def bert_tokenizer():
    from models.loading import load_tokenizer

    return load_tokenizer(resolve("minilm-l6"))


def fake_hub_cache(root, repo_id, source_dir, monkeypatch, revision: str = "main"):
    """Put `source_dir` where huggingface_hub keeps `repo_id` at `revision`, offline, so the real hub code
    path resolves it."""
    import hashlib
    import shutil

    import huggingface_hub.constants as hub_constants

    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / hashlib.sha1(revision.encode()).hexdigest()
    shutil.copytree(source_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return snapshot


# ---------------------------------------------------------------------- small random checkpoints
def _save(tmp_path_factory, name, hf_model, tokenizer):
    directory = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, smollm2_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(smollm2_tokenizer),
                     bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    hf = GPT2LMHeadModel(cfg).eval()
    randomize_(hf, seed=1)
    return _save(tmp_path_factory, "gpt2", hf, smollm2_tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, smollm2_tokenizer):
    """LLaMA with grouped KV heads (4 query, 2 KV) and an untied unembedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=1e-5,
                      bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    hf = LlamaForCausalLM(cfg).eval()
    randomize_(hf, seed=2)
    return _save(tmp_path_factory, "llama", hf, smollm2_tokenizer)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, bert_tokenizer):
    """BERT with its MLM head."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     vocab_size=len(bert_tokenizer), max_position_embeddings=64, type_vocab_size=2)
    hf = BertForMaskedLM(cfg).eval()
    randomize_(hf, seed=3)
    return _save(tmp_path_factory, "bert", hf, bert_tokenizer)


@pytest.fixture(scope="session")
def bert_headless_dir(tmp_path_factory, bert_tokenizer):
    """BERT saved without an MLM head (as all-MiniLM is)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     vocab_size=len(bert_tokenizer), max_position_embeddings=64, type_vocab_size=2)
    hf = BertModel(cfg, add_pooling_layer=True).eval()
    randomize_(hf, seed=4)
    return _save(tmp_path_factory, "bert_headless", hf, bert_tokenizer)


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    return models.load(gpt2_dir)


@pytest.fixture(scope="session")
def llama(llama_dir):
    return models.load(llama_dir)


@pytest.fixture(scope="session")
def bert(bert_dir):
    return models.load(bert_dir)


@pytest.fixture(scope="session")
def attn_only():
    """A 2-layer attention-only model without norms (the framework's toy shape), random weights."""
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=32,
                                   d_mlp=None, normalization_type=None, positional_embedding_type="standard",
                                   model_name="attn-only-random")
    model = models.HookedTransformer(cfg)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def attn_only_ln():
    """A 1-layer attention-only model with LayerNorm and rotary positions."""
    torch.manual_seed(1)
    cfg = models.TransformerConfig(n_layers=1, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=32,
                                   d_mlp=None, normalization_type="LN", positional_embedding_type="rotary",
                                   model_name="attn-only-ln-random")
    model = models.HookedTransformer(cfg)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def quick_tour(tmp_path_factory):
    """`interp tour --quick` on the bundled models, run once with every socket call refused:
    (index path, the log lines, the network attempts made)."""
    import socket

    from analyses.tour import run_tour

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test suite")

    saved = {(socket.socket, "connect"): socket.socket.connect, (socket.socket, "connect_ex"): socket.socket.connect_ex,
             (socket, "create_connection"): socket.create_connection, (socket, "getaddrinfo"): socket.getaddrinfo}
    for (owner, name) in saved:
        setattr(owner, name, refuse)
    lines = []
    try:
        index = run_tour(out=tmp_path_factory.mktemp("tour") / "tour", quick=True, log=lines.append, progress=False)
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)
    return index, lines, attempts


# ---------------------------------------------------------------------- every decoder family (tests/family_specs.py)
@pytest.fixture(scope="session")
def family_tokenizer():
    from family_specs import word_tokenizer

    return word_tokenizer()


def _family_names():
    from family_specs import SPECS

    return list(SPECS)


@pytest.fixture(scope="module", params=_family_names())
def family(request, tmp_path_factory, family_tokenizer):
    """(name, the reloaded `transformers` model, our model loaded from the same directory, the directory)."""
    from transformers import AutoModelForCausalLM

    from family_specs import build_hf

    name = request.param
    directory = tmp_path_factory.mktemp(name)
    build_hf(name).save_pretrained(directory)
    family_tokenizer.save_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    # The tokenizer object itself: AutoTokenizer would pick a family's own class (Qwen2Tokenizer) for its files.
    return name, hf, models.load(directory, tokenizer=family_tokenizer), directory
