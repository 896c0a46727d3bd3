"""What attention costs as sequences grow: forward time and peak memory against length, fitted.

    python -m analyses.attention_cost [--out reports/attention_cost] [--quick]
    python benchmarks/attention_cost.py                                         (the long run, printed)

Three ways to run the same forward (models/attention.py):

    fused            no hooks: `F.scaled_dot_product_attention` (the CPU flash kernel for causal attention)
    explicit         `set_attention_implementation("explicit")`: softmax(q k^T) @ v, [heads, n, n] materialised
    fused+patterns   run_with_cache of every `hook_pattern`: the fused kernel, plus the pattern computed beside it
                     and kept in the cache (docs/design.md, "Patterns and offload")

For each sequence length n: the median forward time over `repeats` rounds (the paths interleaved in each round,
so machine drift hits all alike; torch.inference_mode) and the peak bytes of tensors alive during the call beyond
those alive before it (`LiveBytes`: every tensor an aten op allocates is counted until its storage is freed; the
weights, the input and the CPU kernels' internal scratch, which is constant in n, are not). Both are fitted by
non-negative least squares to c + a n + b n^2 (relative residuals, so small and large n weigh alike); n* = a / b is
where the quadratic term overtakes the linear one. The exponent is the log-log slope over the longer half of the
lengths. The analytic count per layer is linear 2 n (q, k, v, o projections + MLP weights) and quadratic
4 n^2 h d_head (q k^T and pattern @ v over the full square; a causal kernel may skip half).

The forward stops before the unembedding (`return_type=None`): the comparison is attention against the rest of
a block, so n* is a property of one layer's shape, the same for 2 layers as for 30.

The fits live in `analyses/cost_fit.py`, the memory count in `interp/memory.py` (both re-exported here).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analyses.cost_fit import Fit, _num, fit_curve, loglog_slope, nnls_quadratic
from interp.memory import LiveBytes, peak_bytes

__all__ = [  # the study's own names, and those of cost_fit and interp.memory it re-exports
    "LENGTHS", "PATHS", "QUICK_LENGTHS", "SMOLLM2_SHAPE", "AttentionCostResult", "Fit", "LiveBytes", "attention_cost",
    "fit_curve", "flop_counts", "loglog_slope", "main", "nnls_quadratic", "peak_bytes", "smollm2_shape",
]


PATHS = ("fused", "explicit", "fused+patterns")
QUICK_LENGTHS = (32, 64, 128, 256, 512)
LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
# SmolLM2-135M's shape (LLaMA family: RMSNorm, rotary base 1e5, SwiGLU, 9 query / 3 KV heads of 64).
SMOLLM2_SHAPE = dict(d_model=576, n_heads=9, n_kv_heads=3, d_head=64, d_mlp=1536, d_vocab=49152, n_layers=30,
                     rotary_base=100000.0)


def smollm2_shape(n_layers: int = 30, n_ctx: int = 8192, **overrides):
    """A `TransformerConfig` of SmolLM2-135M's shape (random weights are built from it), `n_layers` of its 30."""
    from models.config import TransformerConfig

    shape = {**SMOLLM2_SHAPE, "n_layers": n_layers, **overrides}
    return TransformerConfig(n_ctx=n_ctx, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                             positional_embedding_type="rotary", norm_eps=1e-5, model_name="smollm2-135m-shape",
                             **shape)


