"""HookedTransformer: one forward for every family (models.convert.FAMILIES), BERT and attention-only models.

The forward, readable in one sitting:

    tokens -> hook_embed (x embed_scale) (+ hook_pos_embed) (+ token types) (-> ln_embed)
           -> blocks[start:stop]   (models/block.py: sequential, parallel or post-LN; norms before
                                    and/or after each sublayer)
           -> ln_final -> (mlm_head) -> unembed (-> soft-cap) -> logits
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from interp.hooks import HookedRootModule, HookPoint
from models.frame import AttentionFrame, KVCache
from models.block import Block
from models.components import Embed, MLMHead, Norm, PosEmbed, TokenTypeEmbed, Unembed, init_gpt2_style
from models.config import TransformerConfig
from models.placement import follow, refresh
from models.rotary import Rotary
from models.tl_compat import TransformerLensModelMethods
from models.weight_views import NoUnembedError, WeightViews
from models.tokenizer import (
    ContextLengthError,
    Tokenized,
    decode_each,
    require_tokenizer,
    tokenize,
)


class HookedTransformer(WeightViews, TransformerLensModelMethods, HookedRootModule):
    """A transformer whose every activation is a named hook point (see DESIGN.md for the names).

    Build one from a config (random weights, e.g. to train) or load a checkpoint with
    `models.load(...)`, which also freezes the weights so that no autograd graph is
    built unless you ask for gradients (`model.requires_grad_(True)` to fine-tune).
    """

    opt_in_hooks = ("hook_result", "hook_experts")
    # forward() can resume at a layer from a residual stream with a frozen key/value prefix
    # (start_at_layer + past_kv + logit_positions): the patching engine's fast path.
    supports_resume = True

    def __init__(self, cfg: TransformerConfig, tokenizer=None, init_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.source = "a config"
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.positional_embedding_type == "standard":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        if cfg.n_token_types:
            self.token_type_embed = TokenTypeEmbed(cfg)
            self.hook_token_type_embed = HookPoint()
        self.ln_embed = Norm(cfg) if cfg.embed_ln else None
        self.rotary = Rotary(cfg, cfg.rotary_base, cfg.rotary_scaling) if cfg.positional_embedding_type == "rotary" else None
        # Local (sliding-window) layers with their own rope base (Gemma 3).
        self.rotary_local = None
        if self.rotary is not None and cfg.rotary_base_local is not None:
            self.rotary_local = Rotary(cfg, cfg.rotary_base_local, cfg.rotary_scaling_local)
        self.blocks = nn.ModuleList([Block(cfg, layer) for layer in range(cfg.n_layers)])
        has_final = cfg.final_norm and not cfg.post_ln and cfg.normalization_type is not None
        self.ln_final = Norm(cfg) if has_final else None
        self.mlm_head = MLMHead(cfg) if cfg.mlm_head else None
        if cfg.has_unembed:
            self.unembed = Unembed(cfg, tied_to=self.embed if cfg.tied_embeddings else None)
        else:
            self.unembed = None
        if cfg.use_attn_result:
            self.set_use_attn_result(True)
        self.setup_hooks()
        if init_weights:
            self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 style: N(0, init_range) matrices, zero biases, unit norm weights. Seed torch first."""
        init_gpt2_style(self, self.cfg)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input,
        return_type: str | None = "auto",
        *,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        past_kv: KVCache | None = None,
        tokens: torch.Tensor | None = None,
        loss_per_token: bool = False,
        logit_positions: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_allowed: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
    ):
        """Run the model.

        input: a string, a list of strings (padded, with the mask built for you), token
        ids `[batch, pos]`, or, with `start_at_layer=l`, the residual stream
        `[batch, pos, d_model]` that block l reads. `stop_at_layer=l` returns the stream
        block l would read, without running it or anything after it.
        return_type: "auto" (logits, or the final hidden state for a headless encoder),
        "logits", "hidden", "loss" (next-token), "both" (logits, loss) or None.
        logit_positions `[batch, k]`: compute the final norm and unembedding only at these
        positions (the others are never needed by, e.g., a metric on the last token);
        the output is then `[batch, k, d_vocab]`.
        positions `[batch, pos]` with attention_allowed `[batch or 1, 1, pos, cached + pos]`
        (bool): explicit positions and an explicit attention mask, for inputs that are not
        one sequence per row (the patching engine packs many short rows into one);
        key_positions `[batch or 1, cached + pos]`, each key's position, lets sliding windows
        apply to such a mask.
        """
        if start_at_layer is None:
            tokens, attention_mask, token_type_ids = self._as_tokens(
                input, attention_mask, token_type_ids, prepend_bos, padding_side
            )
            batch, n_query = tokens.shape
            device = tokens.device
        else:
            if not torch.is_tensor(input) or input.dim() != 3:
                raise TypeError(
                    f"with start_at_layer={start_at_layer} the input is the residual stream [batch, pos, d_model], "
                    f"got {type(input).__name__}"
                )
            batch, n_query = input.shape[:2]
            device = input.device
        n_layers = self.cfg.n_layers
        start = self._layer_index(start_at_layer, 0, "start_at_layer")
        stop = self._layer_index(stop_at_layer, n_layers, "stop_at_layer")
        if past_kv is not None and not past_kv.frozen and (start, stop) != (0, n_layers):
            raise ValueError("a growing KV cache needs every layer to run; use past_kv.frozen_copy() with start/stop")
        if attention_allowed is not None:
            if positions is None:
                raise ValueError("attention_allowed needs explicit positions")
            key_mask, full_mask, positions = None, None, torch.as_tensor(positions, device=device)
            # A resumed forward on a split model starts where its first block lives, not at the embedding.
            attention_allowed = torch.as_tensor(attention_allowed, device=device)
            key_positions = None if key_positions is None else torch.as_tensor(key_positions, device=device)
        else:
            key_mask, full_mask, positions = self._mask_and_positions(batch, n_query, attention_mask, past_kv, device)
        if positions.numel() and int(positions.max()) >= self.cfg.n_ctx:
            raise ContextLengthError(
                f"position {int(positions.max())} is beyond the context of {self.cfg.model_name} (n_ctx={self.cfg.n_ctx})"
            )
        rotary = {"global": self.rotary, "local": self.rotary_local} if self.rotary_local is not None else self.rotary
        frame = AttentionFrame(self.cfg, n_query, positions, key_mask, past_kv, rotary, attention_allowed,
                               key_positions)

        resid = self._embed(tokens, positions, token_type_ids) if start_at_layer is None else input
        for block in self.blocks[start:stop]:
            resid = block(resid, frame)
        if past_kv is not None:
            past_kv.commit(n_query, full_mask)
        if stop_at_layer is not None:
            return resid
        if logit_positions is not None:
            if return_type in ("loss", "both"):
                raise ValueError("logit_positions computes logits at a few positions; the loss needs all of them")
            index = torch.as_tensor(logit_positions, device=resid.device).long()
            index = index[None].expand(resid.shape[0], -1) if index.dim() == 1 else index
            resid = resid.gather(1, index[..., None].expand(-1, -1, resid.shape[-1]))  # [batch, k, d_model]
        return self._head(resid, return_type, tokens, attention_mask, loss_per_token)

    def _layer_index(self, index: int | None, default: int, what: str) -> int:
        if index is None:
            return default
        n = self.cfg.n_layers
        if not -n <= index <= n:
            raise ValueError(f"{what}={index} is outside the model's {n} layers")
        return index % n if index < 0 else index

    def _as_tokens(self, input, attention_mask, token_type_ids, prepend_bos, padding_side):
        device = self.embed.W_E.device
        if isinstance(input, (str, list, tuple)) and (isinstance(input, str) or all(isinstance(t, str) for t in input)):
            tok = self.tokenize(input, prepend_bos=prepend_bos, padding_side=padding_side)
            tokens = tok.tokens
            if attention_mask is None and tok.is_padded:
                attention_mask = tok.attention_mask
        else:
            tokens = torch.as_tensor(input)
            if tokens.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
                raise TypeError(f"token ids must be integers, got {tokens.dtype}; strings also work")
            if tokens.dim() == 1:
                tokens = tokens[None]
        tokens = tokens.to(device)
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ContextLengthError(
                f"input has {tokens.shape[-1]} tokens but {self.cfg.model_name} has n_ctx={self.cfg.n_ctx}"
            )
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=device)
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
        if token_type_ids is not None:
            token_type_ids = torch.as_tensor(token_type_ids, device=device)
            if token_type_ids.dim() == 1:
                token_type_ids = token_type_ids[None]
        return tokens, attention_mask, token_type_ids

    def _mask_and_positions(self, batch, n_query, attention_mask, past_kv, device):
        """(key padding mask or None, the full 0/1 mask or None, positions [batch, n_query])."""
        past = past_kv.length if past_kv is not None else 0
        full = attention_mask
        if full is not None and past and full.shape[-1] == n_query:
            prev = past_kv.attention_mask
            prev = torch.ones(batch, past, dtype=full.dtype, device=device) if prev is None else prev.to(full.dtype)
            full = torch.cat([prev, full], dim=-1)
        elif full is None and past_kv is not None and past_kv.attention_mask is not None:
            ones = torch.ones(batch, n_query, dtype=past_kv.attention_mask.dtype, device=device)
            full = torch.cat([past_kv.attention_mask, ones], dim=-1)
        if full is None:
            positions = torch.arange(past, past + n_query, device=device).expand(batch, n_query)
            return None, None, positions
        if full.shape != (batch, past + n_query):
            raise ValueError(
                f"attention_mask has shape {tuple(full.shape)}, expected ({batch}, {past + n_query}) "
                "(batch, cached + new positions)"
            )
        # Positions count real tokens only, so a left-padded prompt is embedded exactly as
        # it would be alone (the convention of transformers' generate()).
        positions = (full.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        key_mask = full.bool() if not bool(full.all()) else None
        return key_mask, full, positions

    def _embed(self, tokens, positions, token_type_ids):
        embed = self.embed(tokens)  # [batch, pos, d_model]
        if self.cfg.embed_scale is not None:
            # Gemma: the scale is cast to the weights' dtype first (sqrt(2304) = 48.0 in bf16), as transformers does.
            embed = embed * torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(embed.dtype)
        resid = self.hook_embed(embed)
        if self.cfg.n_token_types:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(tokens)
            resid = resid + self.hook_token_type_embed(self.token_type_embed(token_type_ids))
        if self.cfg.positional_embedding_type == "standard":
            resid = resid + self.hook_pos_embed(self.pos_embed(positions))
        if self.ln_embed is not None:
            resid = self.ln_embed(resid)
        return resid

    def _head(self, resid, return_type, tokens, attention_mask, loss_per_token):
        if return_type not in ("auto", "logits", "hidden", "loss", "both", None):
            raise ValueError(f"return_type must be auto, logits, hidden, loss, both or None; got {return_type!r}")
        resid = follow(resid, self.ln_final or self.mlm_head or self.unembed)  # the head's device, if split
        if self.ln_final is not None:
            resid = self.ln_final(resid)
        if return_type is None:  # nothing to return: no unembedding (and no error for a model without one)
            return None
        if return_type == "hidden" or (return_type == "auto" and self.unembed is None):
            return resid
        if self.unembed is None:
            raise NoUnembedError(
                f"{self.cfg.model_name} has no output head (the checkpoint has none, and a random one would "
                "mean nothing); use return_type='hidden' for the final hidden states, or load a checkpoint "
                "with a head (e.g. BertForMaskedLM)"
            )
        if self.mlm_head is not None:
            resid = self.mlm_head(resid)
        logits = self.unembed(resid)  # [batch, pos, d_vocab_out]
        cap = self.cfg.output_logits_soft_cap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if return_type in ("auto", "logits"):
            return logits
        if return_type is None:
            return None
        loss = self.next_token_loss(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def next_token_loss(self, logits, tokens, attention_mask=None, per_token: bool = False):
        """Cross-entropy of each next token, averaged over real (unpadded) predictions."""
        if not self.cfg.causal:
            raise ValueError("next-token loss is defined for causal models; this one is bidirectional")
        if tokens is None:
            raise ValueError("the loss needs the tokens: pass tokens=... together with start_at_layer")
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        tokens = tokens.to(logits.device)  # a model over several devices embeds on one and predicts on another
        attention_mask = None if attention_mask is None else attention_mask.to(logits.device)
        loss = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, pos - 1]
        if per_token:
            return loss
        if attention_mask is None:
            return loss.mean()
        valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(loss.dtype)
        return (loss * valid).sum() / valid.sum()

    # ------------------------------------------------------------------ tokens and text
    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def tokenize(self, text, prepend_bos: bool | None = None, padding_side: str | None = None, truncate: bool = False) -> Tokenized:
        tokenizer = require_tokenizer(self.tokenizer, self.source)
        return tokenize(
            tokenizer, text, n_ctx=self.cfg.n_ctx, model_name=self.cfg.model_name,
            prepend_bos=prepend_bos, padding_side=padding_side, truncate=truncate,
        )

    def to_tokens(self, text, prepend_bos: bool | None = None, padding_side: str | None = None, truncate: bool = False) -> torch.Tensor:
        """Token ids `[batch, pos]` (batch 1 for a string) on the model's device."""
        return self.tokenize(text, prepend_bos, padding_side, truncate).tokens.to(self.embed.W_E.device)

    def to_str_tokens(self, input, prepend_bos: bool | None = None):
        """Each token as text: a list for one sequence, a list of lists for a batch."""
        tokenizer = require_tokenizer(self.tokenizer, self.source)
        if isinstance(input, str):
            ids = self.tokenize(input, prepend_bos).tokens[0].tolist()
            return decode_each(tokenizer, ids)
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(t, prepend_bos) for t in input]
        ids = torch.as_tensor(input)
        if ids.dim() == 2:
            return [decode_each(tokenizer, row.tolist()) for row in ids]
        return decode_each(tokenizer, ids.reshape(-1).tolist())

    def to_string(self, tokens):
        tokenizer = require_tokenizer(self.tokenizer, self.source)
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [tokenizer.decode(row.tolist()) for row in tokens]
        return tokenizer.decode(tokens.reshape(-1).tolist())

    def to_single_token(self, text: str) -> int:
        ids = self.tokenize(text, prepend_bos=False).tokens[0]
        if ids.numel() != 1:
            raise ValueError(f"{text!r} is {ids.numel()} tokens, not one: {self.to_str_tokens(text, prepend_bos=False)}")
        return int(ids[0])

    # ------------------------------------------------------------------ conveniences
    def block_output_hook_name(self, layer: int) -> str:
        """The hook holding what block `layer` passes on (post-LN models normalise it first)."""
        suffix = "hook_normalized_resid_post" if self.cfg.post_ln else "hook_resid_post"
        return f"blocks.{layer}.{suffix}"

    def set_attention_implementation(self, implementation: str) -> None:
        """"auto" (fused unless scores/pattern are hooked), "explicit" (always) or "sdpa"."""
        if implementation not in ("auto", "explicit", "sdpa"):
            raise ValueError(f"implementation must be auto, explicit or sdpa, got {implementation!r}")
        for block in self.blocks:
            block.attn.implementation = implementation

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    def _apply(self, fn, recurse=True):
        # Keep cfg.device / cfg.dtype true after .to(), .cuda(), .half() (TransformerLens' utilities read them).
        out = super()._apply(fn, recurse)
        self.cfg.device = str(self.embed.W_E.device)
        self.cfg.dtype = self.embed.W_E.dtype
        refresh(self)  # model.to(one device) joins a split model again
        return out

    def generate(self, input, max_new_tokens: int = 20, **kwargs):
        from models.generate import generate

        return generate(self, input, max_new_tokens=max_new_tokens, **kwargs)

    def process_weights(self, fold_ln: bool = False, center_writing_weights: bool = False,
                        center_unembed: bool = False, fold_value_biases: bool = False) -> "HookedTransformer":
        from models.weight_processing import process_weights

        return process_weights(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                               center_unembed=center_unembed, fold_value_biases=fold_value_biases)

    def save(self, directory) -> None:
        from models.loading import save_model

        save_model(self, directory)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{c.model_name}: {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} heads"
                f"{f' ({c.n_kv_heads} KV)' if c.is_gqa else ''}, d_head={c.d_head}, "
                f"{'attention-only' if c.attn_only else f'd_mlp={c.d_mlp}'}, vocab={c.d_vocab}")
