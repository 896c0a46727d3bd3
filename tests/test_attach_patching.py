"""Attribution, path patching and noise corruption on attached models, against hand-written
torch hooks on the `transformers` model and against the converted HookedTransformer."""

from __future__ import annotations

import pytest
import torch

from interp.attach import attach
from interp.patching import GaussianNoise, activation_patch, attribution_patch, logit_diff, path_patch


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (2, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 1000, (2,), generator=g)
    return clean, corrupted, logit_diff(torch.tensor([5, 7]), torch.tensor([9, 11]))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _grads_untouched(model):
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_through_attach_equals_the_converted_model_and_a_hand_gradient(hf_llama, llama, pair, direction):
    clean, corrupted, metric = pair
    hooked = attach(hf_llama)
    assert any(p.requires_grad for p in hf_llama.parameters())  # transformers leaves weights trainable
    ours = attribution_patch(hooked, clean, corrupted, kind="model.layers.{layer}", metric=metric,
                             direction=direction)
    converted = attribution_patch(llama, clean, corrupted, kind="resid_post", metric=metric, direction=direction)
    torch.testing.assert_close(ours.per_prompt, converted.per_prompt, atol=1e-4, rtol=1e-4)
    assert _grads_untouched(hf_llama)  # no weight gradient, no .grad written into the user's model

    # By hand: (source - base) . d metric / d block output, with plain torch hooks on the HF model.
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    with torch.no_grad():
        src_out = hf_llama(source, output_hidden_states=True).hidden_states
    outs = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i, layer in enumerate(hf_llama.model.layers)]
    try:
        logits = hf_llama(base).logits
    finally:
        for h in handles:
            h.remove()
    m = (logits[:, -1].gather(1, torch.tensor([[5], [7]])) - logits[:, -1].gather(1, torch.tensor([[9], [11]]))).sum()
    n_layers = len(hf_llama.model.layers)
    grads = torch.autograd.grad(m, [outs[i] for i in range(n_layers)])
    base_m = (logits[:, -1].gather(1, torch.tensor([[5], [7]])) - logits[:, -1].gather(1, torch.tensor([[9], [11]])))
    for i in range(n_layers):
        src_i = src_out[i + 1] if i + 1 < n_layers else None
        if src_i is None:  # the last hidden state is after the final norm; take the raw block output
            with torch.no_grad():
                raw = {}
                h = hf_llama.model.layers[i].register_forward_hook(
                    lambda m_, a, o: raw.__setitem__(0, o[0] if isinstance(o, tuple) else o))
                hf_llama(source)
                h.remove()
            src_i = raw[0]
        want = base_m.detach() + ((src_i - outs[i].detach()) * grads[i]).sum(-1)
        torch.testing.assert_close(ours.per_prompt[:, i], want, atol=1e-4, rtol=1e-4)


def test_attribution_needs_an_embedding_to_start_from():
    class NoEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    hooked = attach(NoEmbed())
    assert "hook_embed" not in hooked.hook_dict
    with pytest.raises(ValueError, match="token embedding"):
        attribution_patch(hooked, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                          kind="blocks.{layer}", metric=logit_diff(0, 1))


def test_noise_corruption_through_attach_equals_the_converted_model(hf_llama, llama, llama_dir):
    from transformers import AutoTokenizer

    hooked = attach(hf_llama, tokenizer=AutoTokenizer.from_pretrained(llama_dir))
    assert hooked.embed_path == "model.embed_tokens"
    assert torch.equal(hooked.W_E, hf_llama.model.embed_tokens.weight)
    prompts = ["When Mary and John went to the store, John gave a drink to"]
    noise = GaussianNoise(positions="Mary", seed=1)
    metric = logit_diff(5, 9)
    ours = activation_patch(hooked, prompts, noise=noise, kind="model.layers.{layer}", by="layer", metric=metric,
                            progress=False)
    converted = activation_patch(llama, prompts, noise=noise, kind="resid_post", by="layer", metric=metric,
                                 progress=False)
    torch.testing.assert_close(ours.per_prompt, converted.per_prompt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.corrupted_metric, converted.corrupted_metric, atol=1e-4, rtol=1e-4)
    assert float((ours.clean_metric - ours.corrupted_metric).abs().max()) > 1e-3  # the noise does something


MODULE_NAMES = {  # the same sites on the attached HF model and on the converted model
    "senders": ("model.layers.{layer}.mlp", "blocks.{layer}.hook_mlp_out"),
    "receivers": ("model.layers.1.self_attn.q_proj", "blocks.1.attn.hook_q"),
    "freeze": ("model.layers.{layer}.self_attn[0]", "blocks.{layer}.hook_attn_out"),
}


