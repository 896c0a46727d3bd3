"""FactoredMatrix.norm from two small products, against the singular values (QR + SVD).

    python benchmarks/factored_norm.py

Composition scores take one norm per head pair plus a 200-sample random baseline, so the
norm dominates them. Times `composition_scores(model, "K")` both ways, interleaved,
medians of 5, on attn-only-2l and SmolLM2, and the largest difference between the two
(about 11 minutes: the SVD route on SmolLM2 is the slow part).
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
    from interp import circuits
    from interp.factored_matrix import FactoredMatrix

    products = FactoredMatrix.norm

    def by_svd(self):
        return self.S.pow(2).sum(-1).sqrt()

    print(f"{torch.get_num_threads()} threads; composition_scores(model, 'K'), medians of 5, interleaved")
    print("| model | via SVD s | two products s | SVD / products | max |diff| of scores |")
    print("|---|---|---|---|---|")
    for name in ("attn-only-2l", "smollm2-135m"):
        model = models.load(name)
        times = {"svd": [], "products": []}
        results = {}
        for _ in range(5):
            for label, norm in (("svd", by_svd), ("products", products)):
                FactoredMatrix.norm = norm
                start = time.perf_counter()
                results[label] = circuits.composition_scores(model, "K")
                times[label].append(time.perf_counter() - start)
        FactoredMatrix.norm = products
        a, b = results["svd"].scores, results["products"].scores
        diff = float((a - b).nan_to_num().abs().max())
        svd, prod = statistics.median(times["svd"]), statistics.median(times["products"])
        print(f"| {name} | {svd:.3f} | {prod:.3f} | {svd / prod:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
