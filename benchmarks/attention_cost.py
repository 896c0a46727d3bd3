"""Attention's cost against sequence length: the fused and explicit paths (and cached patterns), with fitted exponents.

    python benchmarks/attention_cost.py                          # SmolLM2-135M's layer shape, 2 layers, n 64-16384, CPU
    python benchmarks/attention_cost.py --json cost.json --figure cost.svg
    python benchmarks/attention_cost.py --layers 30 --lengths 128 512 2048 --threads 2

A random-weight model of SmolLM2-135M's shape (d_model 576, 9 query / 3 KV heads of 64, SwiGLU 1536, rotary;
`analyses.attention_cost.smollm2_shape`), float32, batch 1, forward without the unembedding. For each length it
measures (analyses/attention_cost.py):

    fused            no hooks: F.scaled_dot_product_attention (the baseline of the ratio columns)
    explicit         set_attention_implementation("explicit"): softmax(q k^T) @ v, the pattern materialised
    fused+patterns   run_with_cache of every hook_pattern: the fused kernel plus the pattern, kept in the cache

the median forward time over --repeats rounds (paths interleaved within a round) and the peak bytes of the
tensors the forward allocates (counted op by op, `LiveBytes`). A path whose n^2 buffers would pass
--memory-limit-gib is left out at that length. Then, per path and for time and memory: the log-log slope over
the longer half of its lengths, the non-negative least-squares fit c + a n + b n^2, and n* = a / b, where the
quadratic term overtakes the linear one on this machine; and the FLOP count's n* for comparison.

One thread by default: on a machine shared with other work, two threads that wait on each other at every
op's barrier turn a 20 ms forward into 800 ms; pass --threads to use more on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

import torch  # noqa: E402

from analyses.attention_cost import PATHS, attention_cost, smollm2_shape  # noqa: E402

LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def fmt_n(v: float) -> str:
    return "none" if not math.isfinite(v) else f"{v:,.0f}"


def mib(v: float) -> str:
    return "-" if v != v else f"{v / 2**20:.1f}"


def ms(v: float) -> str:
    return "-" if v != v else f"{v * 1e3:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="how many of SmolLM2's 30 layers (n* does not depend on it)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-limit-gib", type=float, default=4.0)
    p.add_argument("--json", help="write the result's numbers here")
    p.add_argument("--figure", help="write the log-log figure here (.svg, .png, .pdf)")
    args = p.parse_args()

    cfg = smollm2_shape(n_layers=args.layers, n_ctx=max(max(args.lengths), 8192))
    print(f"{cpu_name()}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"SmolLM2-135M shape, random weights: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads "
          f"({cfg.n_kv_heads} KV) of {cfg.d_head}, SwiGLU {cfg.d_mlp}, float32, batch {args.batch}; forward without "
          f"the unembedding; median of {args.repeats}; n^2 buffers capped at {args.memory_limit_gib:g} GiB\n")
    result = attention_cost(cfg, args.lengths, paths=tuple(args.paths), batch=args.batch, repeats=args.repeats,
                            memory_limit=args.memory_limit_gib * 2**30, threads=args.threads,
                            log=lambda line: print("  " + line, flush=True))
    paths = result.paths
    short = {"fused": "fused", "explicit": "explicit", "fused+patterns": "+patterns"}
    base = paths.index("fused") if "fused" in paths else None
    ratios = [i for i, p in enumerate(paths) if p != "fused"] if base is not None else []
    print(f"\n{'':>6}{'median ms':^{11 * len(paths)}}{'peak MiB':^{11 * len(paths)}}"
          + (f"{'vs fused':^{11 * len(ratios)}}" if ratios else ""))
    names = "".join(f"{short[p]:>11}" for p in paths)
    print(f"{'n':>6}" + names * 2 + "".join(f"{short[paths[i]]:>11}" for i in ratios))
    for j, n in enumerate(result.lengths):
        row = f"{n:>6}" + "".join(f"{ms(float(result.seconds[i, j])):>11}" for i in range(len(paths)))
        row += "".join(f"{mib(float(result.peak_bytes[i, j])):>11}" for i in range(len(paths)))
        for i in ratios:
            ratio = float(result.seconds[i, j] / result.seconds[base, j])
            row += f"{'-' if ratio != ratio else f'{ratio:.2f}x':>11}"
        print(row)

    print(f"\n{'path':<16}{'of':<8}{'exponent':>9}{'over n >=':>11}{'a (per n)':>12}{'b (per n^2)':>13}"
          f"{'n* = a/b':>10}")
    for path in paths:
        for what, fits, unit in (("time", result.time_fits, 1.0), ("memory", result.memory_fits, 1.0)):
            if path not in fits:
                print(f"{path:<16}{what:<8}  fewer than 3 lengths measured")
                continue
            f = fits[path]
            print(f"{path:<16}{what:<8}{f.exponent:>9.2f}{f.fit_from:>11}{f.linear * unit:>12.3g}"
                  f"{f.quadratic * unit:>13.3g}{fmt_n(f.crossover):>10}")
    a, b = result.flops_linear, result.flops_quadratic
    print(f"\nFLOP count: {a:.3g} n (weights) + {b:.3g} n^2 (q k^T and pattern @ v, full square): the quadratic "
          f"term overtakes at n = {fmt_n(a / b)} (full square), {fmt_n(2 * a / b)} (a causal kernel that skips "
          "the masked half)")
    for path, lengths in result.skipped.items():
        print(f"left out: {path} at n = {', '.join(map(str, lengths))} (n^2 buffers over the memory limit)")
    print("\nfitted exponents: " + "; ".join(
        f"{p} time n^{result.time_fits[p].exponent:.2f}, memory n^{result.memory_fits[p].exponent:.2f}"
        for p in paths if p in result.time_fits))
    print("where the quadratic term takes over on this machine (time): " + "; ".join(
        f"{p} n* = {fmt_n(result.time_fits[p].crossover)}" for p in paths if p in result.time_fits))
    print("... and in memory: " + "; ".join(
        f"{p} n* = {fmt_n(result.memory_fits[p].crossover)}" for p in paths if p in result.memory_fits))
    print(f"({result.seconds_total:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
        print("wrote", args.json)
    if args.figure:
        result.plot().savefig(args.figure)
        print("wrote", args.figure)


if __name__ == "__main__":
    main()
