"""Linear probes: is a label linearly decodable from one hook point's activations, layer by layer?

    result = linear_probe(model, ["The mole dug a tunnel", ...], ["animal", ...],
                          position=word("mole", sub="last"))
    result.to_frame(); result.plot(); result.save("reports/mole_probe")

Each layer gets a multinomial logistic regression (L2-regularised, fitted in torch with
full-batch L-BFGS) trained on a stratified split and scored on the held-out part. The
control (Hewitt & Liang, 2019) fits the same probe to shuffled labels: a probe that
scores well on those memorises rather than reads, so `test - control` ("selectivity")
is the number to trust, not the test accuracy alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from interp.names import HookNameError, act_name
from interp.positions import PositionNotFound, SelectorSpec, TokenizedPrompt, as_selector, describe, last_token

_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_token_type_embed")


def _hook_names(model, hook: str, layers) -> tuple[list[str], list]:
    """(full hook names, their labels): one per layer for a short key or a template with {layer}
    (e.g. "model.layers.{layer}" on an attached model), one for a full name."""
    try:
        single = None if "{layer}" in hook else act_name(hook)  # full names, "embed", ln_final's norms
    except HookNameError:
        single = None
    if single is not None:
        if layers is not None:
            raise ValueError(f"{hook!r} names one hook point and takes no layers (got layers={layers!r})")
        names, labels = [single], [single]
    else:
        n = model.cfg.n_layers
        labels = list(range(n)) if layers is None else [int(l) for l in layers]
        bad = [l for l in labels if not -n <= l < n]
        if bad:
            raise ValueError(f"layers {bad} are outside the model's {n} layers")
        labels = [l % n for l in labels]  # -1 means the last layer, as in Python
        names = [hook.format(layer=l) if "{layer}" in hook else act_name(hook, l) for l in labels]
    model.resolve_hook_names(names)  # an unknown name fails here, with the closest names
    for name in names:
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            raise ValueError(f"{name} is indexed [batch, head, query, key], not by position; probe hook_z instead")
    return names, labels


def _stop_layer(names: list[str]) -> int | None:
    """The first block no requested hook needs: running past it would compute activations nobody reads."""
    blocks = [re.match(r"blocks\.(\d+)\.", n) for n in names]
    if all(blocks):
        return max(int(m.group(1)) for m in blocks) + 1
    if all(n in _EMBED_HOOKS for n in names):
        return 0
    return None  # ln_final or an unknown layout: run everything


def _positions(prompt: TokenizedPrompt, select, i: int) -> list[int]:
    try:
        found = select(prompt)
    except PositionNotFound as e:
        if prompt.text in str(e):
            raise
        raise PositionNotFound(f"example {i} ({prompt.text!r}): {e}") from e
    if not found:
        raise PositionNotFound(f"{describe(select)} selects no position in example {i} ({prompt.text!r})")
    return found


@torch.no_grad()
def collect_features(model, examples: Sequence, hook: str = "resid_post", layers: Sequence[int] | None = None,
                     position: SelectorSpec = last_token(), reduce: str = "mean",
                     batch_size: int = 16) -> torch.Tensor:
    """Activations at the selected position(s) of each example: `[n_layers, n_examples, d]` float32 on CPU.

    Examples are strings or dicts ({"text": ..., fields for selectors}). Prompts run in
    groups of equal token length, so there is no padding to leak into a feature (and a
    prompt's features equal those of the prompt run alone). Several selected positions are
    reduced by "mean", "first" or "last"; per-head hooks (`z`, `q`, ...) are flattened.
    """
    if reduce not in ("mean", "first", "last"):
        raise ValueError(f"reduce must be 'mean', 'first' or 'last', got {reduce!r}")
    names, _ = _hook_names(model, hook, layers)
    select = as_selector(position)
    prompts = [TokenizedPrompt.from_model(model, ex) for ex in examples]
    if not prompts:
        raise ValueError("no examples")
    where = [_positions(p, select, i) for i, p in enumerate(prompts)]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    stop = _stop_layer(names)
    run_kwargs = {"stop_at_layer": stop} if stop is not None else {"return_type": "hidden"}
    if not getattr(model, "supports_resume", False):
        run_kwargs = {}  # a model we did not build (interp.attach) takes its own forward's arguments only
    out: torch.Tensor | None = None  # [n_layers, n_examples, d], allocated once d is known
    for idx in by_length.values():
        for start in range(0, len(idx), batch_size):
            group = idx[start:start + batch_size]
            tokens = torch.stack([prompts[i].tokens for i in group])  # [batch, pos]; the model moves it
            _, cache = model.run_with_cache(tokens, names_filter=names, return_cache_object=False, **run_kwargs)
            for k, name in enumerate(names):
                act = cache[name]  # [batch, pos, ...]
                for row, i in enumerate(group):
                    picked = act[row, where[i]].flatten(1).float()  # [n_selected, d]
                    feat = picked.mean(0) if reduce == "mean" else picked[0 if reduce == "first" else -1]
                    if out is None:
                        out = torch.empty(len(names), len(prompts), feat.numel())
                    out[k, i] = feat.cpu()
            del cache
    return out


@dataclass
class LogisticRegression:
    """A fitted probe. `W` `[d, n_classes]` and `b` `[n_classes]` act on standardised features
    `(X - mean) / std`; `logits`/`predict` take raw features. Unpacks as `W, b = probe`."""

    W: torch.Tensor  # [d, n_classes]
    b: torch.Tensor  # [n_classes]
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]

    def __iter__(self):
        return iter((self.W, self.b))

    def standardize(self, X: torch.Tensor) -> torch.Tensor:
        return (X.to(self.W.dtype) - self.mean) / self.std

    def logits(self, X: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, n_classes]
        return self.standardize(X) @ self.W + self.b

    def predict(self, X: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n]
        return self.logits(X).argmax(-1)

    def accuracy(self, X: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(X) == y.to(self.W.device)).double().mean())

    @property
    def directions(self) -> torch.Tensor:
        """`[d, n_classes]`: the probe's weights in raw activation coordinates."""
        return self.W / self.std[:, None]


def fit_logistic_regression(X: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-2,
                            max_iter: int = 200) -> LogisticRegression:
    """Minimise `mean cross-entropy + l2/2 * ||W||^2` on standardised `X` `[n, d]`, labels `y` `[n]`.

    Float64 and full-batch L-BFGS with a strong-Wolfe line search from zero: deterministic,
    and the penalty makes the optimum finite even on separable data.
    """
    X = X.detach().double()
    y = torch.as_tensor(y, device=X.device).long()
    if X.dim() != 2 or y.shape != X.shape[:1]:
        raise ValueError(f"X must be [n, d] and y [n]; got {tuple(X.shape)} and {tuple(y.shape)}")
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))  # constant features stay 0
    Xs = (X - mean) / std
    W = torch.zeros(X.shape[1], n_classes, dtype=X.dtype, device=X.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=X.dtype, device=X.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xs @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often sit inside no_grad
        opt.step(closure)
    return LogisticRegression(W.detach(), b.detach(), mean, std)


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices, sorted; each class contributes round(count * test_fraction), at least one to each side."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        members = (y == c).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=g)]
        n_test = min(max(round(len(members) * test_fraction), 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@dataclass
class LinearProbeResult:
    """Per-layer accuracies of linear probes for one label; accuracies are `[n_layers]`."""

    hook: str
    layers: list  # layer indices, or the hook name for a hook outside the blocks
    train_accuracy: torch.Tensor
    test_accuracy: torch.Tensor
    control_accuracy: torch.Tensor  # NaN when run without the control
    chance: float  # majority-class rate of the test set
    classes: list
    n_train: int
    n_test: int
    position: str = ""
    model_name: str = ""
    probes: list = field(default_factory=list, repr=False)  # LogisticRegression per layer

    @property
    def selectivity(self) -> torch.Tensor:
        return self.test_accuracy - self.control_accuracy

    def best_layer(self):
        """The layer with the highest held-out accuracy (the earliest on ties)."""
        return self.layers[int(self.test_accuracy.argmax())]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({
            "layer": self.layers, "train_accuracy": self.train_accuracy.tolist(),
            "test_accuracy": self.test_accuracy.tolist(), "control_accuracy": self.control_accuracy.tolist(),
            "selectivity": self.selectivity.tolist(), "chance": [self.chance] * len(self.layers),
        })

    def plot(self):
        """Held-out accuracy per layer: the probe, the shuffled-label control and chance -> `Figure`."""
        from interp.plots import line_chart

        n = len(self.layers)
        series = {"test": self.test_accuracy.tolist(), "control": self.control_accuracy.tolist(),
                  "chance": [self.chance] * n}
        return line_chart(series, x_ticks=[str(layer) for layer in self.layers], x_label="layer",
                          y_label="held-out accuracy", ylim=(0, 1.02), markers=True,
                          styles={"control": {"linestyle": "--"}, "chance": {"linestyle": ":", "marker": None}})

    def to_dict(self) -> dict:
        return {"model": self.model_name, "hook": self.hook, "position": self.position,
                "classes": [str(c) for c in self.classes], "n_train": self.n_train, "n_test": self.n_test,
                "chance": self.chance, "best_layer": self.best_layer(),
                # NaN (run without the control) becomes null: strict JSON readers reject NaN.
                "layers": [{k: None if v != v else v for k, v in row.items()}
                           for row in self.to_frame().to_dict(orient="records")]}

    def save(self, directory) -> Path:
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "linear_probe.json").write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        run = {k: v for k, v in self.to_dict().items() if k not in ("layers", "best_layer", "chance")}
        page = Page(f"Linear probe: {self.hook}", run)
        page.text(f"Best layer: {self.best_layer()}. The control fits the same probe to shuffled labels; "
                  "selectivity = test - control.")
        page.figure(self.plot(), "Held-out accuracy per layer: probe (test), shuffled-label control, chance")
        page.table(self.to_frame().to_dict(orient="records"))
        return page.save(directory / "linear_probe.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return self.to_frame().to_html(index=False) + to_svg(self.plot())


def linear_probe(model, examples: Sequence, labels: Sequence, hook: str = "resid_post",
                 layers: Sequence[int] | None = None, position: SelectorSpec = last_token(), reduce: str = "mean",
                 test_fraction: float = 0.25, l2: float = 1e-2, seed: int = 0, control: bool = True,
                 batch_size: int = 16, max_iter: int = 200) -> LinearProbeResult:
    """Fit a probe per layer on a stratified split of `examples` and score it on the held-out part.

    `labels` are ints or strings, one per example. See `collect_features` for `hook`,
    `layers`, `position` and `reduce`.
    """
    examples, labels = list(examples), list(labels)
    if len(labels) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    classes = sorted(set(labels), key=lambda c: (str(type(c)), c))
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes; every label is {classes[0]!r}" if classes else "no labels")
    index = {c: k for k, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in labels])  # [n]
    counts = torch.bincount(y, minlength=len(classes))
    few = [classes[k] for k in range(len(classes)) if counts[k] < 2]
    if few:
        raise ValueError(f"classes {few} have fewer than 2 examples: each needs one to train on and one to test")
    train, test = stratified_split(y, test_fraction, seed)
    # The control's labels: one permutation of all labels, split the same way as the real ones.
    y_control = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
    names, labels_out = _hook_names(model, hook, layers)
    X = collect_features(model, examples, hook, layers, position, reduce, batch_size)  # [n_layers, n, d]
    n_layers = len(names)
    train_acc, test_acc = torch.zeros(n_layers), torch.zeros(n_layers)
    control_acc = torch.full((n_layers,), float("nan"))
    probes = []
    for k in range(n_layers):
        probe = fit_logistic_regression(X[k, train], y[train], len(classes), l2, max_iter)
        train_acc[k] = probe.accuracy(X[k, train], y[train])
        test_acc[k] = probe.accuracy(X[k, test], y[test])
        probes.append(probe)
        if control:
            shuffled = fit_logistic_regression(X[k, train], y_control[train], len(classes), l2, max_iter)
            control_acc[k] = shuffled.accuracy(X[k, test], y_control[test])
    chance = float(torch.bincount(y[test]).max()) / len(test)
    return LinearProbeResult(hook, labels_out, train_acc, test_acc, control_acc, chance, classes, len(train), len(test),
                             describe(position), getattr(model.cfg, "model_name", ""), probes)
