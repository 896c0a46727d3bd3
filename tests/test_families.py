"""Every decoder family, faithful to its `transformers` checkpoint (issue 14).

Per family (tests/family_specs.py): a random checkpoint built from the config class,
every parameter randomised, saved and reloaded from its directory. Logits, every block's
output and every attention pattern equal `transformers` eager in float32 (atol 1e-4,
rtol 1e-5) through both attention paths on a left-padded batch; resid_pre and z patching
through the resumed engine equal a brute-force loop of plain torch hooks on the HF model;
greedy generation with the KV cache equals `transformers`' greedy `generate`; and each
switch the spec turns on changes the logits when turned off, so none can be ignored.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import models
from family_specs import SPECS, brute_force, build_hf, decoder_layers, hf_config, padded_batch
from interp.patching import activation_patch, logit_diff

TOL = dict(atol=1e-4, rtol=1e-5)
SWITCHES = [(name, switch) for name, spec in SPECS.items() for switch in spec.off]


def hf_reference(hf, tokens, mask, positions):
    """Logits, each layer's input and output, and every pattern, read with plain torch hooks."""
    inputs, outputs = {}, {}
    handles = []
    for i, layer in enumerate(decoder_layers(hf)):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: inputs.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            out = hf(tokens, attention_mask=mask, position_ids=positions, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return out.logits, inputs, outputs, out.attentions


@pytest.mark.parametrize("path", ["sdpa", "explicit"])
def test_matches_transformers_on_a_padded_batch(family, path):
    name, hf, model, _ = family
    tokens, mask, positions = padded_batch(name)
    logits, inputs, outputs, patterns = hf_reference(hf, tokens, mask, positions)
    real = mask.bool()
    model.set_attention_implementation("explicit" if path == "explicit" else "auto")
    try:
        names = lambda n: n.endswith(("hook_resid_pre", "hook_pattern", "hook_resid_post", "hook_normalized_resid_post"))  # noqa: E731
        ours, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
        plain = model(tokens, attention_mask=mask)  # no hooks: the fused path unless the family caps scores
    finally:
        model.set_attention_implementation("auto")
    assert_close(ours[real], logits[real], **TOL)
    assert_close(plain[real], logits[real], **TOL)
    for layer in range(model.cfg.n_layers):
        assert_close(cache["resid_pre", layer][real], inputs[layer][real], **TOL, msg=lambda m: f"resid_pre {layer}: {m}")
        out = cache[model.block_output_hook_name(layer)]
        assert_close(out[real], outputs[layer][real], **TOL, msg=lambda m: f"block {layer} output: {m}")
        assert_close(cache["pattern", layer].permute(0, 2, 1, 3)[real], patterns[layer].permute(0, 2, 1, 3)[real],
                     **TOL, msg=lambda m: f"pattern {layer}: {m}")


def test_padded_batch_equals_prompts_alone(family):
    name, _, model, _ = family
    tokens, mask, _ = padded_batch(name)
    batched = model(tokens, attention_mask=mask)
    for i in range(len(tokens)):
        alone = model(tokens[i][mask[i].bool()][None])[0]
        assert_close(batched[i][mask[i].bool()], alone, **TOL)


@pytest.mark.parametrize("name,switch", SWITCHES, ids=[f"{n}-{s}" for n, s in SWITCHES])
def test_each_switch_bites(name, switch):
    """The test configuration makes every switch matter: turning it off moves the logits."""
    on = build_hf(name)
    off = build_hf(name, **SPECS[name].off[switch])
    off.load_state_dict(on.state_dict(), strict=False)  # the same weights wherever both have them
    tokens, mask, positions = padded_batch(name)
    with torch.no_grad():
        a = on(tokens, attention_mask=mask, position_ids=positions).logits[mask.bool()]
        b = off(tokens, attention_mask=mask, position_ids=positions).logits[mask.bool()]
    assert (a - b).abs().max() > 1e-2, f"{switch} does not change {name}'s logits at test size"


def test_windows_are_shorter_than_the_prompt(family):
    name, _, model, _ = family
    cfg = model.cfg
    windows = {cfg.window(layer) for layer in range(cfg.n_layers)} - {None}
    assert all(w < SPECS[name].tokens for w in windows)
    if SPECS[name].partial:
        assert cfg.rotary_dim < cfg.d_head, "partial rotary where the family has it"
    if SPECS[name].kwargs.get("head_dim"):
        assert cfg.d_head != cfg.d_model // cfg.n_heads


# ---------------------------------------------------------------------- patching against plain torch hooks
def _pair(name, n_pos):
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(3, 1000, (2, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 4] = torch.randint(3, 1000, (2,), generator=gen)
    corrupted[:, n_pos - 3] = torch.randint(3, 1000, (2,), generator=gen)
    return clean, corrupted


@pytest.mark.parametrize("kind,by", [("resid_pre", "layer_pos"), ("z", "head_pos")])
def test_resumed_patching_equals_torch_hooks(family, kind, by):
    name, hf, model, _ = family
    clean, corrupted = _pair(name, SPECS[name].tokens)
    with torch.no_grad():
        gap = hf(clean).logits[:, -1] - hf(corrupted).logits[:, -1]
    a, b = gap.argmax(-1), gap.argmin(-1)

    def hand_metric(logits, prompt):  # logits [rows, vocab] at the last position
        rows = torch.arange(len(prompt))
        return logits[rows, a[prompt]] - logits[rows, b[prompt]]

    result = activation_patch(model, clean, corrupted, kind=kind, by=by, metric=logit_diff(a, b), progress=False)
    assert result.extra["resumed"], "the engine's fast path (resumed, packed rows)"
    expected = brute_force(hf, name, corrupted, clean, kind, model.cfg.n_heads, model.cfg.d_head, hand_metric)
    assert_close(result.per_prompt, expected, **TOL)


# ---------------------------------------------------------------------- generation
def test_greedy_generation_equals_transformers(family):
    name, hf, model, _ = family
    tokens, mask, _ = padded_batch(name)
    tokens, mask = tokens[:, :8], mask[:, :8].clone()
    mask[:, -1] = 1
    new = 10  # 8 + 10 positions: past every window of the specs
    with torch.no_grad():
        ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    ours = model.generate(tokens, attention_mask=mask, max_new_tokens=new, stop_at_eos=False)
    assert torch.equal(ours, ref)
    uncached = model.generate(tokens, attention_mask=mask, max_new_tokens=new, stop_at_eos=False, use_kv_cache=False)
    assert torch.equal(uncached, ref)


# ---------------------------------------------------------------------- conversion and refusals
def test_constructed_model_converts_like_its_directory(family):
    name, hf, model, _ = family
    direct = models.load(hf)
    tokens, mask, _ = padded_batch(name)
    assert_close(direct(tokens, attention_mask=mask), model(tokens, attention_mask=mask), atol=0, rtol=0)


def test_hub_name_loads_through_the_hub_cache(family, tmp_path, monkeypatch):
    from conftest import fake_hub_cache

    name, _, model, directory = family
    fake_hub_cache(tmp_path / "hub", f"test-org/{name}", directory, monkeypatch)
    from_hub = models.load(f"test-org/{name}", tokenizer=model.tokenizer)
    tokens, mask, _ = padded_batch(name)
    assert_close(from_hub(tokens, attention_mask=mask), model(tokens, attention_mask=mask), atol=0, rtol=0)


def test_training_checkpoints_load_by_revision(tmp_path, monkeypatch):
    """Pythia's training checkpoints are hub branches (step1000, ...): revision= picks one."""
    from conftest import fake_hub_cache

    for revision, seed in (("main", 0), ("step1000", 1)):
        directory = tmp_path / revision
        build_hf("gpt_neox", seed=seed).save_pretrained(directory)
        fake_hub_cache(tmp_path / "hub", "EleutherAI/pythia-test", directory, monkeypatch, revision=revision)
    tokens, mask, _ = padded_batch("gpt_neox")
    early = models.load("EleutherAI/pythia-test", revision="step1000")
    assert_close(early(tokens, attention_mask=mask), models.load(tmp_path / "step1000")(tokens, attention_mask=mask),
                 atol=0, rtol=0)
    final = models.load("EleutherAI/pythia-test")
    assert not torch.allclose(final(tokens, attention_mask=mask), early(tokens, attention_mask=mask))
    with pytest.raises(models.UnknownModelError, match="step2000"):
        models.load("EleutherAI/pythia-test", revision="step2000")


def test_saved_model_reloads_exactly(family, tmp_path):
    name, _, model, _ = family
    model.save(tmp_path)
    again = models.load(tmp_path)
    tokens, mask, _ = padded_batch(name)
    assert_close(again(tokens, attention_mask=mask), model(tokens, attention_mask=mask), atol=0, rtol=0)


@pytest.mark.parametrize("config,field,value", [
    ("LlamaConfig", "rope_type", "yarn"),
    ("Phi3Config", "rope_type", "dynamic"),
    ("Qwen3Config", "layer_types", "chunked_attention"),
    ("GPTNeoConfig", "attention_layers", "sparse"),
    ("Gemma2Config", "use_bidirectional_attention", True),
])
def test_unimplemented_switches_are_refused(config, field, value):
    import transformers

    from models.convert import UnsupportedArchitectureError, convert_hf

    base = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48, vocab_size=64,
                max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if config == "LlamaConfig":
        hf = transformers.LlamaConfig(**base, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                               "original_max_position_embeddings": 16})
    elif config == "Phi3Config":
        hf = transformers.Phi3Config(**base)
        hf.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    elif config == "Qwen3Config":
        hf = transformers.Qwen3Config(**base)
        hf.layer_types = ["full_attention", "chunked_attention"]
    elif config == "GPTNeoConfig":
        hf = transformers.GPTNeoConfig(hidden_size=32, num_heads=4, num_layers=2, vocab_size=64,
                                       attention_types=[[["global", "local"], 1]])
        hf.attention_layers = ["global", "sparse"]
    else:
        hf = transformers.Gemma2Config(**base)
        hf.use_bidirectional_attention = True
    model = transformers.AutoModelForCausalLM.from_config(hf) if config != "GPTNeoConfig" else None
    state = model.state_dict() if model is not None else {}
    with pytest.raises(UnsupportedArchitectureError, match=rf"{field}.*{value}"):
        convert_hf(hf, state, "bad-checkpoint")


def test_support_table_in_readme_is_the_registry():
    from pathlib import Path

    from models.convert import FAMILIES, support_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_table() in readme, "README's support table is stale: paste `interp models --families`"
    covered = {t for f in FAMILIES for t in f.model_types}
    for name in SPECS:
        assert hf_config(name).model_type in covered


# ---------------------------------------------------------------------- Gemma 3 multimodal, Gemma in bf16
def test_multimodal_gemma3_converts_its_language_model(tmp_path):
    """Gemma3ForConditionalGeneration (the 4B+ checkpoints): the files say `language_model.model.*`,
    the constructed object `model.language_model.*`; both convert, and text-only logits equal its own."""
    import transformers

    from family_specs import randomize_

    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=hf_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, image_token_index=999, boi_token_index=997,
                                       eoi_token_index=998)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize_(hf, seed=3)
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(3, 900, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
    for source in (tmp_path, hf):
        model = models.load(source)
        assert model.cfg.output_logits_soft_cap is None  # the multimodal head never caps
        assert_close(model(tokens), expected, **TOL)


@pytest.mark.parametrize("name", ["gemma", "gemma2", "olmo2"])
def test_embedding_scale_and_norms_round_as_transformers_in_bf16(name, tmp_path):
    """sqrt(d_model) is cast to bf16 before the multiply; Gemma's 1 + w and OLMo 2's weight apply in
    float32 before the cast: each equal to transformers' module bit for bit in bfloat16."""
    from transformers import AutoModelForCausalLM

    build_hf(name, hidden_size=72).save_pretrained(tmp_path)  # sqrt(72) = 8.485..., 8.5 in bf16
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    model = models.load(tmp_path, dtype=torch.bfloat16)
    tokens, _, _ = padded_batch(name)
    _, cache = model.run_with_cache(tokens, names_filter=["hook_embed", "blocks.1.hook_resid_pre"])
    layer = decoder_layers(hf)[1]
    with torch.no_grad():
        embed = hf.get_input_embeddings()(tokens)
        x = cache["blocks.1.hook_resid_pre"]
        if name == "olmo2":
            theirs, ours = layer.post_attention_layernorm(x), model.blocks[1].ln1_post(x)
        else:
            theirs, ours = layer.input_layernorm(x), model.blocks[1].ln1(x)
    assert torch.equal(cache["hook_embed"], embed)
    assert torch.equal(ours, theirs)
