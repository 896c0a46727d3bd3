"""Gradients of a loss with respect to activations, by hook point, position and path.

    grads = gradient_map(model, tokens, ["hook_embed"], cross_entropy_at(positions, labels), positions)
    grads.by_distance()                           # [site, distance]: mean |dL/d act| at distance t - s
    res = residual_gradients(model, "The Eiffel Tower is in Paris")   # every layer, every target position
    res.by_distance()                             # [layer, distance];  res.split_by_layer(): residual vs block

Works on anything with TransformerLens-style hook points: the toolkit's `HookedTransformer`
and, through `interp.attach`, any `nn.Module` (an RNN language model's `hook_embed`, its
`nn.LSTM`'s output sequence). `residual_gradients` reads the toolkit's hook names and `cfg`.

What is measured. Row b of a batch carries its own scalar loss L_b, read at one position t_b
(`loss_positions[b]`), and the rows are summed before one backward: rows of a batch never
interact (no batch statistics: BatchNorm in training mode would break this), so the gradient found
in row b is dL_b/d act exactly (one backward for all rows, not one per row). `residual_gradients`
turns one sequence into one row per target position (the sequence repeated, each row scoring its
own position), so a loss at every position of a text costs one batched backward. Norms are L2 over the feature axis.

Distance is d = t - s between the position t whose output the loss scores and a source
position s (next-token loss: the predicted token is t + 1; a causal model's gradient at s > t
is zero, so only s <= t counts; a bidirectional model counts both sides, as |t - s|).

Which activation is "the stream at position s" across architectures: the input embedding
(`hook_embed`). A transformer's `resid_pre 0` is the embedding plus positions, with the same
gradient; an LSTM's per-step output h_s is read by the loss only at the step it scores (for
a loss at step t its gradient is zero at every other step: the recurrence carries h_s on
through the cell, not through the output tensor), so the gradient that *reaches* step s
through the recurrence is found at that step's input.

The residual/block split at layer l: dL/d resid_pre_l = residual part + attention part + MLP part,
as vectors. Pre-norm blocks (mid = pre + attn, post = mid + mlp):
residual = dL/d resid_post (the identity path), MLP = dL/d resid_mid - dL/d resid_post (the
MLP branch's vector-Jacobian product), attention = dL/d resid_pre - dL/d resid_mid (the
attention branch's, of everything arriving at resid_mid). Parallel blocks: the attention part
is the VJP of `hook_attn_out` into resid_pre, the MLP part the rest of the block's. Post-LN
blocks (BERT: mid = LN1(pre + attn), post = LN2(mid + mlp)): the residual path is the skip
through both adds and norms, the MLP part the VJP of `hook_mlp_out` into `hook_resid_mid`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

PARTS = ("residual", "block", "attn", "mlp")
__all__ = ["GradientError", "GradientMap", "PARTS", "cross_entropy_at", "gradient_map",
           "recurrent_sites", "step_gradients"]  # and, lazily, residual_gradients and ResidualGradients


class GradientError(ValueError):
    """A gradient request that cannot be met (bad positions, layers, loss or model)."""


# ---------------------------------------------------------------------- capture
@contextlib.contextmanager
def _capturing(model, names: Sequence[str]):
    """Hooks that keep each named activation (made differentiable where nothing upstream was)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        if not x.requires_grad:  # a frozen model: start the graph here
            x = x.detach().requires_grad_(True)
        acts[hook.name] = x
        return x

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
        yield acts


def _grads(outputs, acts: dict[str, torch.Tensor], names, grad_outputs=None, retain: bool = False):
    """{name: dL/d act} (zeros where the loss does not depend on it); one tensor held under two names
    (resid_post l is resid_pre l + 1) is differentiated once."""
    unique = list({id(acts[n]): acts[n] for n in names}.values())
    found = torch.autograd.grad(outputs, unique, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True)
    by_id = {id(t): torch.zeros_like(t) if g is None else g for t, g in zip(unique, found)}
    return {n: by_id[id(acts[n])] for n in names}


