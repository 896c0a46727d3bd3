"""Forward-pass cost on SmolLM2-135M: ours against plain `transformers` and TransformerLens 4.3.

    python benchmarks/forward.py [--batches 1 8] [--seq 64] [--repeats 9] [--no-tl]

For each batch size (64-token prompts) it times, interleaved round by round (order
reversed every other round) so that machine noise hits every configuration alike:

    hf                plain transformers forward, sdpa attention, under torch.no_grad()  (the baseline)
    ours              HookedTransformer forward, no hooks
    ours cache all    run_with_cache() of every hook point (patterns included; per-head results
                      are opt-in and computed from z on demand, as TransformerLens leaves them out)
    ours cache resid  run_with_cache of resid_pre/mid/post only
    ours cache +result  every hook point and the per-head results [batch, pos, head, d_model] too
    tl bridge         TransformerLens 4.3 TransformerBridge forward, called as its docs show
    tl bridge cache   TransformerBridge.run_with_cache of everything

and prints the median time, its interquartile range, the ratio to the baseline, the
peak memory a call adds (RSS sampled every millisecond, each configuration in a fresh
process after one warm-up call, with glibc's mmap threshold fixed so RSS follows live
tensors) and the size of the cache: unique storage, and the naive sum that would count
a tensor stored under two names twice.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CONFIGS = ["hf", "ours", "ours cache all", "ours cache resid", "ours cache +result", "tl bridge", "tl bridge cache"]
RESID = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def build(configs, with_tl: bool):
    """Callables for each configuration, sharing one copy of the weights where the libraries allow."""
    from transformers import AutoModelForCausalLM

    import models
    from models.registry import resolve

    directory = resolve("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = models.load("smollm2-135m")
    calls = {}

    def hf_call(x):
        with torch.no_grad():
            return hf(x, use_cache=False).logits, None

    calls["hf"] = hf_call
    calls["ours"] = lambda x: (ours(x), None)
    calls["ours cache all"] = lambda x: ours.run_with_cache(x)
    calls["ours cache resid"] = lambda x: ours.run_with_cache(x, names_filter=lambda n: n.endswith(RESID))
    calls["ours cache +result"] = lambda x: ours.run_with_cache(x, names_filter=lambda n: True)
    if with_tl and any(c.startswith("tl") for c in configs):
        from transformer_lens.model_bridge import TransformerBridge

        tl_hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        bridge = TransformerBridge.boot_transformers(str(directory), hf_model=tl_hf,
                                                     tokenizer=getattr(ours.tokenizer, "transformers_tokenizer", ours.tokenizer),
                                                     device="cpu", dtype=torch.float32)
        calls["tl bridge"] = lambda x: (bridge(x), None)
        calls["tl bridge cache"] = lambda x: bridge.run_with_cache(x)
    return {c: calls[c] for c in configs if c in calls}


def cache_sizes(cache) -> tuple[float, float]:
    if cache is None:
        return 0.0, 0.0
    tensors = list(getattr(cache, "cache_dict", cache).values())
    naive = sum(t.numel() * t.element_size() for t in tensors)
    unique = {}
    for t in tensors:
        s = t.untyped_storage()
        unique[s.data_ptr()] = max(unique.get(s.data_ptr(), 0), s.nbytes())
    return sum(unique.values()) / 2**20, naive / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_during(fn) -> tuple[float, object]:
    """Peak RSS growth (MiB) while fn runs, sampled every millisecond."""
    gc.collect()
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss_mb())
    return peak[0] - base, out


def child(config: str, batch: int, seq: int) -> None:
    calls = build([config], with_tl=True)
    x = torch.randint(100, 40000, (batch, seq), generator=torch.Generator().manual_seed(0))
    warm = calls[config](x)
    del warm
    added, out = peak_during(lambda: calls[config](x))
    unique, naive = cache_sizes(out[1])
    print(json.dumps({"peak_mb": added, "cache_mb": unique, "cache_naive_mb": naive, "n_cached": 0 if out[1] is None
                      else len(getattr(out[1], "cache_dict", out[1]))}))


def memory(config: str, batch: int, seq: int) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--batches", str(batch), "--seq", str(seq)]
    # Fixed glibc thresholds: every large allocation is mapped and unmapped, so RSS follows
    # live tensors instead of whatever the allocator kept from the warm-up call.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batches[0], args.seq)
        return

    configs = [c for c in CONFIGS if not (args.no_tl and c.startswith("tl"))]
    calls = build(configs, with_tl=not args.no_tl)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M float32; "
          f"{args.seq}-token prompts; median of {args.repeats} interleaved rounds")
    for batch in args.batches:
        x = torch.randint(100, 40000, (batch, args.seq), generator=torch.Generator().manual_seed(batch))
        for fn in calls.values():  # warm-up: first-call allocations and kernel selection
            fn(x)
        times = {c: [] for c in calls}
        order = list(calls.items())
        # Small batches are noisy here (quartiles +-10% apart on 2 cores): more rounds.
        rounds = args.repeats * max(1, 8 // batch) // 2 * 2 + 1 if batch < 8 else args.repeats
        for r in range(rounds):
            for c, fn in order if r % 2 == 0 else order[::-1]:
                gc.collect()
                start = time.perf_counter()
                out = fn(x)
                times[c].append(time.perf_counter() - start)
                del out
        base = statistics.median(times["hf"])
        print(f"\nbatch {batch} x {args.seq} tokens, {rounds} rounds")
        print(f"{'configuration':<18} {'median ms':>10} {'IQR %':>6} {'x plain':>8} {'peak +MiB':>10} {'cache MiB':>10} "
              f"{'naive sum':>10} {'tensors':>8}")
        for c in calls:
            med = statistics.median(times[c])
            q = statistics.quantiles(times[c], n=4)
            iqr = (q[2] - q[0]) / med * 100
            mem = {} if args.no_memory else memory(c, batch, args.seq)
            if "error" in mem:
                mem_cols = f"{'error: ' + mem['error'][:40]:>40}"
            elif mem:
                mem_cols = (f"{mem['peak_mb']:>10.0f} {mem['cache_mb']:>10.1f} {mem['cache_naive_mb']:>10.1f} "
                            f"{mem['n_cached']:>8d}")
            else:
                mem_cols = ""
            print(f"{c:<18} {med * 1000:>10.1f} {iqr:>6.1f} {med / base:>8.3f} {mem_cols}", flush=True)


if __name__ == "__main__":
    main()
