"""Dictionary files (interp.sae.formats): SAELens folders written and read back, Gemma Scope params.npz and
sparsify folders written here by hand from those formats' definitions, the pre-6 SAELens config, bad input,
and check_fits. SAELens's own code reading our files (and we its) is tests/test_saelens_interop.py (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import models
from interp.sae import (
    DictionaryConfig,
    DictionaryWeightsError,
    DimensionMismatchError,
    HookNameError,
    HookNotInModelError,
    MissingConfigFieldsError,
    NormNotFoldedError,
    SparseDictionary,
    UnknownDictionaryFormatError,
    UnsupportedDictionaryError,
    check_fits,
    detect_format,
    load_dictionary,
    save_dictionary,
)
from interp.sae.formats import from_saelens_hook_name, hooks_for_module_path, to_saelens_hook_name

D_MODEL, D_MLP, D_SAE, K = 32, 64, 96, 6


def random_dictionary(seed=0, d_in=D_MODEL, **kwargs) -> SparseDictionary:
    kwargs.setdefault("hook_name", "blocks.1.hook_resid_post")
    kwargs.setdefault("architecture", "relu")
    sae = SparseDictionary(DictionaryConfig(d_in=d_in, d_sae=D_SAE, model_name="tiny", **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.startswith("W_") else 0.5))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=gen))
    return sae.eval()


def inputs(n=64, d=D_MODEL, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer LLaMA-shaped model with random norm weights (so folding them changes something)."""
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=4, d_head=8, d_vocab=50, n_ctx=16, d_mlp=D_MLP,
                                   normalization_type="RMS", positional_embedding_type="rotary", act_fn="silu",
                                   gated_mlp=True, model_name="tiny")
    model = models.HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.ln1.w.uniform_(0.5, 1.5)
            block.ln2.w.uniform_(0.5, 1.5)
    return model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- round trips
