"""Per-layer sense probes of the "mole" study on SmolLM2: batched span-Newton against one L-BFGS per fit.

    python benchmarks/shift_probes.py

Both solve the same L2-regularised logistic regressions (every layer, real and control labels,
4 folds = 248 fits) on the same folds; the script prints both times, the ratio, and whether
the per-layer accuracies agree.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    torch.set_grad_enabled(False)
    import models
    from analyses.shift_data import STUDIES, flatten
    from interp.probing.linear import fit_logistic_regression
    from interp.shift import probe_accuracy, trace_word
    from interp.shift.senses import control_labels

    spec = STUDIES["mole"]
    contexts, labels = flatten(spec["senses"])
    model = models.load("smollm2-135m")
    trace = trace_word(model, spec["word"], contexts, labels)
    probe_accuracy(trace)  # warm-up (first-call costs of linalg)
    start = time.perf_counter()
    batched = probe_accuracy(trace, folds=4, seed=0)
    t_batched = time.perf_counter() - start

    # The same folds and control labels, rebuilt as probe_accuracy builds them, one primal fit each.
    y = trace.label_index()
    g = torch.Generator().manual_seed(0)
    fold_of = torch.empty(len(y), dtype=torch.long)
    for c in range(int(y.max()) + 1):
        members = (y == c).nonzero()[:, 0]
        fold_of[members[torch.randperm(len(members), generator=g)]] = torch.arange(len(members)) % 4
    y_control = control_labels(y, g)
    fit_logistic_regression(trace.vectors[:4, 1].double(), y[:4] % 2, 2)  # warm-up
    start = time.perf_counter()
    acc = torch.zeros(2, trace.vectors.shape[1])
    for layer in range(trace.vectors.shape[1]):
        X = trace.vectors[:, layer].double()
        for k, target in enumerate((y, y_control)):
            for f in range(4):
                test = fold_of == f
                probe = fit_logistic_regression(X[~test], target[~test], int(y.max()) + 1)
                acc[k, layer] += int((probe.predict(X[test]) == target[test]).sum())
    t_loop = time.perf_counter() - start
    acc /= len(y)
    same = torch.equal(acc[0], batched.accuracy) and torch.equal(acc[1], batched.control)
    print(f"SmolLM2 'mole', {len(y)} contexts, {trace.vectors.shape[1]} layers x 2 label sets x 4 folds = "
          f"{trace.vectors.shape[1] * 8} fits, {torch.get_num_threads()} threads")
    print(f"  batched span-Newton (probe_accuracy): {t_batched:.3f} s")
    print(f"  one primal L-BFGS per fit:            {t_loop:.2f} s  ({t_loop / t_batched:.0f}x the batched time)")
    print(f"  per-layer accuracies identical: {same}")


if __name__ == "__main__":
    main()
