"""Activation patching on SmolLM2 with an IOI pair: our engine against a naive loop and TransformerLens.

    python benchmarks/patching.py [--no-tl] [--naive-heads N]

Two sweeps, denoising (clean activations into the corrupted run), metric = logit
difference " Mary" - " John" at the last position:
  head out x position   every head's z at every position (30 x 9 x 14 = 3,780 cells)
  resid_pre x (layer, position)   (30 x 14 = 420 cells)
each by
  ours         interp.patching.activation_patch (resumed, packed rows)
  naive        one forward per cell on our model with a hook (torch.no_grad)
  tl 4.3       transformer_lens.patching.get_act_patch_* on a TransformerBridge of the same checkpoint
  attribution  interp.patching.attribution_patch (2 runs forwarded, 1 backward; median of 5 calls)
and prints wall time, forwards and the max |difference| to our values. `--naive-heads N`
times the naive head sweep on its first N layers and extrapolates (it is printed as such).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def naive_sweep(model, clean, corrupted, kind, layers, heads, n_pos, correct, wrong):
    """One forward of the corrupted prompt per cell, the clean activation written in by a hook."""
    from interp.patching.sites import hook_name

    names = [hook_name(kind, layer) for layer in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names)
        out = torch.zeros(len(layers), heads or 1, n_pos)
        forwards = 0
        for li, layer in enumerate(layers):
            name = hook_name(kind, layer)
            for h in range(heads or 1):
                for p in range(n_pos):
                    def patch(t, hook, h=h, p=p):
                        t = t.clone()
                        if heads:
                            t[:, p, h] = cache[name][:, p, h]
                        else:
                            t[:, p] = cache[name][:, p]
                        return t

                    logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
                    out[li, h, p] = logits[0, -1, correct] - logits[0, -1, wrong]
                    forwards += 1
    return (out if heads else out[:, 0]), forwards


REPEATS = 5


def median_time(fn):
    """Median wall time of REPEATS calls (after one warm-up) and the last call's value."""
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[REPEATS // 2], value


def tl_bridge():
    from transformers import AutoModelForCausalLM
    from transformer_lens.model_bridge import TransformerBridge

    import models
    from models.registry import resolve

    directory = resolve("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tok = models.load("smollm2-135m").tokenizer
    return TransformerBridge.boot_transformers(str(directory), hf_model=hf, tokenizer=tok, device="cpu",
                                               dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-tl", action="store_true", help="skip TransformerLens (its head sweep takes ~17 min)")
    parser.add_argument("--naive-heads", type=int, default=None, help="time the naive head sweep on N layers only")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    import models
    from interp.patching import activation_patch, attribution_patch, attribution_sweeps, compare, logit_diff

    model = models.load("smollm2-135m")
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    n_pos, L, H = clean.shape[1], model.cfg.n_layers, model.cfg.n_heads
    correct, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")
    metric = logit_diff(correct, wrong)
    print(f"SmolLM2-135M, {n_pos}-token IOI pair, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []

    def row(sweep, method, seconds, forwards, values, ref, note=""):
        diff = "" if ref is None else f"{float((values - ref).abs().max()):.2e}"
        rows.append((sweep, method, seconds, forwards, diff, note))
        print(f"  {sweep:<22} {method:<12} {seconds:8.2f} s  {forwards:6d} forwards  max|diff| {diff:>9} {note}",
              flush=True)

    sweeps = {"head out x pos": ("z", "head_pos", H), "resid_pre x (layer,pos)": ("resid_pre", "layer_pos", 0)}
    ours = {}
    for sweep, (kind, by, heads) in sweeps.items():
        activation_patch(model, clean, corrupted, kind=kind, by=by, metric=metric, layers=[0], progress=False)  # warm
        start = time.perf_counter()
        res = activation_patch(model, clean, corrupted, kind=kind, by=by, metric=metric, progress=False)
        ours[sweep] = res
        row(sweep, "ours", time.perf_counter() - start, res.forwards, res.mean, None,
            f"({res.extra['rows']} patched rows)")

        layers = list(range(L)) if (not heads or args.naive_heads is None) else list(range(args.naive_heads))
        start = time.perf_counter()
        values, forwards = naive_sweep(model, clean, corrupted, kind, layers, heads, n_pos, correct, wrong)
        seconds = time.perf_counter() - start
        ref = res.mean[: len(layers)]
        note = ""
        if len(layers) < L:
            seconds, forwards, note = seconds * L / len(layers), forwards * L // len(layers), \
                f"(extrapolated from {len(layers)} layers)"
        row(sweep, "naive", seconds, forwards, values, ref, note)

        seconds, approx = median_time(lambda: attribution_patch(model, clean, corrupted, kind=kind, by=by,
                                                                metric=metric))
        agree = compare(res, approx)
        row(sweep, "attribution", seconds, 2, approx.mean, res.mean,
            f"(median of {REPEATS}; exact / attribution = {res.seconds / seconds:.0f}x; 1 backward; an estimate: "
            f"pearson {agree['pearson']:.3f}, top-10 {agree['top_k']:.1f} with exact)")

    seconds, _ = median_time(lambda: attribution_sweeps(model, clean, corrupted,
                                                        sweeps=[v[:2] for v in sweeps.values()], metric=metric))
    exact = sum(r.seconds for r in ours.values())
    print(f"  attribution for both sweeps from one pass: {seconds:.2f} s (median of {REPEATS}); "
          f"exact both: {exact:.1f} s = {exact / seconds:.0f}x", flush=True)

    if not args.no_tl:
        import transformer_lens.patching as tlp

        bridge = tl_bridge()

        def tl_metric(logits):
            return logits[0, -1, correct] - logits[0, -1, wrong]

        _, clean_cache = bridge.run_with_cache(clean)
        calls = {"head out x pos": tlp.get_act_patch_attn_head_out_by_pos, "resid_pre x (layer,pos)": tlp.get_act_patch_resid_pre}
        for sweep, fn in calls.items():
            counter = {"n": 0}
            run_with_hooks = bridge.run_with_hooks

            def counted(*a, **kw):  # TL's patching runs every patched forward through run_with_hooks
                counter["n"] += 1
                return run_with_hooks(*a, **kw)

            bridge.run_with_hooks = counted
            start = time.perf_counter()
            values = fn(bridge, corrupted, clean_cache, tl_metric)
            seconds = time.perf_counter() - start
            del bridge.run_with_hooks
            if values.dim() == 3:  # TL: [layer, pos, head]
                values = values.permute(0, 2, 1)
            row(sweep, "tl 4.3", seconds, counter["n"], values, ours[sweep].mean)

    print("\n| sweep | method | wall s | forwards | max abs diff vs ours | time / ours | note |")
    print("|---|---|---|---|---|---|---|")
    base = {s: t for s, m, t, *_ in rows if m == "ours"}
    for sweep, method, seconds, forwards, diff, note in rows:
        ratio = seconds / base[sweep]
        print(f"| {sweep} | {method} | {seconds:.2f} | {forwards} | {diff or '-'} | {ratio:.3f} | {note} |")


if __name__ == "__main__":
    main()
