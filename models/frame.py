"""What one forward's attention layers share: the KV cache of earlier positions, and the frame (masks,
positions, rotary tables, T5's bias; for cross-attention the encoder's output), with its copies for the
blocks of a model over several devices."""

from __future__ import annotations

import torch

from models.config import TransformerConfig
from models.rotary import Rotary


# ---------------------------------------------------------------------- the KV cache
class KVCache:
    """Keys (after rotary) and values of earlier positions, per layer: `[batch, n_kv_heads, pos, d_head]`.

    Generation appends to it. A frozen cache is read but never extended, so one
    prefix can serve many continuations (patching sweeps reuse it this way).
    """

    def __init__(self, n_layers: int, frozen: bool = False) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.attention_mask: torch.Tensor | None = None  # [batch, pos], 1 = real token
        self.frozen = frozen
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.keys[layer], self.values[layer]
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        if not self.frozen:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def commit(self, n_new: int, mask: torch.Tensor | None) -> None:
        """Record that a forward added `n_new` positions (called once per forward, after all layers)."""
        if not self.frozen:
            self._length += n_new
            self.attention_mask = mask

    def frozen_copy(self) -> "KVCache":
        out = KVCache(len(self.keys), frozen=True)
        out.keys, out.values = list(self.keys), list(self.values)
        out.attention_mask, out._length = self.attention_mask, self._length
        return out

    def expand(self, batch: int) -> "KVCache":
        """The same prefix repeated for `batch` rows (a cache of batch 1 serving a batch of continuations)."""
        out = self.frozen_copy()
        out.keys = [None if k is None else k.expand(batch, *k.shape[1:]) for k in self.keys]
        out.values = [None if v is None else v.expand(batch, *v.shape[1:]) for v in self.values]
        if self.attention_mask is not None:
            out.attention_mask = self.attention_mask.expand(batch, -1)
        return out


