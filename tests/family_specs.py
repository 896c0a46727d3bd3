"""Small random `transformers` checkpoints of every decoder family, built from their config classes.

Each spec makes its family's switches bite at test size: head_dim != d_model / n_heads and
partial rotary < 1 where the family allows them, windows (5) shorter than the test
prompts (12-16 tokens), soft-caps small enough to change the result, clip_qkv that clips.
`OFF` lists, per family, config changes that turn a switch off; the suite checks that
each one changes the logits, so a converter that ignored the switch could not pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VOCAB = 1000
ROUTER_STD = 2.0
D, H, KV, DH, LAYERS, CTX, WINDOW = 64, 4, 2, 24, 3, 64, 5


@dataclass
class Spec:
    config: str  # transformers config class
    kwargs: dict
    o_proj: str  # the attention output projection, relative to a decoder layer
    off: dict = field(default_factory=dict)  # {switch: config overrides that turn it off}
    tokens: int = 14  # prompt length of the test batch
    partial: bool = False  # the spec rotates only part of each head (partial rotary < 1)


def _llama_like(**extra):
    out = {**dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, head_dim=DH, intermediate_size=96,
                  num_hidden_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=CTX, tie_word_embeddings=False),
            **extra}
    return {k: v for k, v in out.items() if v is not None}


SPECS: dict[str, Spec] = {
    "gpt_neox": Spec("GPTNeoXConfig", dict(
        hidden_size=D, num_attention_heads=H, num_hidden_layers=LAYERS, intermediate_size=96, vocab_size=VOCAB,
        max_position_embeddings=CTX, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        "attention.dense", off={"parallel": dict(use_parallel_residual=False),
                                "partial rotary": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                        "partial_rotary_factor": 1.0})}, partial=True),
    "gpt_neox_sequential": Spec("GPTNeoXConfig", dict(
        hidden_size=D, num_attention_heads=H, num_hidden_layers=LAYERS, intermediate_size=96, vocab_size=VOCAB,
        max_position_embeddings=CTX, use_parallel_residual=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        "attention.dense", partial=True),
    "gptj": Spec("GPTJConfig", dict(n_embd=D, n_head=H, n_layer=LAYERS, rotary_dim=8, n_positions=CTX,
                                    vocab_size=VOCAB, n_inner=96), "attn.out_proj",
                 off={"partial rotary": dict(rotary_dim=16)}, partial=True),
    "gpt_neo": Spec("GPTNeoConfig", dict(
        hidden_size=D, num_heads=H, num_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=CTX,
        intermediate_size=96, window_size=WINDOW, attention_types=[[["global", "local"], 1], [["local"], 1]]),
        "attn.attention.out_proj", off={"local attention": dict(attention_types=[[["global"], LAYERS]])}),
    "opt": Spec("OPTConfig", dict(hidden_size=D, num_attention_heads=H, num_hidden_layers=LAYERS, ffn_dim=96,
                                  vocab_size=VOCAB, max_position_embeddings=CTX, word_embed_proj_dim=D),
                "self_attn.out_proj"),
    "opt_350m_style": Spec("OPTConfig", dict(
        hidden_size=D, num_attention_heads=H, num_hidden_layers=LAYERS, ffn_dim=96, vocab_size=VOCAB,
        max_position_embeddings=CTX, word_embed_proj_dim=32, do_layer_norm_before=False), "self_attn.out_proj",
        off={"post-LN": dict(do_layer_norm_before=True)}),
    "gemma": Spec("GemmaConfig", _llama_like(num_key_value_heads=1, tie_word_embeddings=True), "self_attn.o_proj"),
    "gemma2": Spec("Gemma2Config", _llama_like(
        query_pre_attn_scalar=20, attn_logit_softcapping=0.5, final_logit_softcapping=1.0, sliding_window=WINDOW),
        "self_attn.o_proj", off={"attention soft-cap": dict(attn_logit_softcapping=None),
                                 "final soft-cap": dict(final_logit_softcapping=None),
                                 "sliding window": dict(sliding_window=CTX)}),
    "gemma3": Spec("Gemma3TextConfig", _llama_like(
        # attn_logit_softcapping is set but transformers' Gemma 3 attention ignores it: so must we.
        query_pre_attn_scalar=20, sliding_window=WINDOW, attn_logit_softcapping=0.8, final_logit_softcapping=2.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}),
        "self_attn.o_proj", off={"sliding window": dict(sliding_window=CTX),
                                 "final soft-cap": dict(final_logit_softcapping=None),
                                 "local rope base": dict(rope_parameters={
                                     "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}})}),
    "qwen3": Spec("Qwen3Config", _llama_like(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                  "self_attn.o_proj", off={"sliding window": dict(use_sliding_window=False)}),
    "qwen2_sliding": Spec("Qwen2Config", _llama_like(use_sliding_window=True, sliding_window=WINDOW,
                                                     max_window_layers=1), "self_attn.o_proj",
                          off={"sliding window": dict(use_sliding_window=False)}),
    "mistral": Spec("MistralConfig", _llama_like(sliding_window=WINDOW), "self_attn.o_proj",
                    off={"sliding window": dict(sliding_window=None)}),
    "olmo": Spec("OlmoConfig", _llama_like(clip_qkv=0.6), "self_attn.o_proj", off={"clip_qkv": dict(clip_qkv=None)}),
    "olmo2": Spec("Olmo2Config", _llama_like(), "self_attn.o_proj"),
    "phi": Spec("PhiConfig", dict(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=LAYERS, intermediate_size=96,
        vocab_size=VOCAB, max_position_embeddings=CTX, qk_layernorm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        "self_attn.dense", off={"q/k LayerNorm": dict(qk_layernorm=False)}, partial=True),
    # transformers validates LongRoPE's factors against hidden_size / n_heads, not head_dim: keep them equal.
    "phi3": Spec("Phi3Config", _llama_like(
        head_dim=None, sliding_window=WINDOW,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "original_max_position_embeddings": 8,
                         "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 5.0]}),
        "self_attn.o_proj", off={"sliding window": dict(sliding_window=None)}, partial=True),
    "stablelm": Spec("StableLmConfig", dict(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=LAYERS, intermediate_size=96,
        vocab_size=VOCAB, max_position_embeddings=CTX, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        "self_attn.o_proj", off={"q/k LayerNorm": dict(qk_layernorm=False)}, partial=True),
    "stablelm_sequential": Spec("StableLmConfig", dict(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=H, num_hidden_layers=LAYERS, intermediate_size=96,
        vocab_size=VOCAB, max_position_embeddings=CTX, use_qkv_bias=False, use_parallel_residual=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        "self_attn.o_proj", partial=True),
    # Mixtures of experts: 4 experts, 2 per token; router weights scaled up (ROUTER_STD) so the top-k choice
    # has margins no float noise can flip.
    "mixtral": Spec("MixtralConfig", _llama_like(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
                    "self_attn.o_proj"),
    "qwen2_moe": Spec("Qwen2MoeConfig", _llama_like(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=56,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]), "self_attn.o_proj",
        off={"norm_topk_prob": dict(norm_topk_prob=True)}),
    "qwen3_moe": Spec("Qwen3MoeConfig", _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
                                                    norm_topk_prob=True), "self_attn.o_proj",
                      off={"norm_topk_prob": dict(norm_topk_prob=False)}),
    "olmoe": Spec("OlmoeConfig", _llama_like(head_dim=None, num_experts=4, num_experts_per_tok=2, clip_qkv=0.6),
                  "self_attn.o_proj", off={"clip_qkv": dict(clip_qkv=None)}),
    "gpt_bigcode": Spec("GPTBigCodeConfig", dict(n_embd=D, n_head=H, n_layer=LAYERS, n_positions=CTX, vocab_size=VOCAB,
                                                 n_inner=96, multi_query=True), "attn.c_proj"),
    "gpt_bigcode_mha": Spec("GPTBigCodeConfig", dict(n_embd=D, n_head=H, n_layer=LAYERS, n_positions=CTX,
                                                     vocab_size=VOCAB, n_inner=96, multi_query=False), "attn.c_proj"),
}


def hf_config(name: str, **overrides):
    import transformers

    spec = SPECS[name]
    kwargs = {**spec.kwargs, **overrides, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return getattr(transformers, spec.config)(**kwargs)


def randomize_(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Every parameter random (norm weights around 1, biases too), so no term can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_weight = ("norm" in name.lower() or "ln" in name.lower()) and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_weight else noise)


def build_hf(name: str, seed: int = 0, attn: str = "eager", **overrides):
    """A randomly initialised `transformers` causal LM of the family (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides), attn_implementation=attn,
                                             dtype=torch.float32).eval()
    randomize_(model, seed=seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # an MoE router: well-separated logits
                p.mul_(ROUTER_STD / 0.1)
    return model


def decoder_layers(hf) -> torch.nn.ModuleList:
    """The list of decoder layers, found without knowing the family's attribute names."""
    n = hf.config.num_hidden_layers
    for module in hf.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise AssertionError("no decoder layer list")


def o_proj(hf, name: str, layer: int) -> torch.nn.Module:
    module = decoder_layers(hf)[layer]
    for part in SPECS[name].o_proj.split("."):
        module = getattr(module, part)
    return module


def padded_batch(name: str, seed: int = 0):
    """(tokens [3, n], attention mask, positions): a left-padded batch of random prompts."""
    n = SPECS[name].tokens
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (3, n), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    tokens = tokens.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return tokens, mask, positions


def word_tokenizer():
    """A word-level tokenizer over the words of the built-in studies' texts (under VOCAB entries), so the
    small random checkpoints take text: the shift study, the head census and word selectors run on them."""
    import re

    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    from analyses.heads import PROMPTS
    from analyses.shift_data import STUDIES, flatten

    texts = list(PROMPTS)
    for study in STUDIES.values():
        texts += flatten(study["senses"])[0] + [t.strip() for t in study["track"]]
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text)})
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    assert len(vocab) <= VOCAB, len(vocab)
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


