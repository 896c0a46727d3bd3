"""Streaming per-feature statistics for the dashboards, in memory bounded by features x (top_k + samples).

Two stores, updated once per chunk of encoded tokens `acts [n_tokens_in_chunk, n_features]`:

`TopContexts`: each feature's top_k activations so far, merged with the chunk's own top_k (torch.topk
over the chunk, then over the union), with the activations of the window around each.

`BandSamples`: activation histograms and uniform samples from activation bands. The bands a dashboard
shows are fractions of a feature's maximum, which is only known at the end of the pass, so the store
works on a grid that can only coarsen: each feature has a scale s = 2^e just above its running
maximum, the histogram has N_HIST equal bins over [0, s) and the samples N_SAMPLE_BINS. When the
maximum passes s, s doubles (or more) and each new bin is the union of 2, 4, ... old ones, so
counts add exactly. Every firing event gets an independent uniform key and each fine bin keeps its
`per_bin` smallest keys: the smallest keys of a union of bins are among the smallest keys of its
parts, so after any coarsening every bin still holds the exact bottom-`per_bin` sample of its events.
At the end, display bands are whole runs of fine bins (each edge within max/32 of its exact fraction
of the maximum: the grid is max/32 to max/16), and the
`per_bin` smallest keys in a band are a uniform sample without replacement of the band's events.
Events are first checked against each bin's current `per_bin`-th key (a bin's threshold only falls
as it fills or merges, so a rejected event can never belong to a sample) and the survivors are
merged in batches, so the work per event is a few vector operations.
"""

from __future__ import annotations

import math

import torch

N_HIST = 64  # histogram bins over [0, scale)
N_SAMPLE_BINS = 32  # sampling bins over [0, scale); two histogram bins each
SAMPLE_SHIFT = 5  # log2(N_SAMPLE_BINS)
MAX_BANDS = N_SAMPLE_BINS // 2  # the maximum occupies at least N_SAMPLE_BINS / 2 + 1 fine bins
NO_EXP = -10_000  # a feature that has not fired yet has no scale
COMPACT_MIN = 1 << 16  # buffered sample candidates before the first merge


def windows(acts: torch.Tensor, counted: torch.Tensor, rows: torch.Tensor, feats: torch.Tensor,
            left: int, right: int) -> torch.Tensor:
    """Activations [C, left + 1 + right] of feature feats[c] around flat chunk row rows[c].

    acts [B, P, F] (the chunk as sequences), counted [B, P] (positions that take part: kept, not BOS);
    positions outside the sequence or not counted are NaN.
    """
    B, P, _ = acts.shape
    b, p = rows // P, rows % P
    pos = p[:, None] + torch.arange(-left, right + 1, device=acts.device)  # [C, W]
    inside = (pos >= 0) & (pos < P)
    pos_c = pos.clamp(0, P - 1)
    out = acts[b[:, None], pos_c, feats[:, None]]
    valid = inside & counted[b[:, None], pos_c]
    return out.masked_fill(~valid, float("nan"))


class TopContexts:
    """Per feature: the top_k activations (values [top_k, F], descending at the end), their flat token
    indices (sequence * seq_len + position; -1 for none) and their windows [F, top_k, W]."""

    def __init__(self, n_features: int, top_k: int, width: int, device) -> None:
        self.k, self.width = top_k, width
        self.values = torch.full((top_k, n_features), -math.inf, device=device)
        self.index = torch.full((top_k, n_features), -1, dtype=torch.long, device=device)
        self.windows = torch.full((n_features, top_k, width), math.nan, device=device)

    def update(self, acts: torch.Tensor, base: int, window_of) -> None:
        """acts [N, F] (0 where not counted); base: flat token index of row 0; window_of(rows, feats)."""
        k = min(self.k, acts.shape[0])
        vals, rows = acts.topk(k, dim=0)  # [k, F]
        floor = self.values[-1]  # kept sorted descending (topk's order)
        better = (vals > floor) & (vals > 0)
        touched = better.any(0).nonzero().squeeze(1)  # only features whose top list changes are rebuilt
        if touched.numel() == 0:
            return
        vals, rows, better = vals[:, touched], rows[:, touched], better[:, touched]
        ks, fs = better.nonzero(as_tuple=True)
        new_windows = torch.full((touched.numel(), k, self.width), math.nan, device=acts.device)
        new_windows[fs, ks] = window_of(rows[ks, fs], touched[fs])
        all_vals = torch.cat([self.values[:, touched], vals.masked_fill(~better, -math.inf)])  # [top_k + k, T]
        all_index = torch.cat([self.index[:, touched], rows + base])
        top = all_vals.topk(self.k, dim=0)
        self.values[:, touched] = top.values
        self.index[:, touched] = all_index.gather(0, top.indices)
        all_windows = torch.cat([self.windows[touched], new_windows], dim=1)  # [T, top_k + k, W]
        pick = top.indices.T[..., None].expand(-1, -1, self.width)
        self.windows[touched] = all_windows.gather(1, pick)


