"""The residual stream's gradients by layer, position and path: `residual_gradients` (re-exported by
`interp.gradients`, whose docstring defines what is measured and the residual/block split)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from interp.gradients import PARTS, GradientError, GradientMap, _capturing, _grads, _norm, _upcast, _vjp


# ---------------------------------------------------------------------- the residual stream of a transformer
@dataclass
class ResidualGradients(GradientMap):
    """`GradientMap` over the residual stream of a transformer, one row per target position of a text.

    sites: `hook_embed`, `blocks.{l}.hook_resid_pre` for each layer measured, then the last block's
    output (the final residual stream). parts `[part, layer, row, pos]`: norms of the residual/block
    split of dL/d resid_pre of each layer measured (PARTS: residual, block = attn + mlp, attn, mlp);
    split_error: max |residual + attn + mlp - total| over everything (the parts sum to the total).
    Rows are (sequence, target) pairs: `sequence[row]`, `loss_positions[row]`.
    With keep_grads, grads also holds each part's vectors as `blocks.{l}.hook_resid_pre:{part}`.
    """

    layers: list[int] = field(default_factory=list)
    parts: torch.Tensor | None = None
    split_error: float = 0.0
    tokens: list = field(default_factory=list)  # each sequence's tokens (strings where the model has a tokenizer)
    sequence: torch.Tensor | None = None  # [row]: which sequence each row's target is in
    model_name: str = ""
    loss: str = ""

    def split_by_layer(self) -> torch.Tensor:
        """[part, layer]: mean norm of each part over every counted (target, source) pair."""
        _, counted = self.distances()
        return self.parts[..., counted].mean(-1)

    def layer_distance(self) -> torch.Tensor:
        """[layer (resid_pre of each layer measured, then final), distance]: the heatmap of the report."""
        return self.by_distance()[1:]

    def headline(self) -> str:
        by_site = self.by_site()
        split = self.split_by_layer()
        share = float((split[1] / (split[0] + split[1])).mean())
        dist = self.by_distance()[0]
        far = int(dist.shape[0] - 1)
        return (f"{self.model_name}: mean |dL/d resid_pre| {float(by_site[1]):.3g} at layer {self.layers[0]}, "
                f"{float(by_site[-2]):.3g} at layer {self.layers[-1]}; at the embedding, distance {far} gets "
                f"{float(dist[far] / dist[1]):.2g}x the gradient of distance 1; the block's part of each "
                f"layer's gradient is {share:.0%} of residual + block norms (mean over layers)")

    def to_dict(self) -> dict:
        split = self.split_by_layer()
        return {"model": self.model_name, "loss": self.loss, "layers": self.layers, "sites": self.sites,
                "n_targets": int(self.loss_positions.numel()), "mean_norm_by_site": self.by_site().tolist(),
                "by_distance": self.by_distance().tolist(),
                "split_by_layer": {p: split[i].tolist() for i, p in enumerate(PARTS)},
                "split_error": self.split_error}

    def plot(self):
        """(layer x distance heatmap of log10 |grad|, residual vs block parts by layer) -> two `Figure`s."""
        from interp.plots import heatmap, line_chart

        table = self.by_distance()
        labels = ["embed"] + [f"L{l} resid_pre" for l in self.layers] + ["final"]
        logged = torch.where(table > 0, table.log10(), torch.full_like(table, float("nan")))  # 0: grey
        heat = heatmap(logged, labels, [str(d) for d in range(table.shape[1])],
                       signed=False, title=f"{self.model_name}: log10 mean |dL/d resid| by layer and distance",
                       x_label="distance t - s", colorbar_label="log10 norm", annotate=False)
        split = self.split_by_layer()
        lines = line_chart({p: split[i].tolist() for i, p in enumerate(PARTS)}, x=self.layers,
                           x_label="layer", y_label="mean |part of dL/d resid_pre|",
                           title=f"{self.model_name}: residual path vs block")
        lines.axes[0].set_yscale("log")
        return heat, lines

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return "".join(to_svg(f) for f in self.plot())


def _split_parts(cfg, layer: int, acts, grads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual, attn, mlp) parts of dL/d resid_pre of `layer`, as vectors (see the module docstring)."""
    b = f"blocks.{layer}."
    g = lambda name: grads[b + name]  # noqa: E731
    total = g("hook_resid_pre")
    zero = torch.zeros_like(total)
    if cfg.post_ln:
        if cfg.attn_only:  # post = pre + attn, normalised after the hook
            return g("hook_resid_post"), total - g("hook_resid_post"), zero
        mlp = _vjp(acts[b + "hook_mlp_out"], acts[b + "hook_resid_mid"], g("hook_mlp_out"))
        return g("hook_resid_mid") - mlp, total - g("hook_resid_mid"), mlp
    residual = g("hook_resid_post")
    if cfg.attn_only:
        return residual, total - residual, zero
    if cfg.parallel_attn_mlp:
        attn = _vjp(acts[b + "hook_attn_out"], acts[b + "hook_resid_pre"], g("hook_attn_out"))
        return residual, attn, total - residual - attn
    return residual, total - g("hook_resid_mid"), g("hook_resid_mid") - residual