def test_module_path_patching_through_attach_equals_the_converted_model_and_a_hand_loop(hf_llama, llama, pair):
    clean, corrupted, metric = pair
    theirs = _hooks(hf_llama)  # transformers may have added output-capturing hooks of its own
    hooked = attach(hf_llama)
    ours = path_patch(hooked, clean, corrupted, metric=metric, progress=False,
                      **{k: v[0] for k, v in MODULE_NAMES.items()})
    converted = path_patch(llama, clean, corrupted, metric=metric, progress=False,
                           **{k: v[1] for k, v in MODULE_NAMES.items()})
    assert ours.axes == ("layer",) and ours.shape == (2,)
    torch.testing.assert_close(ours.per_prompt, converted.per_prompt, atol=1e-4, rtol=1e-4)
    # The layer-1 MLP runs after layer 1's queries: no path, so exactly the base (clean) metric.
    torch.testing.assert_close(ours.per_prompt[:, 1], ours.clean_metric, atol=1e-5, rtol=0)
    assert float((ours.per_prompt[:, 0] - ours.clean_metric).abs().max()) > 1e-3

    # By hand, sender = layer 0's MLP (direction "noise": corrupted values into the clean run).
    layers = hf_llama.model.layers

    def capture(run):
        got, hs = {}, []
        for i, layer in enumerate(layers):
            hs.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("attn", i), o[0])))
            hs.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(("mlp", i), o)))
        with torch.no_grad():
            hf_llama(run)
        for h in hs:
            h.remove()
        return got

    base, source = capture(clean), capture(corrupted)
    recorded = {}
    hs = [layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: (base[("attn", i)],) + tuple(o[1:]))
          for i in range(2)]
    hs.append(layers[0].mlp.register_forward_hook(lambda m, a, o: source[("mlp", 0)]))
    hs.append(layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: recorded.__setitem__(0, o.clone())))
    with torch.no_grad():
        hf_llama(clean)
    for h in hs:
        h.remove()
    h = layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: recorded[0])
    with torch.no_grad():
        logits = hf_llama(clean).logits
    h.remove()
    want = logits[:, -1].gather(1, torch.tensor([[5], [7]])) - logits[:, -1].gather(1, torch.tensor([[9], [11]]))
    torch.testing.assert_close(ours.per_prompt[:, 0], want[:, 0], atol=1e-4, rtol=1e-4)
    assert _hooks(hf_llama) == theirs


def test_module_path_patching_equals_head_level_path_patching(llama, pair):
    # Every head of layer 0 as senders, every head's query at layer 1 as receivers, the other heads frozen:
    # the head-level implementation (z recomputed per receiver) and the module-level one must agree.
    clean, corrupted, metric = pair
    heads = path_patch(llama, clean, corrupted, metric=metric, senders=[(0, h) for h in range(llama.cfg.n_heads)],
                       receivers=[(1, h) for h in range(llama.cfg.n_heads)], receiver_inputs="q", progress=False)
    modules = path_patch(llama, clean, corrupted, metric=metric, senders=["blocks.0.hook_attn_out"],
                         receivers=["blocks.1.attn.hook_q"], freeze="blocks.{layer}.hook_attn_out", progress=False)
    torch.testing.assert_close(modules.per_prompt, heads.per_prompt, atol=1e-4, rtol=1e-4)
    assert float((heads.per_prompt - heads.clean_metric).abs().max()) > 1e-3


def test_path_patching_on_attached_models_explains_bad_requests(hf_llama, pair):
    clean, corrupted, metric = pair
    theirs = _hooks(hf_llama)
    hooked = attach(hf_llama)
    with pytest.raises(ValueError, match="hook names"):
        path_patch(hooked, clean, corrupted, metric=metric, senders="each")
    with pytest.raises(ValueError, match="also a freeze point"):
        path_patch(hooked, clean, corrupted, metric=metric, senders="model.layers.{layer}.mlp",
                   receivers=["model.layers.1.self_attn[0]"], freeze="model.layers.{layer}.self_attn[0]")
    from interp.hooks import HookNameError

    with pytest.raises(HookNameError, match="model.layers.1.mlp"):
        path_patch(hooked, clean, corrupted, metric=metric, senders="model.layers.{layer}.mlpp")
    assert _hooks(hf_llama) == theirs


def test_a_module_named_embed_is_its_own_hook_point():
    # `embed` is also a short key for `hook_embed`; on an attached model the real module path wins.
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.blocks[0](self.embed(x) * 2)

    model = Tiny()
    ids = torch.tensor([[1, 2, 3]])
    _, cache = attach(model).run_with_cache(ids)
    assert {"embed", "hook_embed", "blocks.0"} <= set(cache.keys())
    torch.testing.assert_close(cache["embed"], model.embed.weight[ids[0]][None])
    out = attach(model).run_with_hooks(ids, fwd_hooks=[("embed", lambda t, hook: t * 0)])
    torch.testing.assert_close(out, model.blocks[0].bias.expand(1, 3, 4))