# ---------------------------------------------------------------------- plain torch hooks on the HF model
def _layer_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _record(hf, tokens, modules, read) -> dict[int, torch.Tensor]:
    """{i: read(args, kwargs)} of each module's input in one unpadded run, by plain forward pre-hooks."""
    store = {}
    handles = [module.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: store.__setitem__(i, read(args, kwargs).detach().clone()), with_kwargs=True)
        for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in handles:
            h.remove()
    return store


def record_layer_inputs(hf, tokens) -> dict[int, torch.Tensor]:
    """Every decoder layer's input hidden states (resid_pre)."""
    return _record(hf, tokens, decoder_layers(hf), _layer_input)


def record_z(hf, name, tokens) -> dict[int, torch.Tensor]:
    """Every layer's input to the attention output projection (the heads' z, concatenated) [b, pos, h * dh]."""
    projections = [o_proj(hf, name, l) for l in range(hf.config.num_hidden_layers)]
    return _record(hf, tokens, projections, lambda args, kwargs: args[0])


def brute_force(hf, name, base, source, kind, n_heads, d_head, metric):
    """[n_prompts, layers, (heads,) pos]: the metric with one site of `base` overwritten by `source`'s,
    one batch row per (site, prompt), every patch made by a plain torch hook on the HF model."""
    n, n_pos = base.shape
    layers = hf.config.num_hidden_layers
    acts = record_layer_inputs(hf, source) if kind == "resid_pre" else record_z(hf, name, source)
    heads = [None] if kind == "resid_pre" else list(range(n_heads))
    sites = [(l, h, p) for l in range(layers) for h in heads for p in range(n_pos)]
    rows = [(s, b) for s in range(len(sites)) for b in range(n)]
    tokens = base[torch.tensor([b for _, b in rows])]

    def editor(layer):
        def edit(x):
            x = x.clone()
            for r, (s, b) in enumerate(rows):
                l, h, p = sites[s]
                if l != layer:
                    continue
                if h is None:
                    x[r, p] = acts[l][b, p]
                else:
                    x[r, p, h * d_head:(h + 1) * d_head] = acts[l][b, p, h * d_head:(h + 1) * d_head]
            return x
        return edit

    handles = []
    for l in range(layers):
        fn = editor(l)
        if kind == "resid_pre":
            def pre(m, args, kwargs, fn=fn):
                if args:
                    return (fn(args[0]),) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
            handles.append(decoder_layers(hf)[l].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(o_proj(hf, name, l).register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]),)))
    try:
        with torch.no_grad():
            logits = hf(tokens).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    values = metric(logits, torch.tensor([b for _, b in rows]))
    out = torch.zeros(n, len(sites))
    for (s, b), v in zip(rows, values):
        out[b, s] = v
    return out.view(n, layers, *([n_heads] if kind != "resid_pre" else []), n_pos)