ROUND_TRIPS = {
    "relu": dict(architecture="relu", apply_b_dec_to_input=True),
    "topk": dict(architecture="topk", k=K, apply_b_dec_to_input=True),
    "topk-rescaled": dict(architecture="topk", k=K, rescale_acts_by_decoder_norm=True),
    "jumprelu": dict(architecture="jumprelu"),
    "batchtopk": dict(architecture="batchtopk", k=K, apply_b_dec_to_input=True),
    "batchtopk-rescaled": dict(architecture="batchtopk", k=K, rescale_acts_by_decoder_norm=True,
                               normalize_activations="expected_average_only_in", norm_scaling_factor=1.7),
    "constant-norm": dict(architecture="relu", normalize_activations="constant_norm_rescale"),
    "layer-norm": dict(architecture="jumprelu", normalize_activations="layer_norm", apply_b_dec_to_input=True),
    "transcoder": dict(architecture="relu", hook_name="blocks.1.ln2.hook_normalized",
                       out_hook_name="blocks.1.hook_mlp_out", d_out=D_MODEL - 8),
    "skip-transcoder": dict(architecture="jumprelu", hook_name="blocks.1.ln2.hook_normalized",
                            out_hook_name="blocks.1.hook_mlp_out", skip=True),
    "topk-transcoder": dict(architecture="topk", k=K, hook_name="blocks.0.hook_mlp_in",
                            out_hook_name="blocks.0.hook_mlp_out"),
    "hook-z": dict(architecture="relu", hook_name="blocks.0.attn.hook_z", reshape_activations="hook_z",
                   apply_b_dec_to_input=True),
}
SAELENS_NAMES = {"relu": "standard", "topk": "topk", "topk-rescaled": "topk", "jumprelu": "jumprelu",
                 "batchtopk": "jumprelu", "batchtopk-rescaled": "jumprelu", "constant-norm": "standard",
                 "layer-norm": "jumprelu", "transcoder": "transcoder", "skip-transcoder": "jumprelu_skip_transcoder",
                 "topk-transcoder": "topk_transcoder", "hook-z": "standard"}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip(name, tmp_path):
    sae = random_dictionary(**ROUND_TRIPS[name])
    folder = save_dictionary(sae, tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    written = json.loads((folder / "cfg.json").read_text())
    assert written["architecture"] == SAELENS_NAMES[name]
    assert written["metadata"]["hook_name"] == sae.cfg.hook_name  # TransformerLens's name is ours here
    assert written["metadata"]["sae_lens_version"].startswith("6.")
    assert detect_format(folder) == ("saelens", folder)

    back = load_dictionary(folder)
    assert (back.cfg.architecture, back.cfg.k, back.cfg.hook_name, back.cfg.out_hook_name, back.cfg.skip) == \
        (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name, sae.cfg.out_hook_name, sae.cfg.skip)
    x = inputs(d=sae.cfg.d_in)
    if name == "hook-z":
        x = x.unflatten(-1, (4, 8))
    with torch.no_grad():
        acts, back_acts = sae.encode(x), back.encode(x)
        assert (acts > 0).sum(-1).float().mean() > 1  # codes that are not trivially empty
        # folding a normalisation factor into the weights on save moves the last bits only
        tol = dict(atol=2e-5, rtol=1e-6) if sae.cfg.norm_scaling_factor else dict(atol=0, rtol=0)
        torch.testing.assert_close(back_acts, acts, **tol)
        torch.testing.assert_close(back(x), sae(x), **tol)
        if sae.cfg.is_transcoder or name == "hook-z":
            assert back(x).shape[:-1] == x.shape[:-1]


def test_saved_normalisation_is_folded(tmp_path):
    sae = random_dictionary(architecture="relu", apply_b_dec_to_input=True,
                            normalize_activations="expected_average_only_in", norm_scaling_factor=2.5)
    folder = save_dictionary(sae, tmp_path / "n")
    written = json.loads((folder / "cfg.json").read_text())
    assert written["normalize_activations"] == "none"  # SAELens applies no factor at inference
    assert written["metadata"]["interp"]["folded_norm_scaling_factor"] == 2.5
    back = load_dictionary(folder)
    assert back.cfg.normalize_activations == "none"
    torch.testing.assert_close(back.encode(inputs()), sae.encode(inputs()), atol=2e-5, rtol=1e-6)


def test_encoder_decoder_hook_names():
    assert to_saelens_hook_name("encoder.blocks.2.hook_resid_post") == "encoder.2.hook_resid_post"
    assert from_saelens_hook_name("decoder.1.hook_mlp_out") == "decoder.blocks.1.hook_mlp_out"
    for name in ("blocks.3.hook_resid_post", "hook_embed", "blocks.0.attn.hook_z", "blocks.5.ln2.hook_normalized"):
        assert to_saelens_hook_name(name) == from_saelens_hook_name(name) == name


# ---------------------------------------------------------------------------------------------- SAELens checkpoints
def write_saelens(folder, cfg: dict, tensors: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def random_tensors(seed, d_in=D_MODEL, d_sae=D_SAE, d_out=None):
    gen = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    return {"W_enc": torch.randn(d_in, d_sae, generator=gen) * 0.3, "b_enc": torch.randn(d_sae, generator=gen) * 0.5,
            "W_dec": torch.randn(d_sae, d_out, generator=gen) * 0.3, "b_dec": torch.randn(d_out, generator=gen) * 0.5}


def test_legacy_flat_config(tmp_path):
    """SAELens before 6.0: a flat config with hook_point, activation_fn_str, no apply_b_dec_to_input (default
    True), normalize_activations as a bool, and old files' per-latent scaling_factor."""
    t = random_tensors(2)
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) + 0.5
    folder = write_saelens(tmp_path / "old", {
        "d_in": D_MODEL, "d_sae": D_SAE, "hook_point": "blocks.1.hook_resid_pre", "hook_point_layer": 1,
        "activation_fn_str": "relu", "normalize_activations": False, "dtype": "torch.float32",
        "model_name": "tiny", "sae_lens_training_version": "3.13.0", "finetuning_scaling_factor": True,
        "context_size": 128}, {**t, "scaling_factor": scale})
    assert detect_format(folder)[0] == "saelens-legacy"
    sae = load_dictionary(folder)
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.apply_b_dec_to_input, sae.cfg.normalize_activations) == \
        ("relu", "blocks.1.hook_resid_pre", True, "none")
    assert sae.cfg.metadata["context_size"] == 128
    x = inputs()
    acts = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.decode(sae.encode(x)), (acts * scale) @ t["W_dec"] + t["b_dec"])