# ---------------------------------------------------------------------- per-forward state
class AttentionFrame:
    """What every layer of one forward shares: masks (one per window size), positions and rotary tables."""

    def __init__(
        self,
        cfg: TransformerConfig,
        n_query: int,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None,
        past_kv: KVCache | None,
        rotary: "dict[str, Rotary] | Rotary | None",
        allowed: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        causal: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.causal = cfg.causal if causal is None else causal  # an encoder-decoder's encoder is bidirectional
        self.n_query = n_query
        self.positions = positions  # [batch, n_query]
        self.key_mask = key_mask  # [batch, n_past + n_query] bool, or None when nothing is padded
        self.past_kv = past_kv
        self.offset = past_kv.length if past_kv is not None else 0
        if rotary is not None and not isinstance(rotary, dict):
            rotary = {"global": rotary}
        self.rotary = rotary or None
        self._cos_sin: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._given = allowed  # an explicit mask is used as given (packed rows)
        self._explicit = allowed is not None
        self.key_positions = key_positions  # [batch or 1, n_keys]: windows over an explicit mask need them
        self._allowed: dict[int | None, torch.Tensor] = {}
        self.position_bias: torch.Tensor | None = None  # [1 or batch, heads, q, k], T5's relative positions
        self.memory = None  # what cross-attention reads (None: this is a self-attention frame)
        self._parent: AttentionFrame | None = None
        self._copies: dict[torch.device, AttentionFrame] = {}

    def on(self, device: torch.device) -> "AttentionFrame":
        """This frame for the blocks on `device` (a model over several devices): the same masks, positions and
        rotary tables, computed once where the forward began and copied over once per device."""
        if self.positions.device == device:
            return self
        root = self._parent or self
        if device not in root._copies:
            copy = object.__new__(AttentionFrame)
            copy.__dict__.update(root.__dict__)
            move = lambda t: None if t is None else torch.as_tensor(t).to(device)  # noqa: E731
            copy.positions, copy.key_mask, copy._given = move(root.positions), move(root.key_mask), move(root._given)
            copy.key_positions, copy.position_bias = move(root.key_positions), move(root.position_bias)
            copy._allowed, copy._cos_sin, copy._parent, copy._copies = {}, {}, root, {}
            root._copies[device] = copy
        return root._copies[device]

    def cos_sin(self, dtype: torch.dtype, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        which = "local" if local and "local" in self.rotary else "global"
        if (dtype, which) not in self._cos_sin:
            if self._parent is not None:  # computed once, where the forward began
                device = self.positions.device
                self._cos_sin[(dtype, which)] = tuple(t.to(device) for t in self._parent.cos_sin(dtype, local))
            else:
                self._cos_sin[(dtype, which)] = self.rotary[which](self.positions, dtype)
        return self._cos_sin[(dtype, which)]

    def needs_mask(self, window: int | None = None) -> bool:
        """False when SDPA's own `is_causal` (or no mask at all) says everything."""
        if self.key_mask is not None or self._explicit or window is not None:
            return True
        return self.causal and self.offset > 0 and self.n_query > 1

    def sdpa_is_causal(self, window: int | None = None) -> bool:
        return (self.causal and self.offset == 0 and self.n_query > 1 and self.key_mask is None
                and not self._explicit and window is None)

    def allowed(self, window: int | None = None) -> torch.Tensor:
        """Boolean `[batch or 1, 1, n_query, n_key]`: may this query read this key (within `window`)?"""
        if window not in self._allowed:
            parent = self._parent
            self._allowed[window] = self._build(window) if parent is None \
                else parent.allowed(window).to(self.positions.device)
        return self._allowed[window]

    def _build(self, window: int | None) -> torch.Tensor:
        device = self.positions.device
        if self._explicit:
            allowed = self._given
            if window is not None:
                if self.key_positions is None:
                    raise ValueError("an explicit attention mask on a model with sliding windows needs key_positions "
                                     "(the position of every key), so that each window can be applied")
                q_pos = self.positions[:, None, :, None]
                k_pos = torch.as_tensor(self.key_positions, device=device)[:, None, None, :]
                allowed = allowed & (q_pos - k_pos < window)
            return allowed
        n_key = self.offset + self.n_query
        allowed = torch.ones(1, 1, self.n_query, n_key, dtype=torch.bool, device=device)
        q_idx = torch.arange(self.offset, n_key, device=device)[:, None]
        k_idx = torch.arange(n_key, device=device)[None, :]
        if self.causal:
            allowed = allowed & (k_idx <= q_idx)
        if window is not None:
            # transformers' rule, on indices (equal to positions among a row's real tokens): q - k < window.
            allowed = allowed & (q_idx - k_idx < window)
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, None, :]
            # A padding query may see nothing; let it see everything so no row is
            # all -inf (NaN would leak through the zero weights of later layers).
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed


class CrossFrame:
    """What a decoder's cross-attention reads: the encoder's output and which of its positions are real."""

    rotary = None
    past_kv = None
    position_bias = None

    def __init__(self, memory: torch.Tensor, key_mask: torch.Tensor | None) -> None:
        self.memory = memory  # [batch, n_encoder_pos, d_model]
        self.key_mask = key_mask  # [batch, n_encoder_pos] bool, or None when nothing is padded
        self._allowed = None
        self._copies: dict[torch.device, CrossFrame] = {}

    def on(self, device: torch.device) -> "CrossFrame":
        """The encoder's output for the decoder blocks on `device` (copied once per device)."""
        if self.memory.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = CrossFrame(self.memory.to(device),
                                              None if self.key_mask is None else self.key_mask.to(device))
        return self._copies[device]

    def needs_mask(self, window: int | None = None) -> bool:
        return self.key_mask is not None

    def sdpa_is_causal(self, window: int | None = None) -> bool:
        return False

    def allowed(self, window: int | None = None) -> torch.Tensor:
        """`[batch, 1, 1, n_encoder_pos]`: every decoder position reads every real encoder position."""
        if self._allowed is None:
            allowed = self.key_mask[:, None, None, :]
            self._allowed = allowed | ~allowed.any(-1, keepdim=True)  # an all-padding row: no NaN
        return self._allowed
