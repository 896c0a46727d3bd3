"""Offloading a large cache: run_with_cache(device="cpu") against the forward and a raw pinned copy (issue 17).

    python benchmarks/offload.py                  # CPU: small shape (there the host path is a plain .to())
    python benchmarks/offload.py --device cuda    # LLaMA-3.2-1B's shape, bfloat16, 8 x 512 tokens: a ~9.6 GB cache

Times (the first four interleaved round by round, benchmarks/random_model.py):

    forward             no hooks
    cache on device     run_with_cache(): every default hook point, kept where the model runs (what is offloaded)
    offload             run_with_cache(device="cpu"): pinned host buffers filled by a side stream while the
                        forward goes on, one wait at the end (interp/offload.py), on pinned memory an earlier
                        call gave back (PyTorch's host allocator keeps it)
    offload, 1st call   the same before any pinned memory exists (cudaHostAlloc of the whole cache)
    raw pinned copy     the cache's bytes as one GPU buffer copied into one preallocated pinned buffer: the
                        copy engine's rate, the floor for any offload
    old: sync copies    get_caching_hooks(device="cpu") + run_with_hooks: a blocking .to("cpu") into
                        ordinary memory per tensor, as run_with_cache did before issue 17 (--old-rounds)

and prints medians, ratios, effective GB/s and the peak GPU memory of one call. Goal: offload <=
forward + 1.2 x raw pinned copy. Then checks that every offloaded tensor equals the GPU cache's bit for
bit and is pinned. GPU memory: about 2x the cache plus the model; host memory: about 3.5x the cache (the
offloaded copies, the raw buffer rounded up to a power of two, the old path's copies).
"""

from __future__ import annotations

import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import build, describe, gib, interleaved, parser, peak_gib, resolve, sync, timed  # noqa: E402


def old_offload(model, tokens):
    """Before issue 17: each hook copies its tensor to the host and waits (get_caching_hooks alone still does)."""
    cache, fwd, _ = model.get_caching_hooks(device="cpu")
    return model.run_with_hooks(tokens, fwd_hooks=fwd), cache


def raw_copy_seconds(nbytes: int, device: torch.device, rounds: int) -> float:
    """Median seconds to copy nbytes from one device buffer into one preallocated (pinned) host buffer."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    timed(lambda: target.copy_(source, non_blocking=True), device)  # warm-up
    return statistics.median(timed(lambda: target.copy_(source, non_blocking=True), device) for _ in range(rounds))


def check(model, tokens, device: torch.device) -> list[tuple[str, bool, str]]:
    _, on_gpu = model.run_with_cache(tokens)
    _, host = model.run_with_cache(tokens, device="cpu")
    sync(device)
    equal = sum(torch.equal(host[n], on_gpu[n].cpu()) for n in on_gpu)
    out = [("offloaded == the cache kept on the device, tensor by tensor", equal == len(on_gpu) and set(host) == set(on_gpu),
            f"{equal}/{len(on_gpu)}")]
    if device.type == "cuda":
        pinned = sum(t.is_pinned() for t in host.values())
        out.append(("offloaded tensors are pinned", pinned == len(host), f"{pinned}/{len(host)}"))
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--old-rounds", type=int, default=1, help="calls of the old path (0: skip; ~8 s each on an H100)")
    args = resolve(p.parse_args())
    model, tokens = build(args)
    print(describe(args))

    first = timed(lambda: model.run_with_cache(tokens, device="cpu"), args.device)
    _, cache = model.run_with_cache(tokens)
    nbytes, n_tensors = cache.nbytes, len(cache)
    del cache
    gc.collect()  # the cache's pinned blocks go back to the host allocator before the timed calls

    calls = {
        "forward": lambda: model(tokens),
        "cache on device": lambda: model.run_with_cache(tokens),
        "offload": lambda: model.run_with_cache(tokens, device="cpu"),
    }
    times = interleaved(calls, args.device, args.rounds)
    median = {name: statistics.median(t) for name, t in times.items()}
    median["offload, 1st call"] = first
    median["raw pinned copy"] = raw_copy_seconds(nbytes, args.device, args.rounds)
    release = getattr(torch._C, "_host_emptyCache", None)
    if args.device.type == "cuda" and release is not None:
        release()  # the raw buffer's pinned block (the cache's size, rounded up to a power of two) is not reused
    if args.old_rounds:
        median["old: sync copies"] = statistics.median(
            timed(lambda: old_offload(model, tokens), args.device) for _ in range(args.old_rounds))
    peaks = {name: peak_gib(fn, args.device) for name, fn in calls.items()}

    print(f"cache: {n_tensors} tensors, {gib(nbytes)} (default hook points, unique storage)\n")
    print(f"{'configuration':<20}{'median s':>10}{'vs forward':>12}{'GB/s':>8}{'peak GPU':>11}")
    for name, seconds in median.items():
        moves = name not in ("forward", "cache on device")
        rate = f"{nbytes / seconds / 1e9:.1f}" if moves else "-"
        peak = peaks.get(name, float("nan"))
        print(f"{name:<20}{seconds:>10.3f}{seconds / median['forward']:>11.1f}x{rate:>8}"
              f"{'-' if peak != peak else f'{peak:.1f} GiB':>11}")
    budget = median["forward"] + 1.2 * median["raw pinned copy"]
    verdict = "met" if median["offload"] <= budget else "NOT met"
    print(f"\ngoal offload <= forward + 1.2 x raw copy = {budget:.3f} s: {median['offload']:.3f} s, {verdict}"
          + ("" if args.device.type == "cuda" else " (on the CPU nothing is copied; the goal is for a GPU)"))
    print()
    failed = False
    for what, passed, detail in check(model, tokens, args.device):
        print(f"{'ok  ' if passed else 'FAIL'} {what}: {detail}")
        failed |= not passed
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