def test_legacy_topk_config(tmp_path):
    t = random_tensors(4)
    folder = write_saelens(tmp_path / "old-topk", {
        "d_in": D_MODEL, "d_sae": D_SAE, "hook_point": "blocks.0.hook_mlp_out", "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False}, t)
    sae = load_dictionary(folder)
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", K)
    pre = inputs() @ t["W_enc"] + t["b_enc"]
    top = pre.topk(K, dim=-1)
    torch.testing.assert_close(sae.encode(inputs()), torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()))


def test_saelens_training_checkpoints(tmp_path):
    """What SAELens's trainer writes mid-run: a TopK SAE choosing on pre * ||W_dec row|| with the activation
    scaler's factor beside it, and a BatchTopK SAE with its running topk_threshold."""
    t = random_tensors(5)
    folder = write_saelens(tmp_path / "ckpt", {
        "architecture": "topk", "d_in": D_MODEL, "d_sae": D_SAE, "k": K, "rescale_acts_by_decoder_norm": True,
        "apply_b_dec_to_input": True, "normalize_activations": "expected_average_only_in", "l1_coefficient": 1.0,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.1.hook_resid_post"}}, t)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.8}))
    sae = load_dictionary(folder)
    assert sae.cfg.norm_scaling_factor == 0.8 and sae.cfg.rescale_acts_by_decoder_norm
    x, norms = inputs(), t["W_dec"].norm(dim=-1)
    pre = ((x * 0.8 - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    top = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae.decode(acts), ((acts / norms) @ t["W_dec"] + t["b_dec"]) / 0.8)

    folder = write_saelens(tmp_path / "batchtopk", {
        "architecture": "batchtopk", "d_in": D_MODEL, "d_sae": D_SAE, "k": float(K), "apply_b_dec_to_input": False,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.1.hook_resid_post"}},
        {**t, "topk_threshold": torch.tensor(0.9, dtype=torch.float64)})
    sae = load_dictionary(folder)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.rescale_acts_by_decoder_norm) == ("batchtopk", K, True)
    pre = (x @ t["W_enc"] + t["b_enc"]) * norms
    torch.testing.assert_close(sae.encode(x), pre * (pre > 0.9))


# ---------------------------------------------------------------------------------------------- Gemma Scope
def gemma_scope_npz(folder, seed=6, d_in=D_MODEL, d_out=None):
    """A params.npz as Google publishes them: float32 W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec,
    threshold."""
    rng = np.random.default_rng(seed)
    d_out = d_out or d_in
    params = {"W_enc": rng.normal(0, 0.3, (d_in, D_SAE)), "W_dec": rng.normal(0, 0.3, (D_SAE, d_out)),
              "b_enc": rng.normal(0, 0.5, D_SAE), "b_dec": rng.normal(0, 0.5, d_out),
              "threshold": rng.uniform(0, 1, D_SAE)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    return folder / "params.npz", params


def test_gemma_scope(tmp_path):
    path, p = gemma_scope_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_12")
    sae = load_dictionary(path.parent)
    assert detect_format(path.parent) == ("gemma-scope", path)
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.apply_b_dec_to_input, sae.cfg.model_name) == \
        ("jumprelu", "blocks.1.hook_resid_post", False, "gemma-2-2b")
    x = inputs()
    # Gemma Scope's definition: pre = x W_enc + b_enc; f = pre * (pre > threshold) (a ReLU, since threshold > 0)
    pre = x.numpy() @ p["W_enc"] + p["b_enc"]
    acts = pre * (pre > p["threshold"]) * (pre > 0)
    torch.testing.assert_close(sae.encode(x), torch.from_numpy(acts.astype(np.float32)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)),
                               torch.from_numpy((acts @ p["W_dec"] + p["b_dec"]).astype(np.float32)),
                               atol=1e-5, rtol=1e-5)


def test_gemma_scope_hooks_from_the_path(tmp_path):
    att, _ = gemma_scope_npz(tmp_path / "models--google--gemma-scope-9b-it-att" / "snapshots" / "abc" / "layer_0"
                             / "width_16k" / "average_l0_40")
    sae = load_dictionary(att)
    assert (sae.cfg.hook_name, sae.cfg.reshape_activations, sae.cfg.model_name) == \
        ("blocks.0.attn.hook_z", "hook_z", "gemma-2-9b-it")
    tc, _ = gemma_scope_npz(tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_1" / "width_16k" / "average_l0_8")
    sae = load_dictionary(tc)
    assert (sae.cfg.hook_name, sae.cfg.out_hook_name, sae.cfg.is_transcoder) == \
        ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", True)
    anywhere, _ = gemma_scope_npz(tmp_path / "downloads" / "sae")
    with pytest.raises(HookNameError, match="hook_name="):
        load_dictionary(anywhere)
    assert load_dictionary(anywhere, hook_name="blocks.0.hook_mlp_out").cfg.hook_name == "blocks.0.hook_mlp_out"
    wide, _ = gemma_scope_npz(tmp_path / "other", d_out=D_MODEL + 4)
    with pytest.raises(HookNameError, match="out_hook_name="):
        load_dictionary(wide, hook_name="blocks.0.ln2.hook_normalized")


# ---------------------------------------------------------------------------------------------- sparsify
def sparsify_folder(folder, *, transcode=False, skip=False, seed=7, dtype=torch.float32, **cfg):
    """A folder as EleutherAI sparsify's SparseCoder.save_to_disk writes it: cfg.json (its SparseCoderConfig
    plus d_in) and sae.safetensors (encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"encoder.weight": torch.randn(D_SAE, D_MODEL, generator=gen) * 0.3,
               "encoder.bias": torch.randn(D_SAE, generator=gen) * 0.5,
               "W_dec": torch.randn(D_SAE, D_MODEL, generator=gen) * 0.3,
               "b_dec": torch.randn(D_MODEL, generator=gen) * 0.5}
    if skip:
        weights["W_skip"] = torch.randn(D_MODEL, D_MODEL, generator=gen) * 0.1
    weights = {k: v.to(dtype) for k, v in weights.items()}
    folder.mkdir(parents=True)
    config = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
              "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": D_MODEL, **cfg}
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "sae.safetensors"))
    return folder, weights


def sparsify_by_hand(weights, x, transcode):
    """SparseCoder.encode/decode: pre = relu(enc(x - b_dec?)); the k largest; acts @ W_dec + b_dec (+ x W_skip^T)."""
    w = {k: v.float() for k, v in weights.items()}
    pre = torch.relu((x if transcode else x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    out = acts @ w["W_dec"] + w["b_dec"]
    return acts, out + x @ w["W_skip"].T if "W_skip" in w else out


def test_sparsify_sae(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "tiny", "hookpoints": ["layers.1"]}))
    folder, weights = sparsify_folder(tmp_path / "run" / "layers.1")
    sae = load_dictionary(folder)
    assert detect_format(folder) == ("sparsify", folder)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.hook_name, sae.cfg.is_transcoder, sae.cfg.model_name) == \
        ("topk", K, "blocks.1.hook_resid_post", False, "tiny")
    x = inputs()
    acts, out = sparsify_by_hand(weights, x, transcode=False)
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), out)
    # an SAE on the MLP's output (not a transcoder) reads and writes hook_mlp_out
    mlp, _ = sparsify_folder(tmp_path / "run" / "layers.0.mlp", seed=8)
    assert load_dictionary(mlp).cfg.hook_name == "blocks.0.hook_mlp_out"


def test_sparsify_transcoder_is_not_a_residual_sae(tmp_path):
    folder, weights = sparsify_folder(tmp_path / "layers.1.mlp", transcode=True, skip=True, dtype=torch.bfloat16)
    sae = load_dictionary(folder)
    assert sae.cfg.is_transcoder and sae.cfg.skip and not sae.cfg.apply_b_dec_to_input
    assert (sae.cfg.hook_name, sae.cfg.out_hook_name, sae.cfg.dtype) == \
        ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "bfloat16")
    x = inputs().bfloat16().float()
    acts, out = sparsify_by_hand(weights, x, transcode=True)
    sae = sae.float()
    torch.testing.assert_close(sae.encode(x), acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x), x), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="target"):
        sae.use_error_term = True
        sae(x)  # a transcoder's error term needs the MLP's true output


def test_module_paths():
    assert hooks_for_module_path("layers.8") == ("blocks.8.hook_resid_pre", "blocks.8.hook_resid_post")
    assert hooks_for_module_path("model.layers.8.mlp") == ("blocks.8.ln2.hook_normalized", "blocks.8.hook_mlp_out")
    assert hooks_for_module_path("h.2.attn") == ("blocks.2.ln1.hook_normalized", "blocks.2.hook_attn_out")
    assert hooks_for_module_path("embed_tokens") == (None, "hook_embed")
    with pytest.raises(HookNameError, match="layers.N"):
        hooks_for_module_path("lm_head")


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_folder(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(UnknownDictionaryFormatError) as err:
        load_dictionary(tmp_path)
    message = str(err.value)
    for name in ("sae_weights.safetensors", "sae.safetensors", "params.npz", "weights.pt"):
        assert name in message
    assert isinstance(err.value, ValueError)


def test_folder_of_dictionaries_names_them(tmp_path):
    sparsify_folder(tmp_path / "layers.3")
    with pytest.raises(UnknownDictionaryFormatError, match="pick one of layers.3"):
        load_dictionary(tmp_path)


def test_missing_config_fields(tmp_path):
    t = random_tensors(9)
    meta = {"sae_lens_version": "6.1.0", "hook_name": "blocks.0.hook_resid_post"}
    folder = write_saelens(tmp_path / "a", {"architecture": "standard", "metadata": meta}, t)
    with pytest.raises(MissingConfigFieldsError, match="lacks d_in, d_sae"):
        load_dictionary(folder)
    folder = write_saelens(tmp_path / "b", {"architecture": "standard", "d_in": D_MODEL, "d_sae": D_SAE,
                                            "metadata": {"sae_lens_version": "6.1.0"}}, t)
    with pytest.raises(MissingConfigFieldsError, match="metadata.hook_name"):
        load_dictionary(folder)
    assert load_dictionary(folder, hook_name="blocks.0.hook_resid_post").cfg.hook_name == "blocks.0.hook_resid_post"
    folder = write_saelens(tmp_path / "c", {"architecture": "topk", "d_in": D_MODEL, "d_sae": D_SAE,
                                            "metadata": {"sae_lens_version": "6.1.0", "hook_name": "x"}}, t)
    with pytest.raises(MissingConfigFieldsError, match="lacks k"):
        load_dictionary(folder)
    folder, _ = sparsify_folder(tmp_path / "layers.0")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["k"], cfg["d_in"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MissingConfigFieldsError, match="lacks d_in, k"):
        load_dictionary(folder)


def test_bad_weights_and_unsupported(tmp_path):
    t = random_tensors(10)
    meta = {"sae_lens_version": "6.1.0", "hook_name": "blocks.0.hook_resid_post"}
    folder = write_saelens(tmp_path / "a", {"architecture": "jumprelu", "d_in": D_MODEL, "d_sae": D_SAE,
                                            "metadata": meta}, t)
    with pytest.raises(DictionaryWeightsError, match="lack threshold"):
        load_dictionary(folder)
    folder = write_saelens(tmp_path / "b", {"architecture": "standard", "d_in": D_MODEL + 1, "d_sae": D_SAE,
                                            "metadata": meta}, t)
    with pytest.raises(DictionaryWeightsError, match=r"W_enc \(32, 96\) \(expected \(33, 96\)\)"):
        load_dictionary(folder)
    folder = write_saelens(tmp_path / "c", {"architecture": "gated", "d_in": D_MODEL, "d_sae": D_SAE,
                                            "metadata": meta}, t)
    with pytest.raises(UnsupportedDictionaryError, match="'gated'"):
        load_dictionary(folder)
    folder, _ = sparsify_folder(tmp_path / "layers.0", activation="groupmax")
    with pytest.raises(UnsupportedDictionaryError, match="groupmax"):
        load_dictionary(folder)
    path, p = gemma_scope_npz(tmp_path / "g")
    np.savez(path, **{k: v for k, v in p.items() if k != "threshold"})
    with pytest.raises(DictionaryWeightsError, match="lacks threshold"):
        load_dictionary(path, hook_name="blocks.0.hook_resid_post")


# ---------------------------------------------------------------------------------------------- check_fits
def test_check_fits(tiny, tmp_path):
    check_fits(random_dictionary(), tiny)
    check_fits(random_dictionary(d_in=D_MLP, hook_name="blocks.0.mlp.hook_post", architecture="relu"), tiny)
    check_fits(random_dictionary(architecture="relu", hook_name="blocks.0.attn.hook_z",
                                 reshape_activations="hook_z"), tiny)
    check_fits(random_dictionary(d_in=8, hook_name="blocks.0.attn.hook_rot_q", architecture="relu"), tiny)  # probed
    with pytest.raises(HookNotInModelError, match="blocks.1.hook_resid_post"):
        check_fits(random_dictionary(hook_name="blocks.1.hook_resid_posst", architecture="relu"), tiny)
    with pytest.raises(HookNotInModelError, match="set_use_hook_mlp_in"):
        check_fits(random_dictionary(hook_name="blocks.0.hook_mlp_in", architecture="relu"), tiny)
    with pytest.raises(DimensionMismatchError, match="d_in is 48, but blocks.1.hook_resid_post in this model is 32"):
        check_fits(random_dictionary(d_in=48, architecture="relu"), tiny)
    with pytest.raises(DimensionMismatchError, match="d_out is 40"):
        check_fits(random_dictionary(architecture="relu", hook_name="blocks.0.ln2.hook_normalized",
                                     out_hook_name="blocks.0.hook_mlp_out", d_out=40), tiny)
    with pytest.raises(DimensionMismatchError, match="reshape_activations='hook_z'"):
        check_fits(random_dictionary(architecture="relu", hook_name="blocks.0.attn.hook_z"), tiny)
    # through load_dictionary(path, model)
    folder = save_dictionary(random_dictionary(d_in=48, architecture="relu"), tmp_path / "wide")
    with pytest.raises(DimensionMismatchError):
        load_dictionary(folder, tiny)


def test_sparsify_transcoder_needs_folded_norms(tiny, tmp_path):
    folder, _ = sparsify_folder(tmp_path / "layers.1.mlp", transcode=True)
    with pytest.raises(NormNotFoldedError, match="fold_ln=True"):
        load_dictionary(folder, tiny)
    folded = models.HookedTransformer(tiny.cfg)
    folded.load_state_dict(tiny.state_dict())
    folded.process_weights(fold_ln=True)
    sae = load_dictionary(folder, folded)
    assert sae.cfg.hook_name in folded.hook_dict and sae.cfg.out_hook_name in folded.hook_dict


def test_legacy_config_without_hook(tmp_path):
    folder = write_saelens(tmp_path / "old", {"d_in": D_MODEL, "d_sae": D_SAE}, random_tensors(11))
    with pytest.raises(MissingConfigFieldsError, match=r"lacks hook_point \(or hook_name\)"):
        load_dictionary(folder)
