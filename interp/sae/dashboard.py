"""Feature dashboards: what each latent of a sparse dictionary reads and writes, as offline pages.

    from interp.sae.dashboard import feature_dashboards

    dash = feature_dashboards(model, sae, n_tokens=50_000, features=range(512), out_dir="reports/features")
    dash.to_frame()                  # per feature: density, max activation, top tokens, top logits
    dash.top_values[0]               # [top_k] the feature's largest activations over the corpus
    dash.plot(17)                    # activation histogram of latent 17 (a matplotlib Figure)
    dash.save("reports/features")    # index.html (every feature, sortable, searchable) + one page each

One pass over the corpus: the model runs up to the dictionary's layer (`stop_at_layer`) with a hook
that keeps its input activation, the dictionary encodes each batch, and per-feature stores keep the
top-k contexts (a running torch.topk merge), an exact activation histogram, and uniform samples from
activation bands (interp.sae.dashboard_stats): memory is features x (top_k + samples) x window,
whatever the corpus size. An `ActivationDataset` that holds the dictionary's hook is read instead of
running the model. Positions holding BOS (every packed row begins with one) are left out by default:
their activations are outliers on most models and say nothing about the text.

Logits (interp.sae.dashboard_logits): `W_dec[f]`, mapped into the residual stream where needed, through
the final norm's weight (LayerNorm's centring included) and W_U; the norm's scale and bias, b_U and a
soft-cap are left out, being the same for every feature. For a transcoder W_dec[f] is in MLP-output
space, which is added to the residual stream as it is.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interp.sae.dashboard_logits import feature_logits
from interp.sae.dashboard_stats import MAX_BANDS, BandSamples, TopContexts, windows


@dataclass
class FeatureDashboards:
    """Per-feature statistics of a dictionary over a corpus; row i is latent `features[i]`.

    Flat token index = sequence * seq_len + position in `tokens`. Windows are `context = (left, right)`
    tokens around the activating one (W = left + 1 + right): token ids -1 and activations NaN past the
    sequence's ends; activations NaN where a token is not counted (BOS).
    """

    hook_name: str
    out_hook_name: str | None
    features: torch.Tensor  # [n_features] latent ids
    n_tokens: int  # tokens counted (BOS excluded)
    seq_len: int
    context: tuple[int, int]
    fired: torch.Tensor  # [n_features] tokens where the latent is > 0
    max_activation: torch.Tensor  # [n_features] (0 for a feature that never fired)
    mean_activation: torch.Tensor  # [n_features] over the tokens where it fired (NaN if none)
    top_values: torch.Tensor  # [n_features, top_k] descending; NaN past the tokens where it fired
    top_index: torch.Tensor  # [n_features, top_k] flat token index (-1 for none)
    top_tokens: torch.Tensor  # [n_features, top_k, W]
    top_acts: torch.Tensor  # [n_features, top_k, W]
    band_edges: torch.Tensor  # [n_features, n_bands + 1] activation values, 0 ... >= max
    band_counts: torch.Tensor  # [n_features, n_bands] tokens in each band
    band_values: torch.Tensor  # [n_features, n_bands, per_band] a uniform sample, highest first (NaN: fewer)
    band_index: torch.Tensor  # [n_features, n_bands, per_band]
    band_tokens: torch.Tensor  # [n_features, n_bands, per_band, W]
    band_acts: torch.Tensor  # [n_features, n_bands, per_band, W]
    hist_counts: torch.Tensor  # [n_features, n_bins] firing tokens per bin, bins from 0
    hist_width: torch.Tensor  # [n_features] bin width (NaN if never fired)
    logit_top_ids: torch.Tensor  # [n_features, n_logits] the tokens the feature promotes most
    logit_top: torch.Tensor  # [n_features, n_logits]
    logit_bottom_ids: torch.Tensor  # [n_features, n_logits] most suppressed, most negative first
    logit_bottom: torch.Tensor  # [n_features, n_logits]
    logit_note: str  # how the logits were computed, or why there are none
    token_text: dict[int, str] = field(default_factory=dict)  # id -> text, for every id above
    run: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ reading
    @property
    def density(self) -> torch.Tensor:
        """[n_features] fraction of counted tokens where the feature fires."""
        return self.fired.double() / max(self.n_tokens, 1)

    @property
    def log10_density(self) -> torch.Tensor:
        """[n_features] log10 of the density (-inf for a dead feature)."""
        return self.density.log10()

    def row(self, feature: int) -> int:
        """The row of latent id `feature`."""
        hits = (self.features == int(feature)).nonzero()
        if hits.numel() == 0:
            raise KeyError(f"latent {feature} is not among these dashboards' {len(self.features)} features "
                           f"({self.features[:5].tolist()}...): pass it in features=")
        return int(hits[0, 0])

    def text(self, ids) -> list[str]:
        return [self.token_text.get(int(i), str(int(i))) for i in ids]

    def top_activating_tokens(self, feature: int, n: int = 3) -> list[str]:
        """The tokens the top contexts peak on, most frequent first (ties: strongest first)."""
        i = self.row(feature)
        left = self.context[0]
        seen: dict[int, int] = {}
        for tok, val in zip(self.top_tokens[i, :, left].tolist(), self.top_values[i].tolist()):
            if tok >= 0 and val == val:
                seen[tok] = seen.get(tok, 0) + 1
        ranked = sorted(seen, key=lambda t: -seen[t])  # stable: first seen = strongest among equal counts
        return self.text(ranked[:n])

    def to_frame(self):
        """One row per feature: id, density, log10 density, fired, max and mean activation, top tokens and logits."""
        import pandas as pd

        rows = []
        for i, f in enumerate(self.features.tolist()):
            rows.append({"feature": f, "density": float(self.density[i]), "log10_density": float(self.log10_density[i]),
                         "fired": int(self.fired[i]), "max_activation": float(self.max_activation[i]),
                         "mean_activation": float(self.mean_activation[i]),
                         "top_tokens": self.top_activating_tokens(f),
                         "top_logits": self.text(self.logit_top_ids[i, :5]),
                         "bottom_logits": self.text(self.logit_bottom_ids[i, :5])})
        return pd.DataFrame(rows)

    def plot(self, feature: int | None = None):
        """Latent `feature`'s activation histogram over the tokens where it fires; with no feature, the
        distribution of log10 density over all features -> `Figure`."""
        from interp.sae.dashboard_pages import density_figure, histogram_figure

        if feature is None:
            return density_figure(self)
        return histogram_figure(self, self.row(feature))

    def to_dict(self) -> dict:
        """Everything but the windows, as JSON-able lists (the windows are in the safetensors file)."""
        def floats(t):
            return [[None if v != v else v for v in r] for r in t.tolist()] if t.dim() == 2 else \
                [None if v != v else v for v in t.tolist()]

        return {"hook_name": self.hook_name, "out_hook_name": self.out_hook_name, "n_tokens": self.n_tokens,
                "seq_len": self.seq_len, "context": list(self.context), "features": self.features.tolist(),
                "fired": self.fired.tolist(), "max_activation": floats(self.max_activation),
                "mean_activation": floats(self.mean_activation), "top_values": floats(self.top_values),
                "top_index": self.top_index.tolist(), "band_edges": floats(self.band_edges),
                "band_counts": self.band_counts.tolist(), "logit_top_ids": self.logit_top_ids.tolist(),
                "logit_top": floats(self.logit_top), "logit_bottom_ids": self.logit_bottom_ids.tolist(),
                "logit_bottom": floats(self.logit_bottom), "logit_note": self.logit_note,
                "token_text": {str(k): v for k, v in self.token_text.items()}, "run": self.run}

    TENSORS = ("features", "fired", "max_activation", "mean_activation", "top_values", "top_index", "top_tokens",
               "top_acts", "band_edges", "band_counts", "band_values", "band_index", "band_tokens", "band_acts",
               "hist_counts", "hist_width", "logit_top_ids", "logit_top", "logit_bottom_ids", "logit_bottom")

    def save(self, directory) -> Path:
        """index.html, feature-<id>.html for each feature, dashboards.json and dashboards.safetensors
        (every labelled tensor) in `directory`; returns the index page's path."""
        from safetensors.torch import save_file

        from interp.sae.dashboard_pages import write_pages

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "dashboards.json").write_text(json.dumps(self.to_dict()))
        save_file({n: getattr(self, n).contiguous() for n in self.TENSORS}, str(directory / "dashboards.safetensors"))
        return write_pages(self, directory)


