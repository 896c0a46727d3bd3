"""The residual-stream decomposition (`interp.shift.decompose`) against independent numbers.

Every expected value comes from the `transformers` twin of the model (eager attention),
read with plain torch hooks: its hidden states, the input of each attention output
projection (sliced per head and multiplied by that head's slice of the weight by hand),
its MLP outputs, and for post-LN models the inputs of its LayerNorms (to hold each norm's
scale at the real forward's value). Our own model's cache is a second reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import PROMPTS, TOL
from interp.shift.decompose import Decomposition, decompose, head_attention_from


def hf_model(directory, kind):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = {"causal": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM}[kind]
    return cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def hf_layers(hf):
    """(family, the list of layers, the encoder/decoder root) of a transformers model."""
    if hasattr(hf, "transformer"):
        return "gpt2", hf.transformer.h, hf.transformer
    if hasattr(hf, "model") and hasattr(hf.model, "layers"):
        return "llama", hf.model.layers, hf.model
    root = hf.bert if hasattr(hf, "bert") else hf
    return "bert", root.encoder.layer, root


def hf_record(hf, tokens, mask, positions):
    """One forward of the transformers model, recording with plain torch hooks each layer's
    input to the attention output projection, its MLP output, the inputs of its norms and
    (pre-LN) the input of the final norm."""
    family, layers, root = hf_layers(hf)
    rec = {"o_in": {}, "mlp": {}, "ln1_in": {}, "ln2_in": {}}
    handles = []

    def pre(store, key):
        return lambda module, args: store.__setitem__(key, args[0].detach())

    def post(store, key):
        return lambda module, args, out: store.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())

    for l, layer in enumerate(layers):
        if family == "llama":
            o_proj, mlp = layer.self_attn.o_proj, layer.mlp
        elif family == "gpt2":
            o_proj, mlp = layer.attn.c_proj, layer.mlp
        else:
            o_proj, mlp = layer.attention.output.dense, layer.output.dense
            handles.append(layer.attention.output.LayerNorm.register_forward_pre_hook(pre(rec["ln1_in"], l)))
            handles.append(layer.output.LayerNorm.register_forward_pre_hook(pre(rec["ln2_in"], l)))
        handles.append(o_proj.register_forward_pre_hook(pre(rec["o_in"], l)))
        handles.append(mlp.register_forward_hook(post(rec["mlp"], l)))
    if family == "bert":
        handles.append(root.embeddings.LayerNorm.register_forward_pre_hook(pre(rec, "emb_ln_in")))
    else:
        final = root.norm if family == "llama" else root.ln_f
        handles.append(final.register_forward_pre_hook(pre(rec, "final_in")))
    try:
        with torch.no_grad():
            out = hf(tokens, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                     output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    rec["hidden"] = list(out.hidden_states)
    if family != "bert":  # transformers' last hidden state is after the final norm; ours is before
        rec["hidden"][-1] = rec["final_in"]
    rec["attentions"] = out.attentions
    return rec


def batch_and_targets(model, prompts, side, which):
    tok = model.tokenize(prompts, padding_side=side)
    mask = tok.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = [torch.nonzero(row).flatten().tolist() for row in mask]
    targets = [r[-1] if which == "last" else r[1] for r in real]
    return tok.tokens, mask, positions, targets


@torch.no_grad()
def hand_components(hf, rec, tokens, positions, targets, L):
    """Every component at layer L, computed from the transformers model's weights and activations."""
    family, layers, root = hf_layers(hf)
    rows, cols = torch.arange(len(targets)), torch.tensor(targets)
    at = lambda t: t[rows, cols]  # noqa: E731  [batch, pos, ...] -> [n, ...]
    exp: dict[str, torch.Tensor] = {}

    def through_norm(ln, norm_input):
        # The norm with its scale held at the real forward's: centre, divide, times the weight.
        scale = (at(norm_input).var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        for k, v in exp.items():
            exp[k] = (v - v.mean(-1, keepdim=True)) / scale * ln.weight

    if family == "bert":
        emb = root.embeddings
        exp["embed"] = emb.word_embeddings.weight[at(tokens)]
        exp["token_type_embed"] = emb.token_type_embeddings.weight[0].expand(len(targets), -1)
        exp["pos_embed"] = emb.position_embeddings.weight[at(positions)]
        through_norm(emb.LayerNorm, rec["emb_ln_in"])
        exp["embed ln bias"] = emb.LayerNorm.bias.expand(len(targets), -1)
    else:
        wte = root.embed_tokens if family == "llama" else root.wte
        exp["embed"] = wte.weight[at(tokens)]
        if family == "gpt2":
            exp["pos_embed"] = root.wpe.weight[at(positions)]
    for l in range(L):
        layer = layers[l]
        o_proj = {"llama": lambda: layer.self_attn.o_proj, "gpt2": lambda: layer.attn.c_proj,
                  "bert": lambda: layer.attention.output.dense}[family]()
        z = at(rec["o_in"][l])  # [n, n_heads * d_head], heads concatenated
        n_heads = hf.config.num_attention_heads if family != "gpt2" else hf.config.n_head
        d_head = z.shape[-1] // n_heads
        for h in range(n_heads):
            cols_h = slice(h * d_head, (h + 1) * d_head)
            if family == "gpt2":  # Conv1D: weight [in, out]
                exp[f"L{l}H{h}"] = z[:, cols_h] @ o_proj.weight[cols_h, :]
            else:  # nn.Linear: weight [out, in]
                exp[f"L{l}H{h}"] = z[:, cols_h] @ o_proj.weight[:, cols_h].T
        bias = o_proj.bias if o_proj.bias is not None else torch.zeros(z.shape[0], exp["embed"].shape[-1])
        exp[f"L{l} attn bias"] = bias.expand(len(targets), -1)
        if family == "bert":
            through_norm(layer.attention.output.LayerNorm, rec["ln1_in"][l])
            exp[f"L{l} ln1 bias"] = layer.attention.output.LayerNorm.bias.expand(len(targets), -1)
        exp[f"L{l} MLP"] = at(rec["mlp"][l])
        if family == "bert":
            through_norm(layer.output.LayerNorm, rec["ln2_in"][l])
            exp[f"L{l} ln2 bias"] = layer.output.LayerNorm.bias.expand(len(targets), -1)
    return {k: v.detach() for k, v in exp.items()}  # views of parameters keep requires_grad under no_grad


def check_against_transformers(model, hf, prompts, side, which, layers=None):
    tokens, mask, positions, targets = batch_and_targets(model, prompts, side, which)
    rec = hf_record(hf, tokens, mask, positions)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith(
        ("hook_resid_pre", "hook_resid_post", "hook_normalized_resid_post")))
    ours = cache.residual_stream()  # [n_layers + 1, batch, pos, d_model]
    rows, cols = torch.arange(len(targets)), torch.tensor(targets)
    post_ln = model.cfg.post_ln
    n = model.cfg.n_layers
    for L in range(n + 1) if layers is None else layers:
        dec = decompose(model, tokens, targets, layer=L, attention_mask=mask)
        msg = lambda m: f"layer {L}: {m}"  # noqa: E731
        assert dec.components.shape == (len(targets), len(dec.labels), model.cfg.d_model)
        assert_close(dec.total(), dec.resid, **TOL, msg=msg)
        # As for the components below: rounding scales with the stream's largest entries (SmolLM2's
        # ~24,000), so an entry of ~4 beside them may differ from transformers' by 1.4e-4 on some CPUs.
        reference = rec["hidden"][L][rows, cols]
        atol = TOL["atol"] + TOL["rtol"] * float(reference.abs().max())
        assert_close(dec.resid, reference, atol=atol, rtol=TOL["rtol"], msg=msg)
        assert_close(dec.resid, ours[L][rows, cols], **TOL, msg=msg)
        if post_ln or L == n:  # pre-LN components do not change with L, so checking the last suffices
            expected = hand_components(hf, rec, tokens, positions, targets, L)
            assert sorted(expected) == sorted(dec.labels)
            for label, value in expected.items():
                # Float32 rounding in a matmul scales with the vector's largest entries, not
                # each entry's own size: SmolLM2's last MLP writes entries of ~270, and an entry
                # of ~11 beside them differs from transformers' by 2.9e-4 (a parity matter).
                atol = TOL["atol"] + TOL["rtol"] * float(value.abs().max())
                assert_close(dec[label], value, atol=atol, rtol=TOL["rtol"], msg=lambda m: f"layer {L}, {label}: {m}")
    return dec


