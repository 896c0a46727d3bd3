"""Caching attention patterns: the fused kernel with a read-only pattern hook against the no-hook forward (issue 17).

    python benchmarks/patterns.py                    # CPU: a small LLaMA-like shape, float32, seconds
    python benchmarks/patterns.py --device cuda      # LLaMA-3.2-1B's shape, bfloat16, 8 x 512 tokens

Times, interleaved round by round (benchmarks/random_model.py):

    forward                  no hooks (the fused kernel)
    cache patterns           run_with_cache of every hook_pattern: the fused kernel computes the output and one
                             q.k -> mask -> softmax pass the pattern (models/attention.py, Attention._pattern)
    cache patterns explicit  the same under set_attention_implementation("explicit"): pattern @ V instead of
                             the fused kernel (before issue 17 every cached pattern took this path, then with
                             a pattern pass of 26 bytes per [q, k] entry; now 10)
    cache all but patterns   every default hook point except hook_pattern and hook_attn_scores

and prints medians, each configuration's median ratio to the forward of the same round, the peak GPU memory
of one call and the size of the cache. Goal: cache patterns <= 1.3x forward on an H100.

Then checks, bit for bit: the cached-pattern run's logits equal the no-hook forward's; each layer's cached
pattern equals the explicit path's for that layer (that layer explicit, the others fused, so it reads the same
stream; a whole explicit run rounds every attention output differently, which moves later layers' inputs, and
is compared at layer 0 only); and it says whether, on this device, the half-precision softmax the pattern
pass uses equals transformers' float32-then-round formula (informational: the pattern pass is shared with
the explicit path, so the equalities above hold either way).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import build, describe, gib, interleaved, paired_ratio, parser, peak_gib, resolve  # noqa: E402

SCORES = ("hook_pattern", "hook_attn_scores")


def patterns(name: str) -> bool:
    return name.endswith("hook_pattern")


def explicit(model, fn):
    """fn() with every attention on the explicit path."""
    model.set_attention_implementation("explicit")
    try:
        return fn()
    finally:
        model.set_attention_implementation("auto")


def configurations(model, tokens) -> dict:
    def all_but_patterns(name: str) -> bool:
        return not name.endswith(SCORES + tuple(model.opt_in_hooks))

    return {
        "forward": lambda: model(tokens),
        "cache patterns": lambda: model.run_with_cache(tokens, names_filter=patterns),
        "cache patterns explicit": lambda: explicit(model, lambda: model.run_with_cache(tokens, names_filter=patterns)),
        "cache all but patterns": lambda: model.run_with_cache(tokens, names_filter=all_but_patterns),
    }


def check(model, tokens) -> list[tuple[str, bool, str]]:
    """(what, passed, detail) for each equality the fast path promises."""
    out = []
    plain = model(tokens)
    logits, fast = model.run_with_cache(tokens, names_filter=patterns)
    out.append(("logits of the cached-pattern run == no-hook logits", torch.equal(logits, plain),
                f"max |diff| {(logits.float() - plain.float()).abs().max().item():.3g}"))
    del logits, plain
    equal = 0
    first_bad = ""
    for layer, block in enumerate(model.blocks):
        name = f"blocks.{layer}.attn.hook_pattern"
        block.attn.implementation = "explicit"
        try:
            _, slow = model.run_with_cache(tokens, names_filter=name)
        finally:
            block.attn.implementation = "auto"
        if torch.equal(fast[name], slow[name]):
            equal += 1
        elif not first_bad:
            worst = (fast[name] - slow[name]).abs().max().item()
            first_bad = f"; first differing layer {layer}: max |diff| {worst:.3g}"
        del slow
    n = len(model.blocks)
    out.append(("cached patterns == explicit path's, layer by layer", equal == n, f"{equal}/{n} layers{first_bad}"))
    _, whole = explicit(model, lambda: model.run_with_cache(tokens, names_filter=patterns))
    diffs = [(fast[n] - whole[n]).abs().max().item() for n in fast]
    out.append(("layer 0 == a whole explicit run's layer 0", torch.equal(fast["pattern", 0], whole["pattern", 0]),
                f"later layers differ by up to {max(diffs):.3g} (their inputs differ)"))
    del whole, fast
    if model.cfg.dtype in (torch.float16, torch.bfloat16):
        _, cache = explicit(model, lambda: model.run_with_cache(tokens, names_filter=lambda n: n.startswith(
            "blocks.0.attn.") and n.endswith(SCORES)))
        reference = F.softmax(cache["attn_scores", 0], dim=-1, dtype=torch.float32).to(model.cfg.dtype)
        differ = (reference != cache["pattern", 0]).sum().item()
        largest = (reference.float() - cache["pattern", 0].float()).abs().max().item()
        out.append(("(info) layer 0: half-precision softmax == float32-then-round", differ == 0,
                    f"{differ} of {reference.numel()} entries differ, by up to {largest:.3g}"))
    return out


def main() -> None:
    args = resolve(parser(__doc__.splitlines()[0]).parse_args())
    model, tokens = build(args)
    print(describe(args))
    calls = configurations(model, tokens)
    times = interleaved(calls, args.device, args.rounds)
    sizes = {}
    for name, fn in calls.items():
        out = fn()
        sizes[name] = out[1].nbytes if isinstance(out, tuple) else 0
        del out
    print(f"\n{'configuration':<26}{'median ms':>11}{'vs forward':>12}{'peak GPU':>11}{'cache':>12}")
    for name, fn in calls.items():
        ratio = paired_ratio(times, name, "forward")
        peak = peak_gib(fn, args.device)
        print(f"{name:<26}{statistics.median(times[name]) * 1e3:>11.2f}{ratio:>11.2f}x"
              f"{'-' if peak != peak else f'{peak:.1f} GiB':>11}{gib(sizes[name]) if sizes[name] else '-':>12}")
    ratio = paired_ratio(times, "cache patterns", "forward")
    verdict = "met" if ratio <= 1.3 else "NOT met"
    print(f"\ngoal cache patterns <= 1.30x forward: {ratio:.2f}x, {verdict}"
          + ("" if args.device.type == "cuda" else " (the goal is for an H100; the CPU run only exercises the code)"))
    print()
    failed = False
    for what, passed, detail in check(model, tokens):
        print(f"{'ok  ' if passed else 'FAIL'} {what}: {detail}")
        failed |= not passed and not what.startswith("(info)")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
