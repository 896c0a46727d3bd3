"""Gradient flow: does the gradient reach far positions in a transformer, and in an RNN?

    python -m analyses.gradient_flow [--out reports/gradient_flow] [--quick]

The notes this toolkit grew from claim that transformers do not suffer vanishing gradients the way
RNNs do: residual connections and attention give every position and layer a short path. Measured:

1. A long-range recall task (analyses/recall_task.py: a key token, a gap of n positions, a query where
   the key must be output), a small transformer, an LSTM and a GRU of comparable size trained here on
   the same data. At initialisation and after training, for each gap n: the gradient of the loss at the
   query w.r.t. the input embedding at the key (distance n), relative to the gradient at distance 1 of
   the same sequence (the ratio removes the loss's own scale; geometric mean over sequences), the full
   profile over distances for the longest gap, and the task accuracy by gap. The input embedding is
   where "the stream at position s" means the same thing in both architectures (interp/gradients.py).
   Gradients are taken in float64 (copies of the models), so a confident model's tiny gradients do not
   round to zero.
2. SmolLM2 and MiniLM on Wikipedia text: the gradient of a next-token (SmolLM2) or masked-token
   (MiniLM, through its tied embedding: the checkpoint has no MLM head) loss at every position w.r.t.
   the residual stream of every layer at every position, by layer and by distance, with the split of
   each layer's gradient into the residual path and the block (attention, MLP).

The claim is stated only where the numbers show it (`claim()`): "decays" means that at the longest gap
less than DECAY of the distance-1 gradient reaches the key.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analyses.recall_task import RecallTask, accuracy_by_gap, build_models, n_params, train_model

PHASES = ("init", "trained")
DECAY = 0.5  # at the longest gap, less than this share of the distance-1 gradient reaches the key: "decays"
REAL_MODELS = ("smollm2-135m", "minilm-l6")


@dataclass
class GradientFlowResult:
    task: RecallTask
    model_names: list[str]  # transformer, lstm, gru
    n_params: dict[str, int]
    ratio: torch.Tensor  # [model, phase, gap]: |g at the key (distance n)| / |g at distance 1|, geometric mean
    key_norm: torch.Tensor  # [model, phase, gap]: |g at the key|, geometric mean over sequences
    profile: torch.Tensor  # [model, phase, distance]: |g(d)| / |g(1)| over the longest gap's sequences
    accuracy: torch.Tensor  # [model, phase, gap]
    train_seconds: dict[str, float]
    final_loss: dict[str, float]
    steps: int
    real: dict = field(default_factory=dict)  # model name -> interp.gradients.ResidualGradients
    cpu: dict = field(default_factory=dict)
    seconds: float = 0.0

    def claim(self) -> dict[str, str]:
        """Per phase: whether 'the RNN's gradient decays with distance, the transformer's does not' holds."""
        out = {}
        far = max(self.task.gaps)
        for p, phase in enumerate(PHASES):
            at_far = {m: float(self.ratio[i, p, -1]) for i, m in enumerate(self.model_names)}
            rnns = [m for m in self.model_names if m != "transformer"]
            decays = {m: at_far[m] < DECAY for m in self.model_names}
            numbers = ", ".join(f"{m} {v:.3g}" for m, v in at_far.items())
            if all(decays[m] for m in rnns) and not decays["transformer"]:
                verdict = "holds: the RNNs' gradient decays with distance, the transformer's does not"
            else:
                parts = [f"{m}'s {'decays' if decays[m] else 'does not decay'}" for m in self.model_names]
                verdict = "does not hold as stated: " + ", ".join(parts)
            out[phase] = f"{phase}: gradient reaching distance {far} / distance 1 = {numbers}; the claim {verdict}"
        return out

    def headline(self) -> str:
        far = max(self.task.gaps)
        cells = "; ".join(f"{m} {float(self.ratio[i, 0, -1]):.2g} -> {float(self.ratio[i, 1, -1]):.2g} "
                          f"(acc {float(self.accuracy[i, 1, -1]):.0%})" for i, m in enumerate(self.model_names))
        return f"gradient reaching the key at gap {far} relative to distance 1, init -> trained: {cells}"

    def to_frame(self):
        import pandas as pd

        rows = []
        for i, m in enumerate(self.model_names):
            for p, phase in enumerate(PHASES):
                for g, gap in enumerate(self.task.gaps):
                    rows.append({"model": m, "phase": phase, "gap": gap, "ratio n/1": float(self.ratio[i, p, g]),
                                 "|grad| at key": float(self.key_norm[i, p, g]),
                                 "accuracy": float(self.accuracy[i, p, g])})
        return pd.DataFrame(rows)

    def plot(self):
        """(ratio by gap, profile by distance, accuracy by gap) -> three `Figure`s (log-scale gradients)."""
        from interp.plots import line_chart

        def series(values):
            return {f"{m} {phase}": values[i, p].tolist() for i, m in enumerate(self.model_names)
                    for p, phase in enumerate(PHASES)}

        from interp.plots import COLORS

        styles = {f"{m} {phase}": {"color": COLORS[i], **({"linestyle": "--"} if phase == "init" else {})}
                  for i, m in enumerate(self.model_names) for phase in PHASES}
        gaps = list(self.task.gaps)
        ratio = line_chart(series(self.ratio), x=gaps, x_label="gap n (distance from the key to the query)",
                           y_label="|dL/d embed at key| / |at distance 1|", styles=styles,
                           title="Gradient reaching the key, relative to distance 1")
        ratio.axes[0].set_xscale("log", base=2)
        ratio.axes[0].set_xticks(gaps, [str(g) for g in gaps])
        distances = list(range(self.profile.shape[-1]))
        profile = line_chart(series(self.profile), x=distances, x_label="distance t - s from the query",
                             y_label="|dL/d embed| / |at distance 1|", styles=styles, markers=False,
                             title=f"Gradient by distance, gap {max(gaps)} (the key is at distance {max(gaps)})")
        accuracy = line_chart(series(self.accuracy), x=gaps, x_label="gap n", y_label="accuracy", styles=styles,
                              ylim=(0, 1.05), title="Recall accuracy by gap")
        accuracy.axes[0].set_xscale("log", base=2)
        accuracy.axes[0].set_xticks(gaps, [str(g) for g in gaps])
        for fig in (ratio, profile):
            fig.axes[0].set_yscale("log")
        return ratio, profile, accuracy

    def to_dict(self) -> dict:
        def table(values):
            return {m: {phase: {str(g): float(values[i, p, k]) for k, g in enumerate(self.task.gaps)}
                        for p, phase in enumerate(PHASES)} for i, m in enumerate(self.model_names)}

        return {"task": {"gaps": list(self.task.gaps), "length": self.task.length, "n_keys": self.task.n_keys,
                         "n_noise": self.task.n_noise},
                "params": self.n_params, "steps": self.steps, "train_seconds": self.train_seconds,
                "train_seconds_total": sum(self.train_seconds.values()), "final_loss": self.final_loss,
                "cpu": self.cpu, "ratio_distance_n_over_1": table(self.ratio), "key_grad_norm": table(self.key_norm),
                "accuracy": table(self.accuracy),
                "profile_longest_gap": {m: {phase: self.profile[i, p].tolist() for p, phase in enumerate(PHASES)}
                                        for i, m in enumerate(self.model_names)},
                "claim": self.claim(), "decay_threshold": DECAY,
                "real": {name: r.to_dict() for name, r in self.real.items()}, "seconds": self.seconds}

    def save(self, directory) -> Path:
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "gradient_flow.json").write_text(json.dumps(self.to_dict(), indent=1))
        page = Page("Gradient flow: transformers and RNNs",
                    {"command": "python -m analyses.gradient_flow", "steps": self.steps, **self.cpu})
        page.text(self.headline() + ".")
        page.heading("The recall task")
        page.text(f"Sequences of {self.task.length} tokens: noise, one key token (of {self.task.n_keys}) at "
                  f"distance n from the last position, and the query there, where the key must be output; "
                  f"gaps {list(self.task.gaps)}, mixed in training. Each model trained {self.steps} steps with "
                  "the same loop, data and seed. Training wall time (other processes shared the 2 CPU cores): "
                  + ", ".join(f"{m} {s:.1f} s" for m, s in self.train_seconds.items())
                  + f"; total {sum(self.train_seconds.values()):.1f} s.")
        page.table([{"model": m, "parameters": self.n_params[m], "final loss": self.final_loss[m],
                     "train seconds": self.train_seconds[m]} for m in self.model_names])
        page.heading("Does the gradient reach the key?")
        for line in self.claim().values():
            page.text(line + ".")
        ratio, profile, accuracy = self.plot()
        page.figure(ratio, caption="Gradient of the loss at the query w.r.t. the input embedding at the key, over "
                                   "the gradient at distance 1 of the same sequence (geometric mean over sequences; "
                                   "dashed: at initialisation).")
        far = max(self.task.gaps)
        page.text(f"At distance {far - 1}, a noise position one step short of the key, the relative gradient is "
                  + "; ".join(f"{m} {float(self.profile[i, 0, far - 1]):.2g} at init, "
                              f"{float(self.profile[i, 1, far - 1]):.2g} trained"
                              for i, m in enumerate(self.model_names)) + ".")
        page.figure(profile, caption="The same at every distance, over the longest gap's sequences.")
        page.figure(accuracy)
        page.table(self.to_frame().to_dict("records"), caption="By model, phase and gap")
        for name, res in self.real.items():
            page.heading(f"{name} on Wikipedia text")
            page.text(res.headline() + f". Loss: {res.loss}; {int(res.loss_positions.numel())} target positions; "
                      f"the split's largest |residual + attn + mlp - total| is {res.split_error:.2g}.")
            heat, split = res.plot()
            page.figures([heat, split])
        return page.save(directory / "index.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return "".join(to_svg(f) for f in self.plot())


# ---------------------------------------------------------------------- the recall measurements
def _geomean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return x.clamp(min=1e-300).log().mean(dim).exp()


def recall_gradients(model, task: RecallTask, n_per_gap: int, seed: int) -> dict[str, torch.Tensor]:
    """key_norm [gap], ratio [gap] and profile [distance] of the gradient at the input embedding (float64)."""
    from interp import attach
    from interp.gradients import cross_entropy_at, gradient_map

    model = copy.deepcopy(model).double().eval()
    hooked = model if hasattr(model, "hook_dict") else attach(model)
    gen = torch.Generator().manual_seed(seed)
    last = task.length - 1
    key_norm, ratio, profile = [], [], None
    for gap in task.gaps:
        tokens, keys, _ = task.sample(n_per_gap, gen, gap)
        positions = torch.full((n_per_gap,), last)
        grads = gradient_map(hooked, tokens, ["hook_embed"], cross_entropy_at(positions, keys), positions,
                             causal=True)
        norms = grads.norms[0].double()  # [row, pos]
        norms = norms[norms[:, last - 1] > 0]  # a row whose loss is exactly 0 in float64 has no direction
        key_norm.append(_geomean(norms[:, last - gap]))
        ratio.append(_geomean(norms[:, last - gap] / norms[:, last - 1]))
        if gap == max(task.gaps):
            profile = _geomean(norms.flip(-1) / norms[:, last - 1:last])  # [distance]
    return {"key_norm": torch.stack(key_norm), "ratio": torch.stack(ratio), "profile": profile}


def real_gradients(model, texts, n_tokens: int, chunk_size: int = 8):
    """`residual_gradients` of a real model on the first `n_tokens` of each text (MiniLM: [CLS] .. [SEP],
    masked-token loss at every word piece; decoders: next-token loss at every position)."""
    from interp.gradients import residual_gradients

    rows = []
    for text in texts:
        ids = model.to_tokens(text)[0]
        if ids.numel() < n_tokens:
            continue
        if model.cfg.causal:
            rows.append(ids[:n_tokens])
        else:  # keep the closing [SEP] the encoder was trained with
            rows.append(torch.cat([ids[: n_tokens - 1], ids[-1:]]))
    if not rows:
        raise ValueError(f"no text has {n_tokens} tokens: pass longer texts or a smaller n_tokens")
    targets = None if model.cfg.causal else list(range(1, n_tokens - 1))
    return residual_gradients(model, torch.stack(rows), targets, chunk_size=chunk_size)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run the body with n intra-op threads, restored after. The recall models' matrices are tiny: on this
    machine's 2 shared cores one thread trained them 2.5-10x faster than two (the two threads' OpenMP
    barriers wait on whatever else runs), against 1.5x slower than two on idle cores."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _recall_study(task: RecallTask, steps: int, seed: int, n_grad: int, n_acc: int, progress: bool) -> dict:
    built = build_models(task, seed)
    out = {"names": list(built), "params": {n: n_params(m) for n, m in built.items()}, "measured": {},
           "accuracy": {}, "wall": {}, "cpu": {}, "loss": {}}
    for name, model in built.items():
        measured = [recall_gradients(model, task, n_grad, seed + 1)]
        accuracy = [accuracy_by_gap(model, task, n_acc, seed + 2)]
        cpu = time.process_time()
        result = train_model(model, task, steps, seed=seed, progress=progress)
        out["cpu"][name], out["wall"][name] = time.process_time() - cpu, result.seconds
        out["loss"][name] = sum(result.losses[-20:]) / len(result.losses[-20:])
        measured.append(recall_gradients(model, task, n_grad, seed + 1))
        accuracy.append(accuracy_by_gap(model, task, n_acc, seed + 2))
        out["measured"][name], out["accuracy"][name] = measured, torch.stack(accuracy)
    return out


def gradient_flow_study(quick: bool = False, seed: int = 0, steps: int | None = None, real_models=REAL_MODELS,
                        texts=None, threads: int | None = 1, progress: bool = False) -> GradientFlowResult:
    """Train the transformer, LSTM and GRU on the recall task, measure gradients at init and after training,
    and the residual-stream gradients of the real models (`real_models`: names or loaded models; `texts`:
    default the first Wikipedia summaries). threads: torch threads for the recall part (None: unchanged)."""
    import models

    start = time.perf_counter()
    task = RecallTask(gaps=(1, 4, 16) if quick else (1, 2, 4, 8, 16, 32, 64))
    steps = steps if steps is not None else (40 if quick else 400)
    load_before = os.getloadavg()[0]
    with _torch_threads(threads):
        recall = _recall_study(task, steps, seed, *((16, 64) if quick else (64, 512)), progress)
    names = recall["names"]
    stack = lambda key: torch.stack([torch.stack([m[key] for m in recall["measured"][n]])  # noqa: E731
                                     for n in names]).float()
    cpu = {"torch threads (recall models)": threads or torch.get_num_threads(), "cpus": os.cpu_count(),
           "load average before/after training": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
           "training CPU seconds": {n: round(recall["cpu"][n], 1) for n in names}}
    if texts is None and real_models:
        from interp.collect.corpus import default_corpus

        texts = list(default_corpus())[: 2 if quick else 8]
    real = {}
    for spec in real_models:
        model = models.load(spec) if isinstance(spec, str) else spec
        real[model.cfg.model_name] = real_gradients(model, texts[:1] if quick else texts, 12 if quick else 32)
    return GradientFlowResult(task, names, recall["params"], stack("ratio"), stack("key_norm"), stack("profile"),
                              torch.stack([recall["accuracy"][n] for n in names]), recall["wall"], recall["loss"],
                              steps, real, cpu, time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/gradient_flow")
    parser.add_argument("--quick", action="store_true", help="tiny training, fewer gaps, short texts (seconds)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    result = gradient_flow_study(quick=args.quick, steps=args.steps, progress=True)
    print(result.headline())
    for line in result.claim().values():
        print(line)
    print("wrote", result.save(args.out))


if __name__ == "__main__":
    main()
