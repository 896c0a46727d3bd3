"""HookedEncoderDecoder: T5, flan-T5, BART, Marian and the original transformer trained here.

One forward per stack, built from the same blocks as the decoders:

    encoder: tokens -> encoder.hook_embed (x scale) (+ encoder.hook_pos_embed) (-> encoder.ln_embed)
             -> encoder.blocks[l] (bidirectional self-attention, MLP) -> encoder.ln_final -> memory
    decoder: tokens -> decoder.hook_embed (+ decoder.hook_pos_embed) (-> decoder.ln_embed)
             -> decoder.blocks[l] (causal self-attention, cross-attention over memory, MLP)
             -> decoder.ln_final -> (x output_scale) -> unembed (+ final_logits_bias) -> logits

Positions are `arange` in both stacks (as `transformers` computes them for these families):
learned tables (BART, offset 2 dropped), Marian's sinusoidal [sin | cos] table, or T5's
relative buckets, computed once per stack and added to every self-attention's scores
(`encoder.hook_position_bias`, `decoder.hook_position_bias`, `[1, heads, query, key]`;
bidirectional buckets in the encoder, causal in the decoder). Block hooks are those of
every family (`hook_resid_pre`, `attn.hook_pattern`, ...), under `encoder.blocks.{l}.` and
`decoder.blocks.{l}.`; a decoder block adds `cross_attn.hook_q|k|v|attn_scores|pattern|z|result`,
`hook_cross_attn_out` and `hook_resid_mid_cross` (TransformerLens' T5 names).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from interp.factored_matrix import FactoredMatrix
from interp.hooks import HookedRootModule, HookPoint
from models.frame import AttentionFrame, CrossFrame, KVCache
from models.block import Block
from models.components import Embed, Norm, PosEmbed, Unembed, init_gpt2_style
from models.config import TransformerConfig
from models.placement import follow, refresh
from models.tokenizer import ContextLengthError, decode_each, require_tokenizer, tokenize


class DecoderInputError(ValueError):
    """An encoder-decoder model was run without the decoder's input."""


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """Marian's (and "Attention Is All You Need"'s) positions, `[n_pos, dim]`: the angle pos / 10000^(2 (j // 2) / dim)
    of every even column j as sin in the first half, of every odd column as cos in the second (not interleaved),
    computed in float64 and rounded once to float32, as `transformers` builds Marian's table."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    j = np.arange(dim)[None]
    angle = pos / np.power(10000, 2 * (j // 2) / dim)
    return torch.from_numpy(np.concatenate([np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])], axis=1)).float()


def relative_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact up to num_buckets/4 (or /2 when causal), then
    logarithmic up to max_distance; a causal model gives every later key bucket 0 (it is masked anyway)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.min(relative, torch.zeros_like(relative))
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned bias per (bucket, head): `W_rel [num_buckets, n_heads]`."""

    def __init__(self, cfg: TransformerConfig, bidirectional: bool) -> None:
        super().__init__()
        self.cfg, self.bidirectional = cfg, bidirectional
        self.W_rel = nn.Parameter(torch.empty(cfg.relative_attention_num_buckets, cfg.n_heads))

    def forward(self, n_query: int, n_key: int, offset: int = 0) -> torch.Tensor:
        """`[1, n_heads, n_query, n_key]` for queries at offset..offset+n_query-1 and keys at 0..n_key-1."""
        device = self.W_rel.device
        query = torch.arange(n_query, device=device)[:, None] + offset
        key = torch.arange(n_key, device=device)[None]
        buckets = relative_bucket(key - query, self.bidirectional, self.cfg.relative_attention_num_buckets,
                                  self.cfg.relative_attention_max_distance)
        return F.embedding(buckets, self.W_rel).permute(2, 0, 1)[None]


