"""How good a dictionary is: reconstruction, sparsity, and what splicing it in costs the model.

    result = evaluate_dictionary(model, sae, None, seq_len=128, n_sequences=64, skip_sequences=2048)
    result.explained_variance, result.delta_ce, result.l0, result.dead_fraction
    result.to_frame(); result.plot(); result.save("reports/sae")

One clean forward per batch reads the dictionary's input (and, for a transcoder, the output it replaces);
a second forward runs the model with the dictionary's reconstruction written in by a plain hook, without
the error term (a transcoder's input is read at its input hook and its output replaces the activation at
its output hook in the same forward); a third zero-ablates that activation. Positions whose input token
is BOS are left out by default (`exclude_bos`): the BOS activation is an outlier that no public SAE is
judged on, so it is not replaced either, and neither reconstruction metrics nor losses count it.

Explained variance is SAELens 6.54's current definition (evals.py, ExplainedVarianceCalculator): one minus the
mean squared error over the total variance of all evaluated tokens, 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2),
accumulated in float64; the per-token average SAELens calls explained_variance_legacy is reported beside it.
For a transcoder, x is the activation it replaces (the MLP's output) and x_hat its output.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from interp.sae.evaluate_result import METRICS, DictionaryEvaluation

__all__ = ["METRICS", "DictionaryEvaluation", "evaluate_dictionary"]


@torch.no_grad()
def evaluate_dictionary(model, sae, inputs=None, *, seq_len: int = 128, n_sequences: int = 32,
                        skip_sequences: int = 0, batch_size: int = 4, exclude_bos: bool = True,
                        dead_threshold: float = 0.0, dense_threshold: float = 0.1, progress: bool = False):
    """Evaluate `sae` (a SparseDictionary) in `model` over held-out tokens -> DictionaryEvaluation.

    sae: one dictionary, or a list of them -> a list of results, which share the clean forward (and those
      writing the same hook the zero-ablated one), as several seeds or widths at one site do.
    inputs: token ids [n_sequences, seq_len], an ActivationDataset (its token rows), or anything
      interp.collect.load_corpus reads (None: the bundled Wikipedia corpus), packed as collect_activations
      packs (SAELens's BOS convention) into rows of seq_len.
    skip_sequences / n_sequences: which packed rows to use; to hold out a collection's tokens, skip its
      n_sequences (packing the same corpus with the same seq_len yields the same rows first).
    exclude_bos: leave BOS positions out (see the module docstring). dead_threshold / dense_threshold: a
      latent active on at most / more than this share of the evaluated tokens is dead / dense.
    """
    saes = list(sae) if isinstance(sae, (list, tuple)) else [sae]
    name = getattr(model.cfg, "model_name", "the model")
    for one in saes:
        for hook in (one.cfg.hook_name, one.cfg.writes_to):
            if hook not in model.hook_dict:
                raise ValueError(f"{one!r} reads or writes {hook!r}, which {name} does not have: evaluate it in the "
                                 "model it was trained on")
    tokens = _tokens(model, inputs, seq_len, n_sequences, skip_sequences)
    bos = _bos(model)
    device = next(model.parameters()).device
    runs = [_Run(one) for one in saes]
    ce_clean = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(tokens), batch_size), disable=not progress, desc="evaluate dictionary"):
        batch = tokens[start:start + batch_size].to(device)
        keep = (batch != bos) if (exclude_bos and bos is not None) else torch.ones_like(batch, dtype=torch.bool)
        captured: dict = {}
        hooks = dict.fromkeys(h for one in saes for h in (one.cfg.hook_name, one.cfg.writes_to))
        with model.hooks(fwd_hooks=[(h, _capture(captured)) for h in hooks]):
            clean = model(batch, return_type="logits")
        predicted = keep[:, :-1]
        log_clean = clean[:, :-1].float().log_softmax(-1)
        del clean
        ce_clean.append(_losses(log_clean, log_clean, batch, predicted)[0])
        zeroed: dict = {}  # writes_to -> (ce, kl) of the zero-ablated forward
        for run in runs:
            run.reconstruction(captured, keep)
            with model.hooks(fwd_hooks=_splice_hooks(run.sae, keep)):
                spliced = model(batch, return_type="logits")
            run.add("spliced", *_losses(log_clean, spliced[:, :-1].float().log_softmax(-1), batch, predicted))
            del spliced
            writes = run.sae.cfg.writes_to
            if writes not in zeroed:
                with model.hooks(fwd_hooks=[(writes, _zero_hook(keep))]):
                    logits = model(batch, return_type="logits")
                zeroed[writes] = _losses(log_clean, logits[:, :-1].float().log_softmax(-1), batch, predicted)
                del logits
            run.add("zero_ablation", *zeroed[writes])
    ce_clean = torch.cat(ce_clean)
    n_pred = int((~ce_clean.isnan()).sum())
    settings = {"seq_len": int(tokens.shape[1]), "n_sequences": int(tokens.shape[0]),
                "skip_sequences": skip_sequences, "exclude_bos": exclude_bos, "model": getattr(model.cfg, "model_name",
                                                                                                None)}
    results = [run.result(ce_clean, n_pred, dead_threshold, dense_threshold, settings) for run in runs]
    return results if isinstance(sae, (list, tuple)) else results[0]


def _losses(log_clean: torch.Tensor, log_p: torch.Tensor, batch: torch.Tensor, predicted: torch.Tensor):
    """(cross-entropy [b, pos - 1], KL(clean || this) [b, pos - 1]) with NaN where not `predicted`."""
    loss = -log_p.gather(-1, batch[:, 1:, None]).squeeze(-1)
    div = (log_clean.exp() * (log_clean - log_p)).sum(-1)
    return torch.where(predicted, loss, torch.nan).cpu(), torch.where(predicted, div, torch.nan).cpu()


class _Run:
    """One dictionary's running results over the batches."""

    def __init__(self, sae) -> None:
        self.sae = sae
        self.sums = _Sums(sae.cfg.d_sae)
        self.l0_rows: list[torch.Tensor] = []
        self.ce: dict[str, list] = {"spliced": [], "zero_ablation": []}
        self.kl: dict[str, list] = {"spliced": [], "zero_ablation": []}

    def reconstruction(self, captured: dict, keep: torch.Tensor) -> None:
        cfg = self.sae.cfg
        x = captured[cfg.hook_name]
        acts = self.sae.encode(x)
        recons = self.sae.decode(acts, x)
        target = captured[cfg.writes_to]
        target = target.flatten(2) if target.shape[-1] != recons.shape[-1] else target  # hook_z: [.., heads, d_head]
        flat = keep.flatten()
        self.sums.add(target.flatten(0, 1)[flat], recons.flatten(0, 1)[flat], acts.flatten(0, 1)[flat])
        self.l0_rows.append(torch.where(keep, (acts > 0).sum(-1).float(), torch.nan).cpu())

    def add(self, run: str, ce: torch.Tensor, kl: torch.Tensor) -> None:
        self.ce[run].append(ce)
        self.kl[run].append(kl)

    def result(self, ce_clean, n_pred, dead_threshold, dense_threshold, settings) -> DictionaryEvaluation:
        if self.sums.count == 0 or n_pred == 0:
            raise ValueError("no position left to evaluate (every one is BOS?): give longer sequences, or "
                             "exclude_bos=False")
        cfg = self.sae.cfg
        ce = {"clean": ce_clean, **{k: torch.cat(v) for k, v in self.ce.items()}}
        kl = {k: torch.cat(v) for k, v in self.kl.items()}
        return DictionaryEvaluation(
            dictionary=repr(cfg), reads=cfg.hook_name, writes=cfg.writes_to, n_tokens=self.sums.count,
            n_predictions=n_pred, **self.sums.result(), ce_clean=_nanmean(ce["clean"]),
            ce_spliced=_nanmean(ce["spliced"]), ce_zero_ablation=_nanmean(ce["zero_ablation"]),
            kl_spliced=_nanmean(kl["spliced"]), kl_zero_ablation=_nanmean(kl["zero_ablation"]),
            l0_per_token=torch.cat(self.l0_rows), ce=ce, dead_threshold=dead_threshold,
            dense_threshold=dense_threshold, settings=settings)


class _Sums:
    """Running sums over evaluated tokens for the reconstruction metrics, in float64 and bounded memory."""

    def __init__(self, d_sae: int) -> None:
        self.count = 0
        self.err = self.sq = self.cos = self.l0 = self.legacy = 0.0
        self.x_sum = None
        self.fired = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        """x, x_hat [n, d]: a batch's kept tokens; acts [n, d_sae]."""
        if not len(x):
            return
        x, x_hat = x.double(), x_hat.double()
        err = (x - x_hat).pow(2).sum(-1)
        self.err += float(err.sum())
        self.sq += float(x.pow(2).sum())
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        # SAELens's legacy explained variance centres each token on its batch's mean
        self.legacy += float((1 - err / (x - x.mean(0)).pow(2).sum(-1)).sum())
        self.cos += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        active = acts > 0
        self.l0 += float(active.sum())
        self.fired += active.sum(0).double().cpu()
        self.count += x.shape[0]

    def result(self) -> dict:
        n = self.count
        mean = self.x_sum / n
        variance = self.sq - n * float(mean.pow(2).sum())  # sum_t ||x_t - mean||^2
        return {"l0": self.l0 / n, "explained_variance": 1 - self.err / variance,
                "explained_variance_legacy": self.legacy / n, "mse": self.err / n / mean.numel(),
                "l2_error": self.err / n, "cosine": self.cos / n, "frequency": (self.fired / n).float()}


def _nanmean(t: torch.Tensor) -> float:
    return float(t[~t.isnan()].double().mean())


def _capture(store: dict):
    def fn(tensor, hook):
        store[hook.name] = tensor.detach()
    fn.read_only = True
    return fn


def _splice_hooks(sae, keep: torch.Tensor) -> list:
    """Plain hooks that write the dictionary's reconstruction (no error term) where `keep` [batch, pos] is true."""
    cfg = sae.cfg
    seen: dict = {}

    def replace(tensor, hook):
        x = seen.get("x", tensor)
        recons = sae.decode(sae.encode(x), x).to(tensor.dtype)
        recons = recons.reshape(tensor.shape)  # hook_z dictionaries write [..., heads, d_head] back
        mask = keep.reshape(keep.shape + (1,) * (tensor.dim() - keep.dim()))
        return torch.where(mask, recons, tensor)

    if not cfg.is_transcoder:
        return [(cfg.hook_name, replace)]

    def read(tensor, hook):
        seen["x"] = tensor
    read.read_only = True
    return [(cfg.hook_name, read), (cfg.out_hook_name, replace)]


def _zero_hook(keep: torch.Tensor):
    def zero(tensor, hook):
        mask = keep.reshape(keep.shape + (1,) * (tensor.dim() - keep.dim()))
        return torch.where(mask, torch.zeros_like(tensor), tensor)
    return zero


def _tokens(model, inputs, seq_len: int, n_sequences: int, skip_sequences: int) -> torch.Tensor:
    """[n, seq_len] int64 token ids to evaluate on."""
    from interp.collect.dataset import ActivationDataset

    if isinstance(inputs, ActivationDataset):
        return inputs.tokens()[skip_sequences:skip_sequences + n_sequences]
    if isinstance(inputs, (torch.Tensor, np.ndarray)) and np.issubdtype(np.asarray(inputs).dtype, np.integer) \
            and np.asarray(inputs).ndim == 2:
        return torch.as_tensor(np.asarray(inputs)).long()[skip_sequences:skip_sequences + n_sequences]
    from interp.collect.corpus import load_corpus
    from interp.collect.packing import document_ids, pack

    corpus = load_corpus(inputs)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None and not corpus.is_tokens:
        raise ValueError("the model has no tokenizer to read text with: pass token ids [n_sequences, seq_len]")
    rows = pack(document_ids(corpus, tokenizer), seq_len, _bos(model), skip_sequences + n_sequences)
    if len(rows) <= skip_sequences:
        raise ValueError(f"the corpus packs into {len(rows)} sequences of {seq_len}, none left after skipping "
                         f"{skip_sequences}: skip fewer, or give more text")
    return torch.from_numpy(rows[skip_sequences:]).long()


def _bos(model) -> int | None:
    from interp.tokens import bos_id

    tokenizer = getattr(model, "tokenizer", None)
    return bos_id(tokenizer) if tokenizer is not None else getattr(model.cfg, "bos_token_id", None)