# ---------------------------------------------------------------------- small random checkpoints
SMALL = [("gpt2", "gpt2_dir", "causal"), ("llama", "llama_dir", "causal"), ("bert", "bert_dir", "mlm")]


@pytest.fixture(scope="module", params=SMALL, ids=[s[0] for s in SMALL])
def pair(request):
    name, dir_fixture, kind = request.param
    model = request.getfixturevalue(name)
    return model, hf_model(request.getfixturevalue(dir_fixture), kind)


@pytest.mark.parametrize("side,which", [("right", "last"), ("left", "second")])
def test_small_models_sum_and_match_transformers(pair, side, which):
    """gpt2 (learned positions), llama (GQA: 4 query heads on 2 KV heads), bert (post-LN)."""
    model, hf = pair
    if model.cfg.post_ln and side == "left":
        side = "right"  # encoders pad on the right
    dec = check_against_transformers(model, hf, PROMPTS, side, which)
    assert dec.kinds.count("head") == model.cfg.n_layers * model.cfg.n_heads
    assert ("pos_embed" in dec.labels) == (model.cfg.positional_embedding_type == "standard")
    assert any(k == "norm_bias" for k in dec.kinds) == model.cfg.post_ln


def test_small_models_head_attention_from(pair):
    model, hf = pair
    tokens, mask, positions, targets = batch_and_targets(model, PROMPTS, "right", "last")
    rec = hf_record(hf, tokens, mask, positions)
    heads = [(1, 2), (0, 0), (1, 0), (0, 3)]
    got = head_attention_from(model, tokens, targets, heads, attention_mask=mask)
    assert got.shape == (len(targets), len(heads), tokens.shape[1])
    for i, t in enumerate(targets):
        for j, (l, h) in enumerate(heads):
            assert_close(got[i, j], rec["attentions"][l][i, h, t], **TOL)
    assert all(not hp.active for hp in model.hook_points()), "hooks left behind"


