"""`collect_activations` throughput against the plain forward over the same batches, on CPU.

    python benchmarks/collect.py [--rounds 7] [--sequences 64] [--hooks blocks.5.hook_resid_post]

SmolLM2-135M, the bundled Wikipedia corpus packed into 128-token sequences, batches of 8.
Interleaved rounds (order reversed every other round); the best round of each, the median, and CPU seconds:
  plain    model(tokens, stop_at_layer=deepest hook + 1, return_type=None), no hooks, over the packed batches
  collect  the whole collect_activations call into an empty folder: tokenising and packing, the hooks'
           copies, the shards written (a background thread, fsync'd) and the manifest
The goal is collect >= 0.9x plain tokens/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-mb", type=float, default=16.0, help="small, so a short run still writes a shard "
                                                                     "while computing the next")
    parser.add_argument("--hooks", nargs="+", default=["blocks.5.hook_resid_post", "blocks.5.hook_mlp_out"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    import models
    from interp.collect import collect_activations, default_corpus
    from interp.collect.run import resolve_hooks, stop_layer

    model = models.load("smollm2-135m")
    corpus = default_corpus()
    stop = stop_layer(model, resolve_hooks(model, args.hooks))
    root = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    options = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_sequences=args.sequences,
                   shard_bytes=int(args.shard_mb * 2**20), progress=False)
    try:
        ds = collect_activations(model, corpus, args.hooks, root / "warm", **options)
        batches = ds.tokens().split(args.batch_size)

        def plain() -> None:
            for batch in batches:
                model(batch, stop_at_layer=stop, return_type=None)

        def collect() -> None:
            out = root / "run"
            shutil.rmtree(out, ignore_errors=True)
            collect_activations(model, corpus, args.hooks, out, **options)

        runs = {"plain forward": plain, "collect_activations": collect}
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        plain()
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                start, start_cpu = time.perf_counter(), time.process_time()
                runs[name]()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        shards = len(ds.shards)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_tokens = args.sequences * args.seq_len
    print(f"SmolLM2-135M on CPU ({torch.get_num_threads()} threads), {args.sequences} sequences x {args.seq_len} "
          f"tokens, batch {args.batch_size}, stop_at_layer={stop}, hooks {args.hooks}, {shards} shards, "
          f"{args.rounds} rounds")
    # Other processes on a small machine slow either side at random, by up to 5x here: the best of the
    # interleaved rounds is the least disturbed, and CPU seconds (every thread of this process) barely move.
    best = {k: min(v) for k, v in times.items()}
    print("| run | best s | median s | CPU s (median) | tokens/s (best) | x plain (best) | x plain (CPU) |\n"
          "|---|---|---|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {best[name]:.2f} | {statistics.median(values):.2f} | {statistics.median(cpu[name]):.2f} | "
              f"{n_tokens / best[name]:,.0f} | {best['plain forward'] / best[name]:.3f} | "
              f"{statistics.median(cpu['plain forward']) / statistics.median(cpu[name]):.3f} |")


if __name__ == "__main__":
    main()
