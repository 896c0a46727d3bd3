"""interp.collect: activations over a corpus, written to shards, read back, resumed, split over torchrun ranks
and exported for SAELens; each checked against an independent computation (run_with_cache on the same
tokens, the tokenizer itself, the files of an uninterrupted single-process run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import interp.collect.run as run
import models
from interp.collect import (ActivationDataset, EmptyCorpusError, IncompatibleOutputError, collect_activations,
                            default_corpus, export_saelens, load_corpus, pack)
from interp.names import HookNameError

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post"]
SEQ = 16


@pytest.fixture(scope="module")
def texts():
    return list(default_corpus().texts[:12])


def tiny(tokenizer, seed: int = 0, **changes) -> models.HookedTransformer:
    torch.manual_seed(seed)
    cfg = models.TransformerConfig(**{**dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=len(tokenizer),
                                             n_ctx=32, d_mlp=48, model_name="collect-tiny"), **changes})
    return models.HookedTransformer(cfg, tokenizer=tokenizer).requires_grad_(False)


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    return tiny(smollm2_tokenizer)


def collect(model, corpus, out, **kw):
    options = dict(seq_len=SEQ, batch_size=4, shard_bytes=40_000, progress=False)
    return collect_activations(model, corpus, kw.pop("hooks", HOOKS), out, **{**options, **kw})


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def collected(model, texts, tmp_path_factory):
    return collect(model, texts, tmp_path_factory.mktemp("acts") / "acts")


# ---------------------------------------------------------------------- corpus and packing
def test_default_corpus_is_the_wikipedia_summaries():
    corpus = default_corpus()
    assert len(corpus) == 10033 and corpus.texts[0].startswith("20th-century classical music is")
    assert sum(map(len, corpus.texts)) > 4_000_000
    assert load_corpus(None).fingerprint == load_corpus("wiki").fingerprint == corpus.fingerprint
    assert load_corpus(list(corpus.texts[:-1]) + ["changed"]).fingerprint != corpus.fingerprint


def test_load_corpus_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps("third") + "\n")
    (tmp_path / "c.json").write_text(json.dumps({"T": {"extract": "fourth"}}))
    assert load_corpus(tmp_path).texts == ("first document", "second", "third", "fourth")
    assert load_corpus(str(tmp_path / "a.txt")).texts == ("first document",)
    assert load_corpus("just a string").texts == ("just a string",)
    ids = np.arange(12).reshape(3, 4)
    np.save(tmp_path / "t.npy", ids)
    from safetensors.numpy import save_file

    save_file({"tokens": ids}, str(tmp_path / "t.safetensors"))
    for source in (tmp_path / "t.npy", tmp_path / "t.safetensors", ids, torch.tensor(ids), [list(r) for r in ids]):
        corpus = load_corpus(source)
        assert corpus.is_tokens and [d.tolist() for d in corpus.token_docs] == ids.tolist()
    assert load_corpus(ids).fingerprint == load_corpus(tmp_path / "t.npy").fingerprint
    assert load_corpus(ids[0]).token_docs[0].tolist() == [0, 1, 2, 3]  # 1-D: one document


def test_packing_follows_saelens():
    """BOS starts every row and separates documents; a document that starts with BOS gets no second one;
    the last partial row is dropped."""
    docs = [np.array(d) for d in ([5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [1, 20, 21], [22, 23, 24])]
    assert pack(docs, 4, bos=1).tolist() == [[1, 5, 6, 7], [1, 8, 9, 1], [1, 10, 11, 12], [1, 13, 14, 1],
                                             [1, 20, 21, 1], [1, 22, 23, 24]]
    assert pack(docs, 4, bos=None).tolist() == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 1, 20], [21, 22, 23, 24]]
    assert pack(docs, 4, bos=1, max_sequences=2).shape == (2, 4)


def test_packed_text_is_the_tokenizer_s_ids(collected, smollm2_tokenizer, texts):
    tokens = collected.tokens()
    bos = smollm2_tokenizer.bos_token_id
    assert (tokens[:, 0] == bos).all()
    stream = tokens[tokens != bos].tolist()
    expected = [i for t in texts for i in smollm2_tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert stream == expected[:len(stream)] and len(stream) > len(expected) - 2 * SEQ


# ---------------------------------------------------------------------- activations and files
def test_shards_hold_what_run_with_cache_computes(collected, model):
    manifest = collected.manifest
    assert len(collected.shards) > 2 and manifest["stop_at_layer"] == 2
    assert [s["sequences"] for s in manifest["shards"]][-1][1] == collected.n_sequences
    assert manifest["hooks"]["blocks.1.attn.hook_pattern"]["shape"] == [SEQ, 4, SEQ]
    tokens = collected.tokens()
    _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    for hook in HOOKS:
        expected = cache[hook].movedim(2, 1) if hook.endswith("pattern") else cache[hook]
        torch.testing.assert_close(collected.load(hook), expected, atol=1e-5, rtol=1e-5)
    item = collected[-1]
    torch.testing.assert_close(item[HOOKS[0]], cache[HOOKS[0]][-1], atol=1e-5, rtol=1e-5)
    assert item["tokens"].tolist() == tokens[-1].tolist() and item["sequence"] == len(collected) - 1
    from safetensors.torch import load_file  # the shards are plain safetensors files

    first = load_file(str(collected.path / "shard-00000.safetensors"))
    assert torch.equal(first["tokens"].long(), tokens[:len(first["tokens"])])


def test_positions_dtype_and_stop_layer(model, texts, tmp_path):
    ds = collect(model, texts, tmp_path / "acts", hooks=["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"],
                 positions=[0, -1], dtype="float16", max_sequences=5)
    assert ds.manifest["stop_at_layer"] == 1 and ds.positions == [0, SEQ - 1] and len(ds) == 5
    assert ds.shape("blocks.0.hook_resid_post") == (2, 32) and ds.n_tokens == 10
    _, cache = model.run_with_cache(ds.tokens(), names_filter=ds.hooks)
    resid = ds.load("blocks.0.hook_resid_post")
    assert resid.dtype == torch.float16
    torch.testing.assert_close(resid, cache["blocks.0.hook_resid_post"][:, [0, -1]].half())
    torch.testing.assert_close(ds.load("blocks.0.attn.hook_pattern"),
                               cache["blocks.0.attn.hook_pattern"].movedim(2, 1)[:, [0, -1]].half())
    assert ds[2]["tokens"].tolist() == ds.tokens()[2, [0, -1]].tolist()
    bf16 = collect(model, texts, tmp_path / "bf16", hooks=[("resid_post", 0)], dtype=torch.bfloat16, max_sequences=3)
    assert torch.equal(bf16.load("blocks.0.hook_resid_post"), cache["blocks.0.hook_resid_post"][:3].bfloat16())
    with pytest.raises(ValueError, match="dtype='float32'"):
        export_saelens(bf16.path, "blocks.0.hook_resid_post", tmp_path / "bf16-saelens")


def test_a_module_hooked_with_attach(tmp_path):
    """interp.attach's wrapper (no stop_at_layer: it runs whole) against transformers' own hidden states."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp import attach

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)).eval()
    corpus = np.random.default_rng(0).integers(2, 100, size=(20, 15))
    ds = collect_activations(attach(hf), corpus, ["model.layers.0"], tmp_path / "acts", seq_len=16, progress=False)
    assert ds.manifest["packing"]["bos_token_id"] == hf.config.bos_token_id and len(ds) == 20
    with torch.no_grad():
        hidden = hf(ds.tokens(), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(ds.load("model.layers.0"), hidden)


def test_batches_are_seeded_and_complete(collected):
    hook = HOOKS[0]
    rows = collected.load(hook).reshape(-1, 32)
    small = dict(buffer_bytes=3 * 16 * 32 * 4)  # a few sequences per buffer: rows carry across buffers
    one = list(collected.batches(hook, 37, seed=1, **small))
    assert [b.shape[0] for b in one[:-1]] == [37] * (len(one) - 1) and 0 < one[-1].shape[0] <= 37
    assert all(torch.equal(a, b) for a, b in zip(one, collected.batches(hook, 37, seed=1, **small)))
    other = torch.cat(list(collected.batches(hook, 37, seed=2, **small)))
    shuffled = torch.cat(one)
    assert not torch.equal(shuffled, other) and not torch.equal(shuffled, rows)
    key = torch.randn(32, dtype=torch.float64)
    for got in (shuffled, other):
        assert torch.equal(got[(got.double() @ key).argsort()], rows[(rows.double() @ key).argsort()])
    assert torch.equal(torch.cat(list(collected.batches(hook, 50, shuffle=False))), rows)
    dropped = list(collected.batches(hook, 37, seed=1, drop_last=True, **small))
    assert all(b.shape[0] == 37 for b in dropped) and len(dropped) == rows.shape[0] // 37
    acts, toks = next(iter(collected.batches(hook, 64, seed=0, with_tokens=True)))
    flat_tokens = collected.tokens().reshape(-1)
    index = [int(((rows == a).all(-1)).nonzero()[0, 0]) for a in acts[:5]]
    assert toks[:5].tolist() == flat_tokens[index].tolist()
    flat = collected.rows(hook)
    assert len(flat) == rows.shape[0] and torch.equal(flat[SEQ + 3], rows[SEQ + 3])
    loader = torch.utils.data.DataLoader(collected.rows(hook, with_tokens=True), batch_size=100)
    acts, toks = next(iter(loader))
    assert torch.equal(acts, rows[:100]) and toks.tolist() == flat_tokens[:100].tolist()


def test_resume_after_a_kill_is_byte_identical(model, texts, tmp_path, monkeypatch):
    whole = collect(model, texts, tmp_path / "whole")
    real, written = run.write_shard, []

    def dies_at_the_third(path, tensors, metadata):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path.name)
        real(path, tensors, metadata)

    monkeypatch.setattr(run, "write_shard", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        collect(model, texts, tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == written  # no manifest yet
    (tmp_path / "resumed" / ".shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # a kill mid-write
    again: list[str] = []
    monkeypatch.setattr(run, "write_shard", lambda path, *a: (again.append(path.name), real(path, *a)))
    collect(model, texts, tmp_path / "resumed")
    assert len(again) == len(whole.shards) - 2 and not set(again) & set(written)
    assert files(tmp_path / "resumed") == files(whole.path)


@pytest.mark.slow
def test_torchrun_ranks_write_the_single_process_files(tmp_path):
    """2 gloo ranks over 7 sequences (4 shards of 2, the last of 1): the same files, byte for byte."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "tokens.npy", rng.integers(2, 64, size=(7, 7)))  # each row + BOS is one sequence
    worker = str(Path(__file__).with_name("collect_worker.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [str(tmp_path / "tokens.npy"), "2200"]
    single = subprocess.run([sys.executable, worker, str(tmp_path / "single"), *args], env=env, capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            worker, str(tmp_path / "ranks"), *args], env=env, capture_output=True, text=True,
                           timeout=180)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    wrote = sorted(re.findall(r"rank \d wrote shard-\d+\.safetensors", ranks.stdout))  # lines may interleave
    assert wrote == ["rank 0 wrote shard-00000.safetensors", "rank 0 wrote shard-00002.safetensors",
                     "rank 1 wrote shard-00001.safetensors", "rank 1 wrote shard-00003.safetensors"]
    assert files(tmp_path / "ranks") == files(tmp_path / "single")
    ds = ActivationDataset(tmp_path / "ranks")
    covered = [i for s in ds.shards for i in range(*s["sequences"])]
    assert covered == list(range(7)) and len(ds) == 7


def test_export_saelens_round_trip(collected, tmp_path):
    datasets = pytest.importorskip("datasets")
    hook = HOOKS[0]
    dest = export_saelens(collected.path, hook, tmp_path / "saelens")
    loaded = datasets.load_from_disk(str(dest))
    assert loaded.features[hook].shape == (SEQ, 32) and loaded.features[hook].dtype == "float32"
    assert loaded.column_names == [hook, "token_ids"] and len(loaded) == len(collected)
    loaded.set_format("torch")
    rows = loaded[:len(loaded)]  # as SAELens's ActivationsStore reads it: a slice, then the column
    assert torch.equal(rows[hook], collected.load(hook))
    assert torch.equal(rows["token_ids"].long(), collected.tokens())
    with pytest.raises(FileExistsError, match="not empty"):
        export_saelens(collected.path, hook, dest)
    with pytest.raises(ValueError, match="one vector per token"):
        export_saelens(collected.path, HOOKS[1], tmp_path / "pattern")


# ---------------------------------------------------------------------- bad input: named errors, nothing written
def test_bad_input_raises_before_writing(model, texts, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(EmptyCorpusError, match="no text"):
        collect(model, ["", "  "], out)
    with pytest.raises(EmptyCorpusError, match="no text"):
        collect(model, [], out)
    with pytest.raises(EmptyCorpusError, match="fewer than one sequence"):
        collect(model, ["Too short."], out)
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        collect(model, texts, out, hooks=["blocks.0.hook_resid_pots"])
    with pytest.raises(HookNameError, match="no hook point matches"):
        collect(model, texts, out, hooks=["blocks.*.hook_nothing"])
    with pytest.raises(ValueError, match="n_ctx=32"):
        collect(model, texts, out, seq_len=64)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        collect(model, [np.array([5, 10**6] * 20)], out)
    with pytest.raises(ValueError, match="outside a sequence"):
        collect(model, texts, out, positions=[SEQ])
    with pytest.raises(ValueError, match="nothing to collect"):
        collect(model, texts, out, max_tokens=0)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(IncompatibleOutputError, match="is a file"):
        collect(model, texts, tmp_path / "file")


def test_another_collection_in_out_dir_is_refused_and_kept(model, smollm2_tokenizer, texts, tmp_path,
                                                           monkeypatch):
    out = tmp_path / "acts"
    collect(model, texts, out, max_sequences=6)
    before = files(out)
    others = {
        "model.weights_hash": (tiny(smollm2_tokenizer, seed=1), texts, {}),
        "model.config_hash": (tiny(smollm2_tokenizer, d_mlp=64), texts, {}),
        "corpus.fingerprint": (model, texts[1:], {}),
        "packing.seq_len": (model, texts, {"seq_len": 8}),
        "hooks": (model, texts, {"hooks": HOOKS[:1]}),
        "positions": (model, texts, {"positions": [-1]}),
    }
    for field, (other, corpus, kw) in others.items():
        with pytest.raises(IncompatibleOutputError, match=field.replace(".", r"\.")) as err:
            collect(other, corpus, out, max_sequences=6, **kw)
        assert "choose another out_dir" in str(err.value)
        assert files(out) == before, field
    # A killed run leaves shards but no manifest: they are recognised too.
    (out / "manifest.json").unlink()
    with pytest.raises(IncompatibleOutputError, match="shard-00000"):
        collect(model, texts, out, max_sequences=6, seq_len=8)
    (out / "manifest.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(IncompatibleOutputError, match="not a collection manifest"):
        collect(model, texts, out, max_sequences=6)


def test_collect_command(llama_dir, tmp_path, capsys):
    from analyses.cli import main as cli_main

    out = tmp_path / "acts"
    argv = ["collect", "--model", str(llama_dir), "--hooks", "blocks.*.hook_resid_post", "--seq-len", "16",
            "--max-tokens", "80", "--positions", "-1", "--out", str(out)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    ds = ActivationDataset(out)
    assert ds.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"] and len(ds) == 5
    assert ds.manifest["corpus"]["name"].startswith("wiki-en") and ds.positions == [15]
    assert f"wrote {out}" in capsys.readouterr().out
    assert cli_main(["collect", "--model", str(llama_dir), "--hooks", "x", "--corpus", str(tmp_path / "no")]) == 1
    assert "does not exist" in capsys.readouterr().err