def _split_sites(cfg, layer: int) -> list[str]:
    b = f"blocks.{layer}."
    names = [b + "hook_resid_pre", b + "hook_resid_post"]
    if cfg.post_ln and not cfg.attn_only:
        names += [b + "hook_resid_mid", b + "hook_mlp_out"]
    elif cfg.parallel_attn_mlp:
        names += [b + "hook_attn_out"]
    elif not cfg.attn_only:
        names += [b + "hook_resid_mid"]
    return names


def _layers(cfg, layers) -> list[int]:
    n = cfg.n_layers
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        if not isinstance(layer, int) or not -n <= layer < n:
            raise GradientError(f"layer {layer!r} does not exist: {cfg.model_name} has layers 0..{n - 1}")
        out.append(layer % n)
    return sorted(set(out))


def _sequences(model, tokens) -> torch.Tensor:
    """[n_sequences, pos] token ids from a string, [pos] or [n, pos] ids."""
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise GradientError(f"residual_gradients reads token ids [pos] or [n_sequences, pos] (equal lengths, no "
                            f"padding) of at least 2 tokens, or one string; got shape {tuple(tokens.shape)}")
    return tokens.to(model.device)


def _loss_kind(model, loss: str) -> str:
    if loss == "auto":
        return "next_token" if model.cfg.causal else "masked"
    if loss not in ("next_token", "masked"):
        raise GradientError(f"loss must be 'auto', 'next_token' or 'masked', got {loss!r}")
    if loss == "next_token" and not model.cfg.causal:
        raise GradientError("next-token loss needs a causal model; this one is bidirectional: use loss='masked'")
    if loss == "masked" and model.cfg.causal:
        raise GradientError("a masked-token loss needs a bidirectional model; this one is causal: use 'next_token'")
    return loss