class Stack(nn.Module):
    """One stack of an encoder-decoder: its embedding steps, blocks and final norm (the token table is shared)."""

    def __init__(self, cfg: TransformerConfig, n_layers: int, decoder: bool) -> None:
        super().__init__()
        self.cfg, self.is_decoder = cfg, decoder
        self.hook_embed = HookPoint()
        kind = cfg.positional_embedding_type
        if kind in ("standard", "sinusoidal"):
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        if kind == "relative":
            self.relative = RelativePositionBias(cfg, bidirectional=not decoder)
            self.hook_position_bias = HookPoint()
        self.ln_embed = Norm(cfg) if cfg.embed_ln else None
        self.blocks = nn.ModuleList([Block(cfg, layer, cross=decoder) for layer in range(n_layers)])
        for block in self.blocks:
            block.attn.causal = decoder
        has_final = cfg.final_norm and not cfg.post_ln and cfg.normalization_type is not None
        self.ln_final = Norm(cfg) if has_final else None

    def forward(self, tokens: torch.Tensor, embed: Embed, key_mask: torch.Tensor | None,
                memory: CrossFrame | None = None, past_kv: KVCache | None = None,
                stop_at_layer: int | None = None) -> torch.Tensor:
        # tokens: [batch, pos] -> the stack's output [batch, pos, d_model]
        cfg = self.cfg
        batch, n = tokens.shape
        offset = past_kv.length if past_kv is not None else 0
        positions = torch.arange(offset, offset + n, device=tokens.device).expand(batch, n)
        if int(positions.max()) >= cfg.n_ctx and cfg.positional_embedding_type != "relative":
            raise ContextLengthError(f"position {int(positions.max())} is beyond the context of {cfg.model_name} "
                                     f"(n_ctx={cfg.n_ctx})")
        x = embed(tokens)
        if cfg.embed_scale is not None:
            scale = torch.tensor(cfg.embed_scale, dtype=torch.float32).to(x.dtype) if cfg.embed_scale_in_dtype \
                else cfg.embed_scale
            x = x * scale
        resid = self.hook_embed(x)
        if hasattr(self, "pos_embed"):
            resid = resid + self.hook_pos_embed(self.pos_embed(positions))
        if self.ln_embed is not None:
            resid = self.ln_embed(resid)
        frame = AttentionFrame(cfg, n, positions, key_mask, past_kv, None, causal=self.is_decoder)
        if hasattr(self, "relative"):
            frame.position_bias = self.hook_position_bias(self.relative(n, offset + n, offset))
        for block in self.blocks[:stop_at_layer]:
            resid = block(resid, frame, memory)
        if past_kv is not None:
            past_kv.commit(n, None)
        if stop_at_layer is not None:
            return resid
        return self.ln_final(follow(resid, self.ln_final)) if self.ln_final is not None else resid

    # Circuits of this stack's heads, [n_layers, n_heads, d_model, d_model] (rotary-free: exact bilinear forms).
    def _stack(self, owner: str, name: str) -> torch.Tensor:
        return torch.stack([getattr(getattr(block, owner), name) for block in self.blocks])

    @property
    def QK(self) -> FactoredMatrix:
        """Self-attention W_Q W_K^T (before T5's position bias, which is added to the scores)."""
        return FactoredMatrix(self._stack("attn", "W_Q"), self._stack("attn", "W_K").transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self._stack("attn", "W_V"), self._stack("attn", "W_O"))

    @property
    def cross_QK(self) -> FactoredMatrix:
        """Cross-attention W_Q W_K^T: rows read the decoder's stream (ln2's output), columns the encoder's output."""
        if not self.is_decoder:
            raise ValueError("the encoder has no cross-attention")
        return FactoredMatrix(self._stack("cross_attn", "W_Q"), self._stack("cross_attn", "W_K").transpose(-2, -1))

    @property
    def cross_OV(self) -> FactoredMatrix:
        """Cross-attention W_V W_O: what a head writes into the decoder per unit of attention to an encoder vector."""
        if not self.is_decoder:
            raise ValueError("the encoder has no cross-attention")
        return FactoredMatrix(self._stack("cross_attn", "W_V"), self._stack("cross_attn", "W_O"))