@pytest.mark.parametrize("name", ["attn_only", "attn_only_ln"])
def test_attention_only_models(request, name):
    """No MLPs (and, for attn_only, no norms): heads, biases and embeddings still sum to the stream."""
    model = request.getfixturevalue(name)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    stream = cache.residual_stream()
    for L in range(model.cfg.n_layers + 1):
        dec = decompose(model, tokens, [11, 4], layer=L)
        assert "mlp" not in dec.kinds and dec.kinds.count("head") == L * model.cfg.n_heads
        assert_close(dec.total(), dec.resid, **TOL)
        assert_close(dec.resid, stream[L][[0, 1], [11, 4]], **TOL)


def test_token_types_are_a_component(bert):
    tokens = bert.to_tokens("a first sentence and a second")
    types = torch.zeros_like(tokens)
    types[:, 4:] = 1
    dec = decompose(bert, tokens, 5, layer=0, token_type_ids=types)
    plain = decompose(bert, tokens, 5, layer=0)
    assert_close(dec.total(), dec.resid, **TOL)
    expected = bert(tokens, token_type_ids=types, stop_at_layer=0)[:, 5]
    assert_close(dec.resid, expected, **TOL)
    assert not torch.allclose(dec["token_type_embed"], plain["token_type_embed"])


def test_errors(llama):
    tokens = llama.to_tokens(PROMPTS[:2], padding_side="right")
    n_pos = tokens.shape[1]
    with pytest.raises(ValueError, match="one position per prompt"):
        decompose(llama, tokens, [1])
    with pytest.raises(IndexError, match="outside"):
        decompose(llama, tokens, [1, n_pos])
    with pytest.raises(ValueError, match="layer must be in 0..2"):
        decompose(llama, tokens, [1, 1], layer=3)
    with pytest.raises(ValueError, match="layer must be in"):
        decompose(llama, tokens, [1, 1], layer=-1)
    mask = llama.tokenize(PROMPTS[:2], padding_side="right").attention_mask
    with pytest.raises(ValueError, match="padding"):
        decompose(llama, tokens, [1, n_pos - 1], attention_mask=mask)
    with pytest.raises(ValueError, match="outside"):
        head_attention_from(llama, tokens, [1, 1], [(2, 0)])
    with pytest.raises(ValueError, match="outside"):
        head_attention_from(llama, tokens, [1, 1], [(0, 4)])


