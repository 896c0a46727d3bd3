"""PatchResult: a patching sweep's values on its labelled grid, per prompt and averaged."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class PatchResult:
    kind: str  # site kind ("resid_pre", "z", ...) or "path" / "attribution:<kind>"
    by: str  # grid ("layer_pos", "head_pos", ...)
    axes: tuple[str, ...]
    labels: dict[str, list[str]]  # axis -> tick labels
    per_prompt: torch.Tensor  # [n_prompts, *grid]
    metric: str
    direction: str  # "denoise", "noise", "ablate:<how>"
    clean_metric: torch.Tensor  # [n_prompts]
    corrupted_metric: torch.Tensor
    normalized: bool
    forwards: int = 0  # model forwards (full or resumed) the sweep took
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        return self.per_prompt.mean(0)

    @property
    def std(self) -> torch.Tensor:
        return self.per_prompt.std(0) if self.per_prompt.shape[0] > 1 else torch.zeros_like(self.mean)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def top(self, k: int = 5, by_abs: bool = True) -> list[tuple[dict, float]]:
        """The k cells with the largest mean (absolute, by default), as ({axis: label}, value)."""
        flat = self.mean.flatten()
        key = flat.abs() if by_abs else flat
        idx = key.topk(min(k, flat.numel())).indices
        out = []
        for i in idx.tolist():
            coords = torch.unravel_index(torch.tensor(i), self.shape)
            out.append(({a: self.labels[a][int(c)] for a, c in zip(self.axes, coords)}, float(flat[i])))
        return out

    def to_frame(self):
        import pandas as pd

        rows = []
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in self.shape]).reshape(-1, len(self.shape)).tolist():
            row = {a: self.labels[a][i] for a, i in zip(self.axes, idx)}
            row["mean"] = float(self.mean[tuple(idx)])
            row["std"] = float(self.std[tuple(idx)])
            rows.append(row)
        return pd.DataFrame(rows)

    def effect(self) -> torch.Tensor:
        """The mean change each patch makes, signed so that 0 = nothing changed [*grid].

        Denoising: patched - corrupted (what the patch restores). Noising and ablation: clean -
        patched (what the patch breaks, the drop from the clean run). Normalised metrics read
        the same with the runs at 0 (corrupted) and 1 (clean).
        """
        from interp.patching.attribution import effects

        change = effects(self).mean(0)
        return change if self.direction == "denoise" else -change

    def effect_label(self) -> str:
        return "patched - corrupted" if self.direction == "denoise" else "clean - patched"

    def plot(self, layer: int | None = None):
        """Heatmap of the mean effect (see `effect`: 0 = white = the patch changed nothing) -> `Figure`.

        [layer, pos] / [layer, head] maps as they are; [layer, head, pos] as layer x head (the
        position with the largest |effect|) or, given `layer`, that layer's head x position;
        [layer, head, dest, src] as dest x src of `layer` (default 0), each cell the head with the
        largest |effect|.
        """
        from interp.plots import heatmap

        mean = self.effect()
        axes = list(self.axes)
        if not axes:  # one patch (a sender set): a single cell
            mean, axes = mean.reshape(1, 1), ["", ""]
            rows, cols = [self.metric], [self.extra.get("senders", "patch")]
        elif len(axes) == 1:
            mean, axes = mean[None], ["", axes[0]]
            rows = [self.metric]
        elif len(axes) == 3:  # [layer, head, pos]: one map of heads x positions per layer, or layer x head (max |.| over pos)
            if layer is not None:
                mean, axes = mean[layer], axes[1:]
            else:
                idx = mean.abs().argmax(-1, keepdim=True)
                mean, axes = mean.gather(-1, idx)[..., 0], axes[:2]
        elif len(axes) == 4:
            block = mean[layer if layer is not None else 0]  # [head, dest, src]
            idx = block.abs().argmax(0, keepdim=True)
            mean, axes = block.gather(0, idx)[0], ["dest", "src"]
        if len(self.axes) > 1:
            rows = self.labels[axes[0]]
        if self.axes:
            cols = self.labels[axes[1]]
        what = "restored" if self.direction == "denoise" else "drop"
        title = f"{self.kind} ({self.direction}): {self.metric}\n{what}, {self.effect_label()}"
        return heatmap(mean, rows, cols, title=title, signed=True, value_format="{:.2f}",
                       x_label=axes[1], y_label=axes[0], colorbar_label=self.effect_label())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "by": self.by, "axes": list(self.axes), "labels": self.labels,
                "mean": self.mean.tolist(), "std": self.std.tolist(), "metric": self.metric,
                "direction": self.direction, "normalized": self.normalized,
                "clean_metric": self.clean_metric.tolist(), "corrupted_metric": self.corrupted_metric.tolist(),
                "forwards": self.forwards, "seconds": self.seconds, **self.extra}

    def save(self, directory, name: str | None = None) -> Path:
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = name or f"patch_{self.kind}_{self.by}"
        (directory / f"{name}.json").write_text(json.dumps(self.to_dict(), indent=1))
        page = Page(f"Patching {self.kind} by {self.by}", {"metric": self.metric, "direction": self.direction})
        page.figure(self.plot())
        page.table([{**c, "value": v} for c, v in self.top(10)], caption="Largest effects")
        return page.save(directory / f"{name}.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())