# ---------------------------------------------------------------------- the pass
def _check(model, sae, top_k, context, n_bands, band_samples, n_logits, features) -> torch.Tensor:
    cfg = sae.cfg
    if cfg.hook_name not in getattr(model, "hook_dict", {}):
        from interp.names import HookNameError, closest_names

        close = closest_names(cfg.hook_name, list(getattr(model, "hook_dict", {})))
        raise HookNameError(f"the dictionary reads {cfg.hook_name!r}, which this model has no hook point for"
                            + (f" (closest: {', '.join(close)})" if close else "")
                            + ": load the dictionary trained on this model, or set sae.cfg.hook_name")
    if top_k < 1 or band_samples < 1 or n_logits < 0:
        raise ValueError(f"top_k ({top_k}) and band_samples ({band_samples}) must be at least 1, n_logits ({n_logits}) "
                         "at least 0")
    if not 1 <= n_bands <= MAX_BANDS:
        raise ValueError(f"n_bands={n_bands}: bands are cut on a grid of at least 16 bins per feature maximum, so "
                         f"use 1 to {MAX_BANDS}")
    left, right = context
    if left < 0 or right < 0:
        raise ValueError(f"context={context!r} is (tokens before, tokens after) the activating token: use values >= 0")
    ids = torch.arange(cfg.d_sae) if features is None else torch.as_tensor(list(features), dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= cfg.d_sae:
        raise ValueError(f"features must be latent ids in 0..{cfg.d_sae - 1} (the dictionary's d_sae={cfg.d_sae}); "
                         f"got {features!r}")
    if ids.unique().numel() != ids.numel():
        raise ValueError("features lists a latent twice: give each id once")
    return ids


def _model_batches(model, corpus, hook: str, *, n_tokens, seq_len, batch_size):
    """(tokens [n_seq, seq_len] int64, a generator of (first sequence, x [B, seq_len, d])) from a forward
    up to the hook's layer."""
    from interp.collect.corpus import load_corpus
    from interp.collect.packing import document_ids, pack
    from interp.collect.run import stop_layer
    from interp.tokens import bos_id, require_tokenizer

    corpus = load_corpus(corpus).require_text()
    tokenizer = getattr(model, "tokenizer", None)
    if not corpus.is_tokens:
        require_tokenizer(tokenizer, getattr(model, "source", "its source"))
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and seq_len > n_ctx:
        raise ValueError(f"seq_len={seq_len} is longer than the model's context (n_ctx={n_ctx}): use seq_len <= {n_ctx}")
    bos = bos_id(tokenizer) if tokenizer is not None else getattr(model.cfg, "bos_token_id", None)
    limit = None if n_tokens is None else max(1, math.ceil(n_tokens / seq_len))
    tokens = torch.from_numpy(pack(document_ids(corpus, tokenizer), seq_len, bos, limit).astype(np.int64))
    stop = stop_layer(model, [hook])
    takes_stop = "stop_at_layer" in inspect.signature(model.forward).parameters
    device = torch.device(model.device)

    def batches():
        box = {}

        def keep(tensor, hook):
            box["x"] = tensor.detach().clone()  # a copy: the forward may still edit it in place after the hook
        keep.read_only = True  # the hook only reads (interp.hooks): the model keeps its fast path

        for start in range(0, len(tokens), batch_size):
            batch = tokens[start:start + batch_size].to(device)
            with torch.no_grad(), model.hooks(fwd_hooks=[(hook, keep)]):
                if not takes_stop:
                    model(batch)
                elif stop is None:
                    model(batch, return_type=None)
                else:
                    model(batch, stop_at_layer=stop, return_type=None)
            yield start, box.pop("x")

    return tokens, None, bos, batches()


def _dataset_batches(ds, hook: str, *, n_tokens, batch_size):
    """The same from an ActivationDataset (its stored activations at its kept positions)."""
    if hook not in ds.hooks:
        raise KeyError(f"{ds.path} holds {', '.join(ds.hooks)}, not the dictionary's hook {hook!r}: collect it "
                       f"(collect_activations(..., hooks=[{hook!r}])) or pass the corpus instead")
    n_seq = ds.n_sequences if n_tokens is None else min(ds.n_sequences, max(1, math.ceil(n_tokens / ds.seq_len)))
    tokens = ds.tokens()[:n_seq]
    positions = None if ds.manifest["positions"] is None else torch.tensor(ds.positions)
    bos = ds.manifest["packing"].get("bos_token_id")

    def batches():
        for start in range(0, n_seq, batch_size):
            end = min(start + batch_size, n_seq)
            parts, at = [], start
            while at < end:  # a batch may straddle shards
                shard, row = ds._locate(at)
                t = ds.tensor(shard, hook)
                take = min(end - at, t.shape[0] - row)
                parts.append(t[row:row + take])
                at += take
            yield start, torch.cat(parts).float()

    return tokens, positions, bos, batches()


@torch.no_grad()
def feature_dashboards(model, sae, corpus=None, *, n_tokens: int | None = 100_000, features=None, top_k: int = 20,
                       context: tuple[int, int] = (12, 4), n_bands: int = 5, band_samples: int = 5,
                       n_logits: int = 10, seq_len: int = 128, batch_size: int = 8, exclude_bos: bool = True,
                       seed: int = 0, out_dir=None, progress: bool = True) -> FeatureDashboards:
    """Dashboards for `features` (None: every latent) of `sae` over `corpus` -> `FeatureDashboards`.

    corpus: anything `interp.collect.load_corpus` reads (None: the bundled Wikipedia summaries), packed
      as `interp.collect` packs it (seq_len tokens, BOS first), or an `ActivationDataset` holding the
      dictionary's hook (read, not recomputed). n_tokens: the token budget (None: the whole corpus).
    top_k: top-activating contexts per feature. context: (tokens before, tokens after) each shown token.
    n_bands, band_samples: activation bands (equal fractions of the feature's maximum, each edge within
      1/32 of the maximum of its fraction) and the uniform sample of contexts shown from each. n_logits: promoted and
      suppressed tokens listed. exclude_bos: leave BOS positions out of every statistic.
    out_dir: also write the pages there (`FeatureDashboards.save`).
    """
    from interp.collect.dataset import ActivationDataset

    ids = _check(model, sae, top_k, context, n_bands, band_samples, n_logits, features)
    hook = sae.cfg.hook_name
    if isinstance(corpus, ActivationDataset):
        tokens, positions, bos, batches = _dataset_batches(corpus, hook, n_tokens=n_tokens, batch_size=batch_size)
    else:
        tokens, positions, bos, batches = _model_batches(model, corpus, hook, n_tokens=n_tokens, seq_len=seq_len,
                                                         batch_size=batch_size)
    n_seq, P = tokens.shape
    left, right = context
    W = left + 1 + right
    device = sae.W_enc.device
    F = ids.numel()
    ids_dev = ids.to(device)
    top = TopContexts(F, top_k, W, device)
    bands = BandSamples(F, band_samples, W, device, seed)
    fired = torch.zeros(F, dtype=torch.long, device=device)
    total = torch.zeros(F, dtype=torch.float64, device=device)
    counted_tokens = 0
    from tqdm.auto import tqdm

    with tqdm(total=n_seq * P, unit="tok", unit_scale=True, desc=f"dashboards {hook}", disable=not progress) as bar:
        for start, x in batches:
            B = x.shape[0]
            x = x.to(device).flatten(2)  # [B, positions, d_in] (heads' z flattened as SAELens does)
            if x.shape[-1] != sae.cfg.d_in:
                raise ValueError(f"{hook} has {x.shape[-1]} features per token but the dictionary reads d_in="
                                 f"{sae.cfg.d_in}: load the dictionary trained for this model and hook")
            lat = sae.encode(x).float()  # [B, positions, d_sae]
            lat = lat if features is None else lat.index_select(-1, ids_dev)  # [B, positions, F]
            tok = tokens[start:start + B].to(device)
            if positions is None:
                acts, kept = lat, torch.ones((B, P), dtype=torch.bool, device=device)
            else:  # a collection that kept some positions: the others are unknown
                acts = torch.zeros((B, P, F), device=device)
                acts[:, positions.to(device)] = lat
                kept = torch.zeros((B, P), dtype=torch.bool, device=device)
                kept[:, positions.to(device)] = True
            counted = kept & (tok != bos) if (exclude_bos and bos is not None) else kept
            flat = acts.masked_fill(~counted[..., None], 0.0).reshape(B * P, F)  # [N, F]

            def window_of(rows, feats, acts=acts, counted=counted):
                return windows(acts, counted, rows, feats, left, right)

            fired += (flat > 0).sum(0)
            total += flat.sum(0, dtype=torch.float64)
            counted_tokens += int(counted.sum())
            top.update(flat, start * P, window_of)
            bands.update(flat, start * P, window_of)
            bar.update(B * P)

    maxima = top.values[0].clamp(min=0)
    band = bands.bands(maxima, n_bands, band_samples)
    hist, width = bands.histogram()
    logits = feature_logits(model, sae, ids, n_logits)
    top_values = top.values.T.masked_fill(top.values.T == -math.inf, math.nan)
    result_tokens = {"top": _window_tokens(tokens, top.index.T.cpu(), P, left, right),
                     "band": _window_tokens(tokens, band["index"].cpu(), P, left, right)}
    id_set = set(torch.cat([result_tokens["top"].flatten(), result_tokens["band"].flatten(),
                            logits["top_ids"].flatten(), logits["bottom_ids"].flatten()]).unique().tolist()) - {-1}
    result = FeatureDashboards(
        hook_name=hook, out_hook_name=sae.cfg.out_hook_name if sae.cfg.is_transcoder else None, features=ids,
        n_tokens=counted_tokens, seq_len=P, context=(left, right), fired=fired.cpu(), max_activation=maxima.cpu(),
        mean_activation=(total / fired.clamp(min=1)).float().masked_fill(fired == 0, math.nan).cpu(),
        top_values=top_values.cpu(), top_index=top.index.T.cpu(), top_tokens=result_tokens["top"],
        top_acts=top.windows.cpu(), band_edges=band["edges"].cpu(), band_counts=band["counts"].cpu(),
        band_values=band["values"].cpu(), band_index=band["index"].cpu(), band_tokens=result_tokens["band"],
        band_acts=band["windows"].cpu(), hist_counts=hist.cpu(), hist_width=width.cpu(),
        logit_top_ids=logits["top_ids"], logit_top=logits["top"], logit_bottom_ids=logits["bottom_ids"],
        logit_bottom=logits["bottom"], logit_note=logits["note"], token_text=_token_text(model, sorted(id_set)),
        run={"model": getattr(model.cfg, "model_name", type(model).__name__), "hook": hook,
             "dictionary": repr(sae.cfg), "corpus": _corpus_name(corpus),
             "sequences": n_seq, "seq_len": P, "tokens counted": counted_tokens, "BOS excluded": bool(exclude_bos),
             "top_k": top_k, "context": [left, right], "bands": n_bands, "samples per band": band_samples,
             "seed": seed},
    )
    if out_dir is not None:
        result.save(out_dir)
    return result


def _corpus_name(corpus) -> str:
    from interp.collect.dataset import ActivationDataset

    if isinstance(corpus, ActivationDataset):
        return f"activations in {corpus.path}"
    if corpus is None:
        return "the bundled Wikipedia summaries"
    return getattr(corpus, "name", None) or (corpus if isinstance(corpus, str) and len(corpus) < 200
                                             else type(corpus).__name__)


def _window_tokens(tokens: torch.Tensor, index: torch.Tensor, P: int, left: int, right: int) -> torch.Tensor:
    """Token ids [*index.shape, W] around each flat index (-1 past the sequence's ends or for index -1)."""
    seq, pos = index.clamp(min=0) // P, index.clamp(min=0) % P
    at = pos[..., None] + torch.arange(-left, right + 1)
    inside = (at >= 0) & (at < P) & (index[..., None] >= 0)
    out = tokens[seq[..., None].expand_as(at), at.clamp(0, P - 1)]
    return out.masked_fill(~inside, -1)


def _token_text(model, ids: list[int]) -> dict[int, str]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not ids:
        return {i: f"<{i}>" for i in ids}
    from interp.tokens import decode_each

    return dict(zip(ids, decode_each(tokenizer, ids)))