def test_negative_and_shared_positions(gpt2):
    tokens = gpt2.to_tokens(PROMPTS[:2], padding_side="left")
    a = decompose(gpt2, tokens, -1, layer=1)
    b = decompose(gpt2, tokens, [tokens.shape[1] - 1] * 2, layer=1)
    assert a.positions == b.positions == [tokens.shape[1] - 1] * 2
    assert_close(a.components, b.components, atol=0, rtol=0)


# ---------------------------------------------------------------------- project, top, frame
def toy_decomposition(seed=0):
    gen = torch.Generator().manual_seed(seed)
    components = torch.randn(3, 5, 8, generator=gen)
    labels = ["embed", "L0H0", "L0H1", "L0 attn bias", "L0 MLP"]
    return Decomposition(labels, ["embed", "head", "head", "attn_bias", "mlp"], [-1, 0, 0, 0, 0],
                         [None, 0, 1, None, None], components, components.sum(1), 1, [4, 2, 7])


def test_project_is_a_dot_product_with_the_unit_direction():
    dec = toy_decomposition()
    direction = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 5
    proj = dec.project(direction)
    for t in range(3):
        for c in range(5):
            hand = sum(float(dec.components[t, c, i]) * float(direction[i]) for i in range(8))
            assert abs(float(proj[t, c]) - hand / float(direction.norm())) < 1e-5
    per_target = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    proj = dec.project(per_target)
    for t in range(3):
        assert_close(proj[t], dec.components[t] @ (per_target[t] / per_target[t].norm()))
    with pytest.raises(ValueError, match="direction"):
        dec.project(torch.ones(7))
    with pytest.raises(ValueError, match="2 directions for 3 targets"):
        dec.project(torch.ones(2, 8))


def test_top_ranks_by_absolute_projection():
    dec = toy_decomposition()
    direction = torch.randn(8, generator=torch.Generator().manual_seed(3))
    unit = direction / direction.norm()
    for target in (None, 0, 2):
        values = {label: float((dec.components[:, c] @ unit).mean() if target is None
                               else dec.components[target, c] @ unit)
                  for c, label in enumerate(dec.labels)}
        ranked = sorted(values.items(), key=lambda kv: -abs(kv[1]))
        got = dec.top(direction, k=3, target=target)
        assert [label for label, _ in got] == [label for label, _ in ranked[:3]]
        for (_, v), (_, w) in zip(got, ranked):
            assert abs(v - w) < 1e-5
    assert any(v < 0 for _, v in dec.top(direction, k=5)), "values keep their sign"


def test_to_frame():
    dec = toy_decomposition()
    frame = dec.to_frame(direction=torch.ones(8))
    assert len(frame) == 3 * 5
    assert {"target", "position", "label", "kind", "layer", "head", "norm", "projection"} <= set(frame.columns)
    row = frame[(frame.target == 1) & (frame.label == "L0H1")].iloc[0]
    assert row["head"] == 1 and row["layer"] == 0 and row["position"] == 2
    assert abs(row["norm"] - float(dec.components[1, 2].norm())) < 1e-5
    assert frame[frame.label == "embed"]["head"].isna().all()


# ---------------------------------------------------------------------- the bundled real models
@pytest.mark.slow
def test_smollm2_sums_and_matches_transformers(smollm2, smollm2_hf):
    """Real SmolLM2 (GQA, RMSNorm, massive activations), every layer 0..30."""
    check_against_transformers(smollm2, smollm2_hf, PROMPTS, "left", "last")


@pytest.mark.slow
def test_smollm2_head_attention_from(smollm2, smollm2_hf):
    tokens, mask, positions, targets = batch_and_targets(smollm2, PROMPTS[:2], "left", "last")
    with torch.no_grad():
        ref = smollm2_hf(tokens, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    heads = [(5, 3), (0, 1), (20, 8), (29, 0)]
    got = head_attention_from(smollm2, tokens, targets, heads, attention_mask=mask)
    for i, t in enumerate(targets):
        for j, (l, h) in enumerate(heads):
            assert_close(got[i, j], ref[l][i, h, t], **TOL)


@pytest.mark.slow
def test_minilm_sums_and_matches_transformers(minilm, minilm_hf):
    """Real all-MiniLM-L6 (post-LN): the linearised norms keep the sum exact at every layer."""
    dec = check_against_transformers(minilm, minilm_hf, PROMPTS, "right", "second")
    biases = dec.components[:, [k == "norm_bias" for k in dec.kinds]]
    assert biases.norm(dim=-1).max() > 0.1, "MiniLM's norm biases are real terms, not rounding"