def residual_gradients(model, tokens, targets: Sequence[int] | None = None, *, loss: str = "auto",
                       layers: Sequence[int] | None = None, mask_token_id: int | None = None,
                       keep_grads: bool = False, chunk_size: int = 8) -> ResidualGradients:
    """dL_t/d resid_pre of every layer at every position, for a loss at each target position t of each sequence.

    tokens: a string, ids [pos], or [n_sequences, pos] (equal lengths: one row per (sequence, target)).
    loss: "next_token" (causal models: cross-entropy of token t + 1 from position t), "masked"
    (bidirectional: token t replaced by the mask token, cross-entropy of the original from position t;
    a checkpoint without an MLM head, as all-MiniLM, reads the final stream through its tied token
    embedding, logits = h_t W_E^T, the decoder BERT's MLM head ties to W_E), "auto": the one that fits.
    targets: positions t (default: every position that has a label). layers: resid_pre of which
    layers (default all). Rows are run `chunk_size` at a time; a causal model's chunk stops at its
    last target (later positions cannot change the loss).
    """
    cfg = model.cfg
    if getattr(cfg, "encoder_decoder", False):
        raise GradientError("residual_gradients reads one stack; for an encoder-decoder use gradient_map with "
                            "its encoder.blocks.* / decoder.blocks.* hook names (decoder_input_ids=... is passed on)")
    kind = _loss_kind(model, loss)
    tokens = _sequences(model, tokens)
    n = tokens.shape[1]
    last = n - 2 if kind == "next_token" else n - 1
    targets = list(range(last + 1)) if targets is None else list(targets)
    if not targets:
        raise GradientError("no target positions given")
    bad = [t for t in targets if not (isinstance(t, int) and 0 <= t <= last)]
    if bad:
        raise GradientError(f"target position {bad[0]!r} is out of range: with the {kind} loss on {n} tokens the "
                            f"targets are 0..{last}")
    if kind == "masked" and mask_token_id is None:
        mask_token_id = getattr(getattr(model, "tokenizer", None), "mask_token_id", None)
        if mask_token_id is None:
            raise GradientError("the masked loss needs the mask token: pass mask_token_id=...")
    layers = _layers(cfg, layers)
    final = f"blocks.{cfg.n_layers - 1}." + ("hook_normalized_resid_post" if cfg.post_ln else "hook_resid_post")
    sites = ["hook_embed"] + [f"blocks.{l}.hook_resid_pre" for l in layers] + [final]
    names = list(dict.fromkeys(sites + [name for l in layers for name in _split_sites(cfg, l)]))
    pairs = torch.tensor([(i, t) for i in range(tokens.shape[0]) for t in targets])  # [row, (sequence, target)]
    norms, parts, losses, kept, error = [], [], [], {}, 0.0
    for chunk in pairs.split(chunk_size):
        seq, pos = chunk[:, 0].to(tokens.device), chunk[:, 1].to(tokens.device)
        length = int(pos.max()) + 1 if kind == "next_token" else n
        rows = tokens[seq, :length].clone()
        if kind == "masked":
            labels = tokens[seq, pos]
            rows[torch.arange(len(chunk)), pos] = mask_token_id
        else:
            labels = tokens[seq, pos + 1]
        with _capturing(model, names) as acts:
            out = model(rows, logit_positions=pos[:, None])  # [rows, 1, vocab] (or d_model, headless)
            if not cfg.has_unembed:
                out = out @ model.W_E.T  # the tied readout
            row_losses = F.cross_entropy(_upcast(out[:, 0]), labels, reduction="none")
            grads = _grads(row_losses.sum(), acts, names, retain=True)
            split = [_split_parts(cfg, l, acts, grads) for l in layers]
        vectors = {s: grads[s] for s in sites}
        for l, (r, a, m) in zip(layers, split):
            vectors.update({f"blocks.{l}.hook_resid_pre:{p}": v for p, v in zip(PARTS, (r, a + m, a, m))})
            error = max(error, float((r + a + m - grads[f"blocks.{l}.hook_resid_pre"]).abs().max()))
        norm = {k: F.pad(_norm(v), (0, n - length)) for k, v in vectors.items()}
        norms.append(torch.stack([norm[s] for s in sites]))  # positions a causal chunk never ran: zero
        parts.append(torch.stack([torch.stack([norm[f"blocks.{l}.hook_resid_pre:{p}"] for l in layers])
                                  for p in PARTS]))
        losses.append(row_losses.detach().cpu())
        if keep_grads:
            for k, v in vectors.items():
                kept.setdefault(k, []).append(F.pad(v.detach().cpu(), (0, 0, 0, n - length)))
    text = model.to_str_tokens(tokens) if getattr(model, "tokenizer", None) is not None else tokens.tolist()
    return ResidualGradients(
        sites, torch.cat(norms, 1), pairs[:, 1], torch.cat(losses), cfg.causal,
        {k: torch.cat(v) for k, v in kept.items()} if keep_grads else None,
        layers=layers, parts=torch.cat(parts, 2), split_error=error, tokens=text, sequence=pairs[:, 0],
        model_name=cfg.model_name, loss=kind)