def _vjp(output: torch.Tensor, input: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(output, input, grad_outputs=cotangent, retain_graph=True, allow_unused=True)
    return torch.zeros_like(input) if g is None else g


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 or better: half-precision values are widened, float64 ones keep their precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 over the last axis, in float32 or better, on the CPU."""
    return _upcast(grad.detach()).norm(dim=-1).cpu()


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise GradientError(f"cannot find logits in a {type(output).__name__}: pass a row_loss that reads it")


def cross_entropy_at(positions: torch.Tensor, labels: torch.Tensor) -> Callable[[object], torch.Tensor]:
    """A row loss: cross-entropy of row b's logits at `positions[b]` against `labels[b]` -> [rows].
    The output may be logits `[rows, pos, vocab]` or anything holding them (`.logits`, a tuple's first)."""
    positions, labels = torch.as_tensor(positions).long(), torch.as_tensor(labels).long()

    def loss(output) -> torch.Tensor:
        logits = _logits(output)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(_upcast(logits[rows, positions.to(logits.device)]), labels.to(logits.device),
                               reduction="none")

    return loss


# ---------------------------------------------------------------------- any model, any hook point
@dataclass
class GradientMap:
    """|dL_b / d act[b, s]| for each site (hook point), row b and position s.

    sites: hook names; norms `[site, row, pos]`; loss_positions `[row]`: the position t_b each row's
    loss scores; losses `[row]`; causal: whether positions after t_b can matter; grads: site ->
    raw gradients `[row, pos, ...]` when kept.
    """

    sites: list[str]
    norms: torch.Tensor
    loss_positions: torch.Tensor
    losses: torch.Tensor
    causal: bool = True
    grads: dict[str, torch.Tensor] | None = None

    def site_index(self, site: str | int) -> int:
        if isinstance(site, int):
            if not -len(self.sites) <= site < len(self.sites):
                raise GradientError(f"site {site} is out of range: there are {len(self.sites)} sites")
            return site % len(self.sites)
        if site not in self.sites:
            raise GradientError(f"no site {site!r}; measured: {self.sites}")
        return self.sites.index(site)

    def distances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance [row, pos] = |t_b - s|, counted [row, pos]: the pairs a loss can depend on)."""
        s = torch.arange(self.norms.shape[-1])
        signed = self.loss_positions[:, None] - s[None]
        counted = signed >= 0 if self.causal else torch.ones_like(signed, dtype=torch.bool)
        return signed.abs(), counted

    def _by_distance(self, values: torch.Tensor) -> torch.Tensor:
        # values [..., row, pos] -> mean over counted (row, pos) pairs at each distance [..., distance]
        d, counted = self.distances()
        n = int(d[counted].max()) + 1
        index = d[counted]
        flat = values[..., counted]
        sums = torch.zeros(*values.shape[:-2], n, dtype=values.dtype).index_add_(-1, index, flat)
        counts = torch.bincount(index, minlength=n).to(values.dtype)
        return sums / counts.clamp(min=1)

    def by_distance(self) -> torch.Tensor:
        """[site, distance]: mean gradient norm over the (row, position) pairs at each distance t - s."""
        return self._by_distance(self.norms)

    def by_site(self) -> torch.Tensor:
        """[site]: mean gradient norm over every counted (row, position) pair."""
        _, counted = self.distances()
        return self.norms[..., counted].mean(-1)

    def at_distance(self, distance: int) -> torch.Tensor:
        """[site, row]: the norm at s = t_b - distance in each row (NaN where that is before position 0)."""
        s = self.loss_positions - distance
        ok = (s >= 0) & (s < self.norms.shape[-1])
        out = torch.full(self.norms.shape[:2], float("nan"), dtype=self.norms.dtype)
        rows = torch.nonzero(ok)[:, 0]
        out[:, rows] = self.norms[:, rows, s[rows]]
        return out

    def to_frame(self):
        import pandas as pd

        table = self.by_distance()
        return pd.DataFrame([{"site": site, "distance": d, "mean grad norm": float(table[i, d])}
                             for i, site in enumerate(self.sites) for d in range(table.shape[1])])


def _check_positions(positions, n_rows: int, length: int, what: str = "loss position") -> torch.Tensor:
    positions = torch.as_tensor(positions).long().reshape(-1)
    if positions.numel() != n_rows:
        raise GradientError(f"{positions.numel()} {what}s for {n_rows} rows: give one per row")
    bad = positions[(positions < 0) | (positions >= length)]
    if bad.numel():
        raise GradientError(f"{what} {int(bad[0])} is out of range for a sequence of {length} positions "
                            f"(0..{length - 1})")
    return positions


def gradient_map(model, inputs: torch.Tensor, sites: Sequence[str], row_loss: Callable[[object], torch.Tensor],
                 loss_positions, *, causal: bool | None = None, keep_grads: bool = False,
                 **model_kwargs) -> GradientMap:
    """Gradients of each row's loss w.r.t. the activations at `sites` (hook names), one batched backward.

    inputs: `[rows, pos]` token ids, passed to `model(inputs, **model_kwargs)`; row_loss(output) -> [rows]
    (e.g. `cross_entropy_at(positions, labels)`); loss_positions [rows]: the position each row's loss
    scores (for distances). Every site's activation must be `[rows, pos, ...]`. causal: default
    `model.cfg.causal` where there is one, else True.
    """
    inputs = torch.as_tensor(inputs)
    if inputs.dim() != 2:
        raise GradientError(f"inputs must be [rows, pos] token ids, got shape {tuple(inputs.shape)}")
    positions = _check_positions(loss_positions, inputs.shape[0], inputs.shape[1])
    names = model.resolve_hook_names(list(sites))
    device = getattr(model, "device", None)
    inputs = inputs.to(device) if device is not None else inputs
    with _capturing(model, names) as acts:
        output = model(inputs, **model_kwargs)
        losses = row_loss(output)
        if losses.shape != (inputs.shape[0],):
            raise GradientError(f"row_loss must return one loss per row [{inputs.shape[0]}], got {tuple(losses.shape)}")
        missing = [n for n in names if n not in acts]
        if missing:
            raise GradientError(f"the forward never reached {missing}: is the hook point on this model's path?")
        grads = _grads(losses.sum(), acts, names)
    for n in names:
        if grads[n].shape[:2] != inputs.shape:
            raise GradientError(f"{n} holds {tuple(grads[n].shape)}, not [rows, pos, ...] = {tuple(inputs.shape)}")
    norms = torch.stack([_norm(grads[n].flatten(2)) for n in names])
    causal = getattr(getattr(model, "cfg", None), "causal", True) if causal is None else causal
    kept = {n: grads[n].detach().cpu() for n in names} if keep_grads else None
    return GradientMap(list(names), norms, positions, losses.detach().cpu(), causal, kept)


# ---------------------------------------------------------------------- recurrent models through attach
def recurrent_sites(attached) -> list[str]:
    """`hook_embed` and the output-sequence hook of every `nn.RNNBase` (LSTM, GRU, RNN) of an attached model."""
    module = attached.module
    rnns = [path for path, m in module.named_modules() if path and isinstance(m, torch.nn.RNNBase)]
    if not rnns:
        raise GradientError(f"{type(module).__name__} holds no nn.LSTM / nn.GRU / nn.RNN")
    for path in rnns:
        if not module.get_submodule(path).batch_first:
            raise GradientError(f"{path} is not batch_first: its output is [pos, batch, ...]; build it with "
                                "batch_first=True, or use gradient_map on [rows, pos] sites of your own")
    return (["hook_embed"] if "hook_embed" in attached.hook_dict else []) + rnns


def step_gradients(attached, inputs: torch.Tensor, labels: torch.Tensor, loss_positions=None, *,
                   sites: Sequence[str] | None = None, keep_grads: bool = False) -> GradientMap:
    """Per-time-step gradients of a recurrent language model (an `interp.attach`ed module returning
    logits `[rows, pos, vocab]`), for a cross-entropy loss of `labels[b]` at `loss_positions[b]`
    (default: the last step).

    sites default: `hook_embed` (the input at step s: what reaches step s through the recurrence)
    and each RNN module's output sequence (h_s: only the direct part, dL/d h_s through the head at s;
    zero at every step but the scored one). Compare architectures at `hook_embed`.
    """
    inputs = torch.as_tensor(inputs)
    if inputs.dim() != 2:
        raise GradientError(f"inputs must be [rows, pos] token ids, got shape {tuple(inputs.shape)}")
    if loss_positions is None:
        loss_positions = torch.full((inputs.shape[0],), inputs.shape[1] - 1)
    positions = _check_positions(loss_positions, inputs.shape[0], inputs.shape[1])
    sites = recurrent_sites(attached) if sites is None else list(sites)
    return gradient_map(attached, inputs, sites, cross_entropy_at(positions, labels), positions, causal=True,
                        keep_grads=keep_grads)


def __getattr__(name: str):
    # residual_gradients lives in gradients_residual (which imports this module): reached here, lazily
    if name in ("ResidualGradients", "residual_gradients"):
        from interp import gradients_residual

        return getattr(gradients_residual, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