# ---------------------------------------------------------------------- encoder-decoder families
def _t5(**extra):
    # Default buckets (32, max distance 128): beyond 8 positions bidirectional and causal buckets differ, and the
    # test's decoder inputs are 18 tokens.
    return {**dict(d_model=D, d_kv=DH, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=H, vocab_size=VOCAB,
                   feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=2), **extra}


def _bart_like(**extra):
    return {**dict(d_model=D, encoder_layers=2, decoder_layers=3, encoder_attention_heads=H, decoder_attention_heads=H,
                   encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=VOCAB, max_position_embeddings=CTX,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                   forced_bos_token_id=None, forced_eos_token_id=None), **extra}


ENCDEC_SPECS: dict[str, tuple[str, dict]] = {
    "t5": ("T5Config", _t5()),
    "flan_t5": ("T5Config", _t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "bart": ("BartConfig", _bart_like(scale_embedding=True, activation_function="gelu")),
    "marian": ("MarianConfig", _bart_like(decoder_vocab_size=VOCAB, scale_embedding=True, activation_function="swish",
                                          decoder_start_token_id=0)),
    "marian_unshared": ("MarianConfig", _bart_like(decoder_vocab_size=VOCAB, scale_embedding=True,
                                                   share_encoder_decoder_embeddings=False, decoder_start_token_id=0)),
}


def build_seq2seq(name: str, seed: int = 0):
    """A randomly initialised `transformers` encoder-decoder (eager attention, float32, eval mode)."""
    import transformers

    cls, kwargs = ENCDEC_SPECS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForSeq2SeqLM.from_config(getattr(transformers, cls)(**kwargs),
                                                           attn_implementation="eager", dtype=torch.float32).eval()
    randomize_(model, seed=seed + 1)
    return model


def saved_seq2seq(name: str, directory, tokenizer):
    """Save a random `name` checkpoint (and `tokenizer`) to `directory`; return (transformers' eager reload, ours)."""
    import transformers

    import models

    build_seq2seq(name).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    return hf, models.load(directory, tokenizer=tokenizer)


def seq2seq_batch(seed: int = 0):
    """(source [3, 20], its mask with left padding in two rows, decoder input [3, 18] from the start token)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (3, 20), generator=gen)
    mask = torch.ones_like(src)
    mask[1, :4] = 0
    mask[2, :9] = 0
    src = src.masked_fill(mask == 0, 0)
    tgt = torch.randint(3, VOCAB, (3, 18), generator=gen)
    return src, mask, tgt
