"""Greedy and sampled generation for decoders, with whatever hooks are attached kept active.

With the KV cache (the default) each step runs only the new token, so a hook sees
`[batch, 1, ...]` activations after the first step; `use_kv_cache=False` reruns the
whole sequence each step (hooks then see every position every time).
"""

from __future__ import annotations

import contextlib

import torch

from models.frame import KVCache


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None, freq_penalty: float = 0.0,
            tokens: torch.Tensor | None = None) -> torch.Tensor:
    # logits: [batch, d_vocab] -> [batch]
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if freq_penalty:
        # TransformerLens' frequency penalty: each earlier occurrence of a token (prompt included) lowers its
        # logit by freq_penalty, after the temperature; greedy decoding ignores it, as there.
        counts = torch.zeros_like(logits).scatter_add_(-1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens before it already cover top_p.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(
    model,
    input,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    use_kv_cache: bool = True,
    prepend_bos: bool | None = None,
    fwd_hooks=(),
    return_type: str = "auto",
    attention_mask: torch.Tensor | None = None,
    verbose: bool = False,
    use_past_kv_cache: bool | None = None,
    freq_penalty: float = 0.0,
    padding_side: str | None = None,
):
    """Continue `input` (a string, list of strings, or token ids) by up to `max_new_tokens`.

    Returns strings for string input (`return_type="str"`), token ids `[batch, pos]`
    (prompt + continuation) for token input or `return_type="tokens"`; "input" (as
    TransformerLens) and "auto" both give the input's kind. Batches of strings are
    left-padded so every row continues from its own last token; token input may be
    left-padded too, with its `attention_mask` (1 = real token).

    TransformerLens' keywords: `verbose` (a progress bar), `use_past_kv_cache` (=
    `use_kv_cache`), `freq_penalty` (sampling only), `prepend_bos`, `padding_side`,
    `stop_at_eos`, `temperature`, `top_k`, `top_p`. Unlike TransformerLens, decoding is
    greedy unless `do_sample=True`, so the same call gives the same text.
    """
    from tqdm.auto import tqdm

    if freq_penalty < 0:
        raise ValueError(f"freq_penalty must be non-negative, got {freq_penalty}")
    if return_type not in ("auto", "input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    if use_past_kv_cache is not None:
        use_kv_cache = use_past_kv_cache
    cfg = model.cfg
    if not cfg.causal or model.unembed is None:
        raise ValueError(f"generate needs a causal language model with an unembedding; {cfg.model_name} is not one")
    as_text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    if as_text:
        if padding_side not in (None, "left"):
            raise ValueError("generation continues each row from its last token: batches are padded on the left")
        tok = model.tokenize(input, prepend_bos=prepend_bos, padding_side="left")
        tokens, mask = tok.tokens.to(model.device), tok.attention_mask.to(model.device)
    else:
        tokens = torch.as_tensor(input, device=model.device)
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        if attention_mask is None:
            mask = torch.ones_like(tokens)
        else:
            mask = torch.as_tensor(attention_mask, device=model.device).reshape(tokens.shape).to(tokens.dtype)
            if bool((mask[:, -1] == 0).any()):
                raise ValueError("generation continues each row from its last token: pad on the left "
                                 "(attention_mask[:, -1] must be 1)")
    if tokens.shape[1] + max_new_tokens > cfg.n_ctx:
        max_new_tokens = cfg.n_ctx - tokens.shape[1]
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
        if eos_token_id is None and model.tokenizer is not None:
            eos_token_id = model.tokenizer.eos_token_id
    pad = eos_token_id if eos_token_id is not None else 0
    generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    cache = KVCache(cfg.n_layers) if use_kv_cache else None
    hooks = model.hooks(fwd_hooks) if fwd_hooks else contextlib.nullcontext()
    with torch.no_grad(), hooks:
        step_input = tokens
        for _ in tqdm(range(max(max_new_tokens, 0)), disable=not verbose, desc="generating"):
            if cache is not None:
                logits = model(step_input, attention_mask=mask if cache.length == 0 else mask[:, -step_input.shape[1]:],
                               past_kv=cache, return_type="logits")
            else:
                logits = model(tokens, attention_mask=mask, return_type="logits")
            # A model over several devices predicts where its head lives; the tokens stay with the embedding.
            next_tok = _sample(logits[:, -1].to(tokens.device), do_sample, temperature, top_k, top_p, generator, freq_penalty,
                               tokens.masked_fill(mask == 0, pad) if freq_penalty else None)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad), next_tok)
            tokens = torch.cat([tokens, next_tok[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_tok[:, None])], dim=1)
            step_input = next_tok[:, None]
            if stop_at_eos and eos_token_id is not None:
                finished |= next_tok == eos_token_id
                if bool(finished.all()):
                    break
    if return_type == "tokens" or (return_type in ("auto", "input") and not as_text):
        return tokens
    if not as_text:
        return [model.to_string(row) for row in tokens]
    prompts = [input] if isinstance(input, str) else list(input)
    texts = []
    for i, prompt in enumerate(prompts):
        real = tokens[i][mask[i].bool()].tolist()
        n_prompt = int(tok.attention_mask[i].sum())
        cont = real[n_prompt:]
        if stop_at_eos and eos_token_id is not None and eos_token_id in cont:
            cont = cont[: cont.index(eos_token_id)]
        # Decode prompt and continuation together (SentencePiece drops a leading space
        # when a continuation is decoded alone), then keep what follows the prompt.
        full, head = model.to_string(real[:n_prompt] + cont), model.to_string(real[:n_prompt])
        texts.append(prompt + full[len(head):] if full.startswith(head) else prompt + model.to_string(cont))
    return texts[0] if isinstance(input, str) else texts


@torch.no_grad()
def generate_seq2seq(model, input, max_new_tokens: int = 20, *, attention_mask=None, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None, stop_at_eos: bool = True, eos_token_id: int | None = None,
                     use_kv_cache: bool = True, fwd_hooks=(), return_type: str = "auto"):
    """An encoder-decoder's generation: encode once, then decode from the decoder start token, the decoder's
    self-attention keys and values cached. Ids `[batch, 1 + new]` for token input, the decoded text (special
    tokens dropped) for text input or `return_type="str"`."""
    from models.encoder_decoder import _key_mask

    as_text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str))
    tokens, mask = model._as_tokens(input, attention_mask)
    eos = eos_token_id if eos_token_id is not None else model.cfg.eos_token_id
    generator = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
    with model.hooks(fwd_hooks) if fwd_hooks else contextlib.nullcontext():
        memory = model.encoder(tokens, model.embed, _key_mask(mask))
        out = torch.full((tokens.shape[0], 1), model.cfg.decoder_start_token_id, device=tokens.device)
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        cache = KVCache(len(model.decoder.blocks)) if use_kv_cache else None
        step = out
        for _ in range(max_new_tokens):
            logits = model(tokens, step, attention_mask=mask, encoder_output=memory, past_kv=cache)
            nxt = _sample(logits[:, -1].to(tokens.device), do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, model.cfg.pad_token_id or 0), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            step = nxt[:, None] if cache is not None else out
            if stop_at_eos and eos is not None:
                finished |= nxt == eos
                if bool(finished.all()):
                    break
    if return_type == "tokens" or (return_type in ("auto", "input") and not as_text):
        return out
    texts = model.to_string(out, skip_special_tokens=True)
    return texts[0] if isinstance(input, str) else texts