class HookedEncoderDecoder(HookedRootModule):
    """An encoder-decoder transformer whose every activation, in both stacks, is a hook point.

    Called as `transformers` is: `model(input_ids, decoder_input_ids=..., attention_mask=...,
    decoder_attention_mask=...)`; strings go through the tokenizer. `model.encoder.QK`,
    `model.decoder.cross_QK` (...) are the circuits; `model.generate` decodes greedily or by sampling.
    """

    opt_in_hooks = ("hook_result",)
    supports_resume = False  # the patching engine runs full forwards (an encoder patch reaches every decoder step)

    def __init__(self, cfg: TransformerConfig, tokenizer=None, init_weights: bool = True) -> None:
        super().__init__()
        if not cfg.encoder_decoder:
            raise ValueError("HookedEncoderDecoder needs cfg.encoder_decoder=True")
        self.cfg, self.tokenizer, self.source = cfg, tokenizer, "a config"
        self.embed = Embed(cfg)
        self.decoder_embed = Embed(cfg) if cfg.separate_decoder_embed else None
        self.encoder = Stack(cfg, cfg.n_layers, decoder=False)
        self.decoder = Stack(cfg, cfg.n_decoder_layers or cfg.n_layers, decoder=True)
        tied = self.decoder_embed if self.decoder_embed is not None else self.embed
        self.unembed = Unembed(cfg, tied_to=tied if cfg.tied_embeddings else None)
        self.setup_hooks()
        if init_weights:
            self.init_weights()

    def init_weights(self) -> None:
        """N(0, init_range) matrices, zero biases, unit norm weights; sinusoidal tables computed. Seed torch first."""
        init_gpt2_style(self, self.cfg)
        with torch.no_grad():
            if self.cfg.positional_embedding_type == "sinusoidal":
                for stack in (self.encoder, self.decoder):
                    stack.pos_embed.W_pos.copy_(sinusoidal_table(self.cfg.n_ctx, self.cfg.d_model))
                    stack.pos_embed.W_pos.requires_grad_(False)  # fixed, as in the paper

    def fixed_parameters(self) -> list[str]:
        """Parameters that are computed, not learned: the sinusoidal position tables (training leaves them)."""
        if self.cfg.positional_embedding_type != "sinusoidal":
            return []
        return ["encoder.pos_embed.W_pos", "decoder.pos_embed.W_pos"]

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed.W_E

    @property
    def W_U(self) -> torch.Tensor:
        return self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:
        return self.unembed.b_U

    # ------------------------------------------------------------------ forward
    def encode(self, input, attention_mask: torch.Tensor | None = None, stop_at_layer: int | None = None):
        """The encoder's output `[batch, pos, d_model]` (its final norm applied)."""
        tokens, mask = self._as_tokens(input, attention_mask)
        return self.encoder(tokens, self.embed, _key_mask(mask), stop_at_layer=stop_at_layer)

    def forward(self, input, decoder_input_ids=None, return_type: str | None = "logits", *,
                attention_mask=None, decoder_attention_mask=None, encoder_output: torch.Tensor | None = None,
                past_kv: KVCache | None = None, loss_per_token: bool = False):
        """Encoder input (ids `[batch, pos]` or text) and decoder input (ids, or text: the decoder start token
        is prepended) -> decoder logits `[batch, decoder_pos, d_vocab]`.

        return_type: "logits" (also "auto"), "hidden" (the decoder's output after its final norm), "loss"
        (next-token cross-entropy of the decoder input, as a model learns to translate), "both" or None.
        encoder_output: reuse an `encode(...)` result (generation encodes once); past_kv: the decoder's
        self-attention keys and values (generation).
        """
        if decoder_input_ids is None:
            raise DecoderInputError(
                f"{self.cfg.model_name} is an encoder-decoder model: pass decoder_input_ids (the target so far, "
                f"starting with the decoder start token {self.cfg.decoder_start_token_id}), or use "
                "model.generate(...) to produce them, or model.encode(...) for the encoder alone"
            )
        tokens, mask = self._as_tokens(input, attention_mask)
        memory = encoder_output if encoder_output is not None else \
            self.encoder(tokens, self.embed, _key_mask(mask))
        dec_tokens, dec_mask = self._decoder_tokens(decoder_input_ids, decoder_attention_mask)
        n_keys = dec_tokens.shape[1] + (past_kv.length if past_kv is not None else 0)
        if dec_mask is not None and dec_mask.shape[1] != n_keys:
            raise ValueError(f"decoder_attention_mask covers {dec_mask.shape[1]} positions; the decoder sees {n_keys} "
                             "(cached + new)")
        key_mask = _key_mask(dec_mask)
        embed = self.decoder_embed if self.decoder_embed is not None else self.embed
        resid = self.decoder(dec_tokens, embed, key_mask, CrossFrame(memory, _key_mask(mask)), past_kv)
        if return_type is None:
            return None
        if return_type == "hidden":
            return resid
        resid = follow(resid, self.unembed)  # the head's device, on a model over several devices
        if self.cfg.output_scale is not None:
            resid = resid * self.cfg.output_scale
        logits = self.unembed(resid)
        if return_type in ("logits", "auto"):
            return logits
        if return_type not in ("loss", "both"):
            raise ValueError(f"return_type must be logits, hidden, loss, both or None; got {return_type!r}")
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        dec_tokens = dec_tokens.to(logits.device)
        dec_mask = None if dec_mask is None else dec_mask.to(logits.device)
        loss = -logprobs.gather(-1, dec_tokens[:, 1:, None])[..., 0]  # [batch, decoder_pos - 1]
        if not loss_per_token:
            valid = torch.ones_like(loss) if dec_mask is None else (dec_mask[:, 1:] * dec_mask[:, :-1]).to(loss.dtype)
            loss = (loss * valid).sum() / valid.sum()
        return loss if return_type == "loss" else (logits, loss)

    def _as_tokens(self, input, attention_mask):
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            tok = self.tokenize(input)
            tokens, attention_mask = tok.tokens, tok.attention_mask if tok.is_padded else attention_mask
        else:
            tokens = torch.as_tensor(input)
            tokens = tokens[None] if tokens.dim() == 1 else tokens
        tokens = tokens.to(self.device)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
            attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        return tokens, attention_mask

    def _decoder_tokens(self, decoder_input_ids, decoder_attention_mask):
        if isinstance(decoder_input_ids, str) or (isinstance(decoder_input_ids, (list, tuple)) and decoder_input_ids
                                                  and isinstance(decoder_input_ids[0], str)):
            texts = [decoder_input_ids] if isinstance(decoder_input_ids, str) else list(decoder_input_ids)
            tok = tokenize(require_tokenizer(self.tokenizer, self.source), texts, n_ctx=self.cfg.n_ctx,
                           model_name=self.cfg.model_name, prepend_bos=False, padding_side="right")
            start = torch.full((len(texts), 1), self.cfg.decoder_start_token_id, dtype=tok.tokens.dtype)
            ids = torch.cat([start, tok.tokens], dim=1)
            mask = torch.cat([torch.ones_like(start), tok.attention_mask], dim=1) if tok.is_padded else None
            return ids.to(self.device), None if mask is None else mask.to(self.device)
        ids = torch.as_tensor(decoder_input_ids, device=self.device)
        ids = ids[None] if ids.dim() == 1 else ids
        if decoder_attention_mask is not None:
            decoder_attention_mask = torch.as_tensor(decoder_attention_mask, device=self.device)
            decoder_attention_mask = decoder_attention_mask[None] if decoder_attention_mask.dim() == 1 \
                else decoder_attention_mask
        return ids, decoder_attention_mask

    # ------------------------------------------------------------------ text
    def tokenize(self, text, prepend_bos: bool | None = None, padding_side: str | None = None, truncate: bool = False):
        tokenizer = require_tokenizer(self.tokenizer, self.source)
        return tokenize(tokenizer, text, n_ctx=self.cfg.n_ctx, model_name=self.cfg.model_name,
                        prepend_bos=prepend_bos, padding_side=padding_side, truncate=truncate)

    def to_tokens(self, text, prepend_bos: bool | None = None, padding_side: str | None = None) -> torch.Tensor:
        return self.tokenize(text, prepend_bos, padding_side).tokens.to(self.device)

    def to_str_tokens(self, input, prepend_bos: bool | None = None):
        tokenizer = require_tokenizer(self.tokenizer, self.source)
        if isinstance(input, str):
            return decode_each(tokenizer, self.tokenize(input, prepend_bos).tokens[0].tolist())
        ids = torch.as_tensor(input)
        if ids.dim() == 2:
            return [decode_each(tokenizer, row.tolist()) for row in ids]
        return decode_each(tokenizer, ids.reshape(-1).tolist())

    def to_string(self, tokens, skip_special_tokens: bool = False):
        tokenizer = require_tokenizer(self.tokenizer, self.source)
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [tokenizer.decode(row.tolist(), skip_special_tokens=skip_special_tokens) for row in tokens]
        return tokenizer.decode(tokens.reshape(-1).tolist(), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ generation
    def generate(self, input, max_new_tokens: int = 20, **kwargs):
        """Encode once, then decode from the decoder start token (models.generate.generate_seq2seq)."""
        from models.generate import generate_seq2seq

        return generate_seq2seq(self, input, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ conveniences
    def set_attention_implementation(self, implementation: str) -> None:
        if implementation not in ("auto", "explicit", "sdpa"):
            raise ValueError(f"implementation must be auto, explicit or sdpa, got {implementation!r}")
        for stack in (self.encoder, self.decoder):
            for block in stack.blocks:
                block.attn.implementation = implementation
                if block.cross:
                    block.cross_attn.implementation = implementation

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.cfg.device = str(self.embed.W_E.device)
        self.cfg.dtype = self.embed.W_E.dtype
        refresh(self)
        return out

    def save(self, directory) -> None:
        from models.loading import save_model

        save_model(self, directory)

    def process_weights(self, **kwargs):
        from models.weight_processing import WeightProcessingError

        raise WeightProcessingError("weight processing is not implemented for encoder-decoder models: the encoder's "
                                    "final norm feeds every decoder layer's cross-attention keys and values")

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{c.model_name}: encoder {c.n_layers} + decoder {c.n_decoder_layers or c.n_layers} layers, "
                f"d_model={c.d_model}, {c.n_heads} heads, d_head={c.d_head}, d_mlp={c.d_mlp}, vocab={c.d_vocab}")


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 0/1 attention mask -> bool key mask, or None when nothing is padded."""
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()