def _coarsen(counts: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """counts [G, n] over bins of width w -> the same events over bins of width w * 2^shift[g]."""
    n = counts.shape[1]
    target = torch.arange(n, device=counts.device)[None] >> shift.clamp(max=62)[:, None]
    return torch.zeros_like(counts).scatter_add_(1, target, counts)


def _bin(values: torch.Tensor, exps: torch.Tensor, n_bins: int) -> torch.Tensor:
    """floor(value * n_bins / 2^exp), computed exactly (float64, powers of two)."""
    shift = math.log2(n_bins) - exps.double()
    return (values.double() * torch.exp2(shift)).floor().long().clamp_(0, n_bins - 1)


def _rank_in_group(group: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order sorting by group then key, each sorted item's rank within its group)."""
    by_key = key.argsort(stable=True)
    order = by_key[group[by_key].argsort(stable=True)]
    g = group[order]
    n = g.numel()
    arange = torch.arange(n, device=g.device)
    starts = torch.ones(n, dtype=torch.bool, device=g.device)
    starts[1:] = g[1:] != g[:-1]
    first = torch.where(starts, arange, torch.zeros_like(arange)).cummax(0).values
    return order, arange - first


class BandSamples:
    """Histograms and per-band uniform samples on a coarsening grid (see the module docstring)."""

    def __init__(self, n_features: int, per_bin: int, width: int, device, seed: int) -> None:
        self.F, self.m, self.width, self.device = n_features, per_bin, width, device
        self.exp = torch.full((n_features,), NO_EXP, dtype=torch.long, device=device)
        self.hist = torch.zeros((n_features, N_HIST), dtype=torch.long, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        empty = dict(device=device)
        self.items = dict(feature=torch.zeros(0, dtype=torch.long, **empty), key=torch.zeros(0, **empty),
                          value=torch.zeros(0, **empty), index=torch.zeros(0, dtype=torch.long, **empty),
                          window=torch.zeros((0, width), **empty))
        self.buffer: list[dict] = []
        self.buffered = 0
        # Each fine bin's per_bin-th smallest key at the last merge (inf while the bin is not full),
        # on the grid of that merge (thr_exp).
        self.threshold = torch.full((n_features * N_SAMPLE_BINS,), math.inf, device=device)
        self.thr_exp = self.exp.clone()

    def update(self, acts: torch.Tensor, base: int, window_of) -> None:
        rows, feats = (acts > 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        values = acts[rows, feats]
        chunk_max = acts.max(0).values
        fired = chunk_max > 0
        need = torch.frexp(chunk_max).exponent.long()  # 2^need > chunk max >= 2^(need - 1)
        seen = self.exp > NO_EXP
        target = torch.where(fired, torch.where(seen, torch.maximum(self.exp, need), need), self.exp)
        grow = seen & (target > self.exp)
        if grow.any():
            self.hist[grow] = _coarsen(self.hist[grow], target[grow] - self.exp[grow])
        self.exp = target
        hist_bin = _bin(values, self.exp[feats], N_HIST)
        self.hist.view(-1).index_add_(0, feats * N_HIST + hist_bin, torch.ones_like(hist_bin))

        keys = torch.rand(values.shape, generator=self.generator, device=values.device)
        old = self.thr_exp[feats]
        scaled = values.double() * torch.exp2(SAMPLE_SHIFT - old.double())
        on_old_grid = (old > NO_EXP) & (scaled < N_SAMPLE_BINS)
        old_bin = scaled.floor().long().clamp(0, N_SAMPLE_BINS - 1)
        limit = torch.where(on_old_grid, self.threshold[feats * N_SAMPLE_BINS + old_bin],
                            torch.full_like(keys, math.inf))
        keep = keys < limit
        if not keep.any():
            return
        rows, feats = rows[keep], feats[keep]
        self.buffer.append(dict(feature=feats, key=keys[keep], value=values[keep], index=rows + base,
                                window=window_of(rows, feats)))
        self.buffered += int(keep.sum())
        if self.buffered > max(COMPACT_MIN, self.items["key"].numel()):
            self.compact()

    def compact(self) -> None:
        """Merge the buffer into the store, keeping each fine bin's per_bin smallest keys."""
        if not self.buffer:
            return
        items = {name: torch.cat([self.items[name]] + [b[name] for b in self.buffer]) for name in self.items}
        self.buffer, self.buffered = [], 0
        feats = items["feature"]
        group = feats * N_SAMPLE_BINS + _bin(items["value"], self.exp[feats], N_SAMPLE_BINS)
        order, rank = _rank_in_group(group, items["key"])
        keep = rank < self.m
        self.items = {name: t[order[keep]] for name, t in items.items()}
        self.threshold.fill_(math.inf)
        full = rank == self.m - 1
        self.threshold[group[order[full]]] = items["key"][order[full]]
        self.thr_exp = self.exp.clone()

    def bands(self, maxima: torch.Tensor, n_bands: int, per_band: int) -> dict[str, torch.Tensor]:
        """Display bands per feature: edges [F, n_bands + 1] (activation values), counts [F, n_bands]
        (events in each band, exact), and per band up to per_band samples (highest value first):
        values [F, n_bands, per_band] (NaN where fewer), index (-1) and windows [.., W]."""
        self.compact()
        F, dev = self.F, self.device
        seen = self.exp > NO_EXP
        scale = torch.exp2(self.exp.double().clamp(min=-1000))  # [F]
        occupied = torch.where(seen, _bin(maxima.clamp(min=0), self.exp, N_SAMPLE_BINS) + 1,
                               torch.ones_like(self.exp))  # fine bins up to the maximum's
        # Inner edges: j / n_bands of the maximum, rounded to the grid (within half a fine bin, <= max / 32);
        # the grid is at least 16 bins per maximum, so for n_bands <= 16 no two edges round together.
        in_bins = maxima.clamp(min=0).double() * torch.exp2(SAMPLE_SHIFT - self.exp.double().clamp(min=-1000))
        j = torch.arange(n_bands + 1, device=dev)
        edge_bins = torch.round(j[None].double() * in_bins[:, None] / n_bands).long()  # [F, n_bands + 1]
        edge_bins[:, 0], edge_bins[:, -1] = 0, occupied
        edges = (edge_bins.double() * (scale / N_SAMPLE_BINS)[:, None]).float().masked_fill(~seen[:, None], math.nan)
        # Counts: histogram bin h lies in sample bin h // 2.
        sample_bin_of_hist = torch.arange(N_HIST, device=dev) // (N_HIST // N_SAMPLE_BINS)
        band_of_hist = (sample_bin_of_hist[None, :, None] >= edge_bins[:, None, 1:]).sum(-1).clamp(max=n_bands - 1)
        counts = torch.zeros((F, n_bands), dtype=torch.long, device=dev).scatter_add_(1, band_of_hist, self.hist)

        out = dict(edges=edges, counts=counts,
                   values=torch.full((F, n_bands, per_band), math.nan, device=dev),
                   index=torch.full((F, n_bands, per_band), -1, dtype=torch.long, device=dev),
                   windows=torch.full((F, n_bands, per_band, self.width), math.nan, device=dev))
        it = self.items
        if it["key"].numel() == 0:
            return out
        feats = it["feature"]
        fine = _bin(it["value"], self.exp[feats], N_SAMPLE_BINS)
        band = (fine[:, None] >= edge_bins[feats, 1:]).sum(-1).clamp(max=n_bands - 1)
        group = feats * n_bands + band
        order, rank = _rank_in_group(group, it["key"])
        chosen = order[rank < per_band]  # the band's per_band smallest keys: a uniform sample
        # Highest value first within each band.
        g = group[chosen]
        by_value = it["value"][chosen].argsort(descending=True, stable=True)
        chosen = chosen[by_value[g[by_value].argsort(stable=True)]]
        order, slot = _rank_in_group(group[chosen], torch.arange(chosen.numel(), device=dev, dtype=torch.float))
        chosen = chosen[order]  # (already in this order: sorted by band, then value)
        f, b = feats[chosen], band[chosen]
        out["values"][f, b, slot] = it["value"][chosen]
        out["index"][f, b, slot] = it["index"][chosen]
        out["windows"][f, b, slot] = it["window"][chosen]
        return out

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [F, N_HIST], bin width [F]): bins from 0; those past the maximum are empty."""
        seen = self.exp > NO_EXP
        width = (torch.exp2(self.exp.double().clamp(min=-1000)) / N_HIST).float().masked_fill(~seen, math.nan)
        return self.hist.clone(), width
