"""`interp.attach` on the `transformers` SmolLM2 object: the cost of attaching.

    python benchmarks/attach.py [--rounds 15]

Interleaved rounds (order reversed every other round), medians, 64-token prompt, batch 1:
  plain        the transformers model under torch.no_grad
  attached     the same through `attach(model)` with nothing hooked
  cache blocks `run_with_cache` of all 30 decoder layers' outputs
  nnsight      nnsight 0.8's `NNsight(model).trace(...)` saving the same 30 outputs (if installed:
               `pip install -c constraints.txt "nnsight>=0.8,<0.9"` leaves torch as it is; the
               project itself does not depend on it)
and the max |difference| between the two caches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    from transformers import AutoModelForCausalLM

    from interp.attach import attach
    from models.registry import resolve

    hf = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m"), dtype=torch.float32).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    hooked = attach(hf)
    names = [f"model.layers.{i}" for i in range(hf.config.num_hidden_layers)]
    runs = {"plain": lambda: hf(input_ids=ids),
            "attached, nothing hooked": lambda: hooked(input_ids=ids),
            "attached, cache 30 block outputs": lambda: hooked.run_with_cache(input_ids=ids, names_filter=names)}
    try:
        import nnsight
        from nnsight import NNsight
    except ImportError:
        nnsight = None
        print("nnsight is not installed: its row is left out")
    if nnsight is not None:
        traced = NNsight(hf)

        def nnsight_cache():
            with traced.trace(input_ids=ids):
                saved = list().save()
                for i in range(hf.config.num_hidden_layers):
                    saved.append(traced.model.layers[i].output)
            return saved

        runs[f"nnsight {nnsight.__version__} trace, save 30 block outputs"] = nnsight_cache
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for k in order:
            start = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    _, ours = runs["attached, cache 30 block outputs"]()
    if nnsight is not None:
        theirs = nnsight_cache()
        diff = max(float((ours[n] - t).abs().max()) for n, t in zip(names, theirs))
        print(f"max |ours - nnsight| over the 30 cached outputs: {diff:.1e}")
    print(f"SmolLM2-135M (transformers), 64 tokens, batch 1, {args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| configuration | median ms | x plain |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {1000 * statistics.median(v):.1f} | {statistics.median(v) / base:.3f} |")


if __name__ == "__main__":
    main()
