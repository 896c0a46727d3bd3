"""Attribution patching with the source run inside the graph's forward, against a separate forward.

    python benchmarks/attribution_merge.py

SmolLM2, the 14-token IOI pair of benchmarks/patching.py, resid_pre x (layer, pos). Interleaved,
medians of 9. Also the forward at batch 1 and batch 2, which is why merging pays on a CPU.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    torch.set_grad_enabled(False)
    import models
    import interp.patching.attribution as attribution
    from interp.patching import attribution_patch, logit_diff

    model = models.load("smollm2-135m")
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    metric = logit_diff(model.to_single_token(" Mary"), model.to_single_token(" John"))
    default = attribution.MERGE_TOKENS

    def attr(merge):
        attribution.MERGE_TOKENS = default if merge else 0
        return attribution_patch(model, clean, corrupted, kind="resid_pre", by="layer_pos", metric=metric)

    runs = {"forward, batch 1": lambda: model(clean), "forward, batch 2": lambda: model(torch.cat([clean, corrupted])),
            "attribution, separate source forward": lambda: attr(False),
            "attribution, source in the graph forward": lambda: attr(True)}
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for r in range(9):
        for k in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            start = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - start)
    attribution.MERGE_TOKENS = default
    diff = float((attr(True).per_prompt - attr(False).per_prompt).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SmolLM2, {clean.shape[1]}-token IOI pair, {torch.get_num_threads()} threads, medians of 9")
    for k, v in med.items():
        print(f"  {k:<44} {1000 * v:7.1f} ms")
    print(f"  batch 2 / batch 1: {med['forward, batch 2'] / med['forward, batch 1']:.2f}; merged / separate: "
          f"{med['attribution, source in the graph forward'] / med['attribution, separate source forward']:.2f}; "
          f"max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