# ---------------------------------------------------------------------- the result
@dataclass
class AttentionCostResult:
    model_name: str
    shape: dict  # d_model, n_layers, n_heads, n_kv_heads, d_head, d_mlp, dtype, batch
    lengths: list[int]
    paths: tuple[str, ...]
    seconds: torch.Tensor  # [path, length]: median forward seconds (nan: not measured)
    peak_bytes: torch.Tensor  # [path, length]: peak bytes of tensors the forward allocated (nan: not measured)
    time_fits: dict[str, Fit]
    memory_fits: dict[str, Fit]
    flops_linear: float  # per token, whole forward (blocks): the a of the FLOP count
    flops_quadratic: float  # per token pair, full square: the b
    repeats: int = 1
    skipped: dict = field(default_factory=dict)  # path -> lengths left out (their pattern memory over the limit)
    seconds_total: float = 0.0

    @property
    def flops_crossover(self) -> float:
        """n* of the FLOP count over the full square (a causal kernel that skips the upper half: twice this)."""
        return self.flops_linear / self.flops_quadratic

    def headline(self) -> str:
        parts = [f"{p} n^{self.time_fits[p].exponent:.2f}" for p in self.paths if p in self.time_fits]
        cross = [f"{p} {_fmt_n(self.time_fits[p].crossover)}" for p in self.paths if p in self.time_fits]
        return (f"forward time over n = {self.lengths[0]}-{self.lengths[-1]} grows as " + ", ".join(parts)
                + "; the quadratic term takes over at n* = " + ", ".join(cross)
                + f" (FLOP count: {_fmt_n(self.flops_crossover)}, causal half {_fmt_n(2 * self.flops_crossover)})")

    def to_frame(self):
        import pandas as pd

        rows = []
        for i, path in enumerate(self.paths):
            for j, n in enumerate(self.lengths):
                rows.append({"path": path, "n": n, "seconds": float(self.seconds[i, j]),
                             "peak MiB": float(self.peak_bytes[i, j]) / 2**20})
        return pd.DataFrame(rows)

    def fit_rows(self) -> list[dict]:
        rows = []
        for path in self.paths:
            for what, fits in (("time", self.time_fits), ("memory", self.memory_fits)):
                if path in fits:
                    f = fits[path]
                    rows.append({"path": path, "of": what, "exponent": f.exponent, "fit from n": f.fit_from,
                                 "c": f.constant, "a (per n)": f.linear, "b (per n^2)": f.quadratic,
                                 "n* = a/b": _fmt_n(f.crossover)})
        return rows

    def plot(self):
        """Log-log forward time and peak memory against n, per path, with the fitted c + a n + b n^2 -> `Figure`."""
        from interp.plots import COLORS, new_figure

        fig = new_figure(10.0, 3.8)
        axes = fig.subplots(1, 2)
        n = torch.tensor(self.lengths, dtype=torch.float64)
        for ax, values, fits, label in ((axes[0], self.seconds, self.time_fits, "forward seconds"),
                                        (axes[1], self.peak_bytes / 2**20, self.memory_fits, "peak MiB")):
            for i, path in enumerate(self.paths):
                color = COLORS[i % len(COLORS)]
                ax.plot(n, values[i].double(), "o", color=color, markersize=4, label=path)
                if path in fits:  # the fit over the lengths it was measured at
                    f, measured = fits[path], n[torch.isfinite(values[i])]
                    grid = torch.logspace(math.log10(measured[0]), math.log10(measured[-1]), 100, dtype=torch.float64)
                    scale = 2**20 if label == "peak MiB" else 1
                    ax.plot(grid, f.predict(grid) / scale, "-", color=color, linewidth=1.2, alpha=0.7,
                            label=f"n^{f.exponent:.2f}, n* {_fmt_n(f.crossover)}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n", fontsize=9)
            ax.set_ylabel(label, fontsize=9)
            ax.grid(alpha=0.3, linewidth=0.6)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7, frameon=False)
        if n[0] <= self.flops_crossover <= n[-1]:
            axes[0].axvline(self.flops_crossover, color="#888888", linestyle="--", linewidth=0.8)
        axes[0].set_title(f"{self.model_name}: time (dashed: FLOP-count n*)", fontsize=10)
        axes[1].set_title("peak memory of tensors the forward allocates", fontsize=10)
        return fig

    def to_dict(self) -> dict:
        return {"model": self.model_name, "shape": self.shape, "lengths": self.lengths, "paths": list(self.paths),
                "repeats": self.repeats,
                "seconds": {p: [_num(float(v)) for v in self.seconds[i]] for i, p in enumerate(self.paths)},
                "peak_bytes": {p: [_num(float(v)) for v in self.peak_bytes[i]] for i, p in enumerate(self.paths)},
                "time_fits": {p: f.to_dict() for p, f in self.time_fits.items()},
                "memory_fits": {p: f.to_dict() for p, f in self.memory_fits.items()},
                "flops": {"linear_per_token": self.flops_linear, "quadratic_per_pair": self.flops_quadratic,
                          "crossover_full_square": self.flops_crossover,
                          "crossover_causal_half": 2 * self.flops_crossover},
                "skipped": self.skipped, "seconds_total": self.seconds_total}

    def save(self, directory) -> Path:
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "attention_cost.json").write_text(json.dumps(self.to_dict(), indent=1))
        page = Page(f"What attention costs: {self.model_name}",
                    {"call": f"analyses.attention_cost.attention_cost(lengths={list(self.lengths)})",
                     "longer sequences": "python benchmarks/attention_cost.py", "shape": self.shape,
                     "lengths": self.lengths, "repeats": self.repeats})
        page.text(self.headline() + ".")
        page.text("Paths: fused = no hooks, scaled_dot_product_attention; explicit = softmax(q k^T) v with the "
                  "pattern materialised; fused+patterns = run_with_cache of every hook_pattern (the fused kernel, "
                  "the pattern computed beside it and kept). Time: median forward seconds (blocks only, no "
                  "unembedding). Memory: peak bytes of the tensors the forward allocates, counted op by op. Fit: "
                  "c + a n + b n^2 by non-negative least squares on relative residuals; n* = a / b is where the "
                  "quadratic term overtakes the linear one; the exponent is the log-log slope over the longer half.")
        page.figure(self.plot())
        page.table(self.fit_rows(), caption="Fits per path")
        rows = []
        for j, n in enumerate(self.lengths):
            row = {"n": n}
            for i, p in enumerate(self.paths):
                row[f"{p} ms"] = float(self.seconds[i, j]) * 1e3
                row[f"{p} MiB"] = float(self.peak_bytes[i, j]) / 2**20
            rows.append(row)
        page.table(rows, caption="Measurements (nan: left out, the pattern would not fit the memory limit)")
        page.text(f"FLOP count per forward: {self.flops_linear:.3g} n (weights) + {self.flops_quadratic:.3g} n^2 "
                  f"(q k^T and pattern @ v, full square): the quadratic term overtakes at n = "
                  f"{_fmt_n(self.flops_crossover)}, or {_fmt_n(2 * self.flops_crossover)} for a causal kernel "
                  "that skips the masked half.")
        return page.save(directory / "index.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


def _fmt_n(v: float) -> str:
    return "none" if not math.isfinite(v) else f"{v:,.0f}"


# ---------------------------------------------------------------------- the measurement
def flop_counts(cfg) -> tuple[float, float]:
    """(a, b) of the forward's FLOPs a n + b n^2 per sequence: weights per token, and q k^T + pattern @ v per pair."""
    h, kv, d, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
    mlp = 0 if getattr(cfg, "attn_only", False) or not cfg.d_mlp else (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp
    linear = 2 * (d * h * dh + 2 * d * kv * dh + h * dh * d + mlp)
    return float(cfg.n_layers * linear), float(cfg.n_layers * 4 * h * dh)


def _calls(model, tokens) -> dict:
    patterns = lambda name: name.endswith("hook_pattern")  # noqa: E731

    def explicit():
        model.set_attention_implementation("explicit")
        try:
            return model(tokens, return_type=None)
        finally:
            model.set_attention_implementation("auto")

    return {"fused": lambda: model(tokens, return_type=None), "explicit": explicit,
            "fused+patterns": lambda: model.run_with_cache(tokens, names_filter=patterns, return_type=None)}


def _pattern_bytes(cfg, path: str, n: int, batch: int, itemsize: int) -> float:
    """The n^2 memory a path needs at its peak: explicit ~ 2 [heads, n, n] buffers (scores and pattern); cached
    patterns one per layer, plus the one being made."""
    square = batch * cfg.n_heads * n * n * itemsize
    return {"fused": 0.0, "explicit": 2 * square, "fused+patterns": (cfg.n_layers + 1) * square}[path]


def attention_cost(model_or_config=None, lengths=None, *, paths=PATHS, batch: int = 1, repeats: int = 3, quick: bool = False,
                   memory_limit: float = 4 * 2**30, threads: int | None = None, log=None) -> AttentionCostResult:
    """Forward time and peak memory per sequence length for each attention path, with fits (module docstring).

    model_or_config: a HookedTransformer, or a TransformerConfig to build one with random weights (default:
    `smollm2_shape(n_layers=2)`, two of SmolLM2-135M's layers).
    lengths: default QUICK_LENGTHS (32-512) with quick, else LENGTHS (64-4096). quick: 1 timed round, for the tour.
    memory_limit: a path whose n^2 buffers would exceed it is left out at that length (nan), so a long run does not
    exhaust the machine. threads: torch's CPU threads for the run (restored after); on a machine shared with other
    work, 1 gives stable times (two threads that wait on each other at every op's barrier while a third process
    holds a core cost ~0.8 s per forward here).
    """
    from models.config import TransformerConfig
    from models.hooked_transformer import HookedTransformer

    start = time.perf_counter()
    if model_or_config is None:
        model_or_config = smollm2_shape(n_layers=2)
    if isinstance(model_or_config, TransformerConfig):
        torch.manual_seed(0)
        model = HookedTransformer(model_or_config).requires_grad_(False).eval()
    elif isinstance(model_or_config, HookedTransformer):
        model = model_or_config
    else:
        raise TypeError(f"attention_cost takes a HookedTransformer or a TransformerConfig (e.g. smollm2_shape()), "
                        f"got {type(model_or_config).__name__}")
    cfg = model.cfg
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown attention paths {unknown}; choose from {PATHS}")
    lengths = sorted(int(n) for n in (lengths or (QUICK_LENGTHS if quick else LENGTHS)))
    if lengths[-1] > cfg.n_ctx:
        raise ValueError(f"length {lengths[-1]} is beyond n_ctx={cfg.n_ctx} of {cfg.model_name}; pass shorter lengths "
                         "or a config with a larger n_ctx")
    repeats = 1 if quick else repeats
    itemsize = next(model.parameters()).element_size()
    seconds = torch.full((len(paths), len(lengths)), math.nan, dtype=torch.float64)
    peaks = torch.full_like(seconds, math.nan)
    skipped: dict[str, list[int]] = {}
    gen = torch.Generator().manual_seed(0)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _measure(model, cfg, paths, lengths, batch, repeats, memory_limit, itemsize, gen, seconds, peaks, skipped, log)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    time_fits, memory_fits = {}, {}
    for i, p in enumerate(paths):
        if int(torch.isfinite(seconds[i]).sum()) >= 3:
            time_fits[p] = fit_curve(lengths, seconds[i])
            memory_fits[p] = fit_curve(lengths, peaks[i])
    a, b = flop_counts(cfg)
    shape = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
             "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "dtype": str(cfg.dtype).removeprefix("torch."), "batch": batch,
             "device": str(model.device), "threads": used_threads}
    return AttentionCostResult(cfg.model_name, shape, lengths, tuple(paths), seconds, peaks, time_fits, memory_fits,
                               batch * a, batch * b, repeats, skipped, time.perf_counter() - start)


def _measure(model, cfg, paths, lengths, batch, repeats, memory_limit, itemsize, gen, seconds, peaks, skipped,
             log) -> None:
    """Fill seconds and peaks [path, length] in place; lengths a path must leave out go to skipped."""
    with torch.inference_mode():
        for j, n in enumerate(lengths):
            tokens = torch.randint(0, cfg.d_vocab, (batch, n), generator=gen).to(model.device)
            calls = _calls(model, tokens)
            run = [p for p in paths if _pattern_bytes(cfg, p, n, batch, itemsize) <= memory_limit]
            for p in paths:
                if p not in run:
                    skipped.setdefault(p, []).append(n)
            for p in run:  # warm-up, and the memory of one call
                peaks[paths.index(p), j] = peak_bytes(calls[p])
            times = {p: [] for p in run}
            for r in range(repeats):
                shift = r % max(len(run), 1)
                for p in run[shift:] + run[:shift]:
                    times[p].append(_timed(calls[p]))
            for p in run:
                seconds[paths.index(p), j] = statistics.median(times[p])
            if log is not None:
                log(f"n={n}: " + ", ".join(f"{p} {seconds[paths.index(p), j] * 1e3:.1f} ms" for p in run))


def _timed(fn) -> float:
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    del out
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/attention_cost")
    parser.add_argument("--quick", action="store_true", help="n up to 512, one timed round")
    args = parser.parse_args(argv)
    result = attention_cost(quick=args.quick, threads=1, log=print)
    print(result.headline())
    print("wrote", result.save(args.out))


if __name__ == "__main__":
    main()
