"""The arithmetic of training a sparse dictionary: initialisation, one step's forward and losses, the schedules.

Conventions are SAELens 6.54's (sae_lens/saes/*_sae.py, training/*.py), learnt from its source:

- loss = sum over features of (x_hat - x)^2, mean over tokens ("mse_loss"), plus per architecture:
  relu: l1_coefficient * mean_t sum_i f_i ||W_dec[i]|| (the L1 weighted by decoder norm);
  jumprelu: l0_coefficient * mean_t sum_i H(pre_i - theta_i), H a step whose threshold gradient is the
  rectangle-kernel straight-through estimator of bandwidth eps (DeepMind's JumpReLU), the threshold a
  plain parameter kept >= 0 (SAELens 6.54 no longer trains log theta);
  topk / batchtopk: aux_coefficient * min(n_dead / k_aux, 1) * mean_t ||W_dec^T z_aux - (x - x_hat)||^2, z_aux
  the top k_aux = d_out // 2 pre-activations among dead latents (no ReLU, no b_dec: Gao et al. A.2),
  the residual detached.
- Decoder convention: topk and batchtopk keep every decoder row at unit norm (the gradient's component
  along each row is removed before the step and rows are renormalised after it, as Gao et al. and
  sparsify do). SAELens 6 gets the same function class differently (`rescale_acts_by_decoder_norm`:
  the forward divides by ||W_dec[i]||, and saving folds the norms); a unit-norm decoder needs no folding
  and keeps the activations in the units they are read in. relu and jumprelu leave the decoder free.
- TopK and BatchTopK are computed sparsely: the dense encoder product picks the latents, and everything
  after it (decoder, its gradient, the encoder's gradient) touches only the k chosen per token. That is
  the speed-up over SAELens's dense masks (see benchmarks/sae_train.py).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------- schedules


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate of step `step` (0-based) over the base rate: SAELens's "constant" schedule with
    warm-up (linear from 1/warmup to 1 over the first warmup steps) and decay (linear from 1 towards 0 over
    the last decay_steps: the last step trains at 1/decay_steps). A pure function of the step, so a
    resumed run needs no scheduler state beyond the step."""
    if warmup_steps and step < warmup_steps:
        return 1 / warmup_steps + (1 - 1 / warmup_steps) * step / max(warmup_steps - 1, 1)
    if decay_steps and step >= total_steps - decay_steps:
        return 1 - (step - (total_steps - decay_steps)) / decay_steps
    return 1.0


def coefficient(step: int, final: float, warmup_steps: int) -> float:
    """A sparsity coefficient warmed up linearly from 0 (SAELens's CoefficientScheduler)."""
    return final * min(step, warmup_steps) / warmup_steps if warmup_steps else final


# ---------------------------------------------------------------------- initialisation


@torch.no_grad()
def initialise(sae, generator: torch.Generator, decoder_init_norm: float, unit_decoder: bool) -> None:
    """SAELens's initialisation: W_dec rows kaiming-uniform then scaled to norm `decoder_init_norm`, W_enc =
    W_dec^T, biases 0. With a unit-norm decoder the rows are 1 and W_enc = decoder_init_norm * W_dec^T, which
    keeps SAELens's encoder scale. A transcoder's encoder cannot be W_dec^T (another space): its columns are
    independent random directions of the same norm. W_skip starts at 0 (SAELens's SkipTranscoder)."""
    d_sae, d_out = sae.W_dec.shape
    bound = math.sqrt(6 / d_out)  # nn.init.kaiming_uniform_ on [d_sae, d_out], drawn from our generator
    W_dec = torch.empty(d_sae, d_out).uniform_(-bound, bound, generator=generator)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    sae.W_dec.copy_(W_dec if unit_decoder else W_dec * decoder_init_norm)
    if sae.cfg.is_transcoder:
        W_enc = torch.empty(sae.W_enc.shape).uniform_(-1, 1, generator=generator)
        sae.W_enc.copy_(W_enc / W_enc.norm(dim=0, keepdim=True) * decoder_init_norm)
    else:
        sae.W_enc.copy_(W_dec.T * decoder_init_norm)
    sae.b_enc.zero_()
    sae.b_dec.zero_()
    if getattr(sae, "W_skip", None) is not None:
        sae.W_skip.zero_()


def project_decoder_grad(W_dec: torch.Tensor) -> None:
    """Remove from W_dec.grad its component along each (unit) row, so a step moves rows tangentially."""
    if W_dec.grad is not None:
        along = torch.linalg.vecdot(W_dec.grad, W_dec).unsqueeze(-1)
        W_dec.grad.addcmul_(along, W_dec, value=-1)


@torch.no_grad()
def renormalise_decoder(W_dec: torch.Tensor) -> None:
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def fold_decoder_norms(sae) -> torch.Tensor:
    """W_dec rows to unit norm, their norms into W_enc's columns and b_enc (SAELens's fold when saving a TopK SAE
    trained with rescaled activations): pre-activations become pre * ||W_dec[i]||, what training ranked by.
    Returns the norms."""
    norms = sae.W_dec.norm(dim=-1)
    sae.W_dec /= norms[:, None]
    sae.W_enc *= norms
    sae.b_enc *= norms
    return norms


# ---------------------------------------------------------------------- sparse latents


class Latents:
    """Selected (token, latent) pairs of a batch, row-major: rows [nnz] ascending, cols [nnz], and
    row_ptr [B + 1] (CSR over tokens). Grouping by latent (for the weight gradients) is computed once."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_latents: int) -> None:
        self.rows, self.cols, self.n_rows, self.n_latents = rows, cols, n_rows, n_latents
        self.row_ptr = _pointers(rows, n_rows)
        self._by_latent = None

    @classmethod
    def per_row(cls, indices: torch.Tensor, n_latents: int) -> "Latents":
        """From [B, k] latent indices (TopK: k per token)."""
        B, k = indices.shape
        rows = torch.arange(B, device=indices.device).repeat_interleave(k)
        return cls(rows, indices.reshape(-1), B, n_latents)

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, rows in that order, latent_ptr [d_sae + 1]): the pairs grouped by latent."""
        if self._by_latent is None:
            order = _stable_argsort(self.cols)  # rows stay ascending inside each latent
            self._by_latent = (order, self.rows[order], _pointers(self.cols[order], self.n_latents))
        return self._by_latent

    def counts(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """[d_sae]: tokens each latent was selected for (where `values` > 0, if given)."""
        cols = self.cols if values is None else self.cols[values > 0]
        return torch.bincount(cols, minlength=self.n_latents)


def _stable_argsort(ids: torch.Tensor) -> torch.Tensor:
    """torch.argsort(ids, stable=True); on the CPU through numpy, because torch's sort of >= 32768 integers runs
    in parallel and, on a machine whose cores are busy, waits ~100x longer for its threads than it computes."""
    if ids.device.type != "cpu":
        return torch.argsort(ids, stable=True)
    return torch.from_numpy(np.argsort(ids.numpy(), kind="stable"))


def _pointers(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    ptr = torch.zeros(n + 1, dtype=torch.long, device=sorted_ids.device)
    ptr[1:] = torch.bincount(sorted_ids, minlength=n).cumsum(0)
    return ptr


def _segment_rows(latents: Latents, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """[d_sae, d]: for each latent, the sum over its pairs of weight * dense[row] (a weight gradient)."""
    order, rows, ptr = latents.by_latent()
    return F.embedding_bag(rows, dense, ptr, per_sample_weights=weights[order], mode="sum", include_last_offset=True)


class _EncodeSelected(torch.autograd.Function):
    """The selected pre-activations, values [nnz] = sae_in[rows] . W_enc[:, cols] + b_enc[cols], read off the dense
    product computed without a graph; the backward touches only the selected pairs. sae_in = x - b_dec when b_dec
    is given (then d/d b_dec = -W_enc @ d/d b_enc: every pair of latent i pulls b_dec along -W_enc[:, i])."""

    @staticmethod
    def forward(ctx, values, sae_in, W_enc, b_enc, b_dec, latents):
        ctx.save_for_backward(sae_in, W_enc)
        ctx.latents = latents
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        sae_in, W_enc = ctx.saved_tensors
        lat = ctx.latents
        grad_W_enc = grad_b_dec = None
        if ctx.needs_input_grad[2]:  # [d_sae, d_in] transposed: the layout the trainer keeps W_enc in, so no copy
            grad_W_enc = _segment_rows(lat, grad, sae_in).T
        grad_b_enc = torch.zeros(lat.n_latents, dtype=grad.dtype, device=grad.device).index_add_(0, lat.cols, grad)
        if ctx.needs_input_grad[4]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_W_enc, grad_b_enc if ctx.needs_input_grad[3] else None, grad_b_dec, None


class _DecodeSelected(torch.autograd.Function):
    """out[t] = sum over token t's pairs of acts * W_dec[col] ([B, d_out], no bias)."""

    @staticmethod
    def forward(ctx, acts, W_dec, latents):
        ctx.save_for_backward(acts, W_dec)
        ctx.latents = latents
        return F.embedding_bag(latents.cols, W_dec, latents.row_ptr, per_sample_weights=acts, mode="sum",
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, grad):
        acts, W_dec = ctx.saved_tensors
        lat = ctx.latents
        grad_acts = grad_W_dec = None
        if ctx.needs_input_grad[0]:  # grad . W_dec[col] at each pair only (a sampled product, never [B, d_sae])
            with warnings.catch_warnings():  # "sparse CSR support is in beta": what we use of it is tested here
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(lat.row_ptr, lat.cols, torch.zeros_like(acts),
                                                  size=(lat.n_rows, lat.n_latents), check_invariants=False)
            grad_acts = torch.sparse.sampled_addmm(pattern, grad.contiguous(), W_dec.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_W_dec = _segment_rows(lat, acts, grad.contiguous())
        return grad_acts, grad_W_dec, None


def topk_latents(pre: torch.Tensor, k: int) -> tuple[Latents, torch.Tensor]:
    """The k largest pre-activations of each token (SAELens's TopK picks on pre-activations, then ReLUs):
    (latents, their pre-activations [nnz]), latents ascending within each token."""
    top = pre.topk(k, dim=-1, sorted=False)
    indices, order = top.indices.sort(dim=-1)
    return Latents.per_row(indices, pre.shape[-1]), top.values.gather(-1, order).reshape(-1)


def batch_topk_latents(pre: torch.Tensor, k: float) -> tuple[Latents, torch.Tensor]:
    """The k * B largest ReLU'd pre-activations of the whole batch (SAELens's BatchTopK), zeros left out.

    A flat top-(k B) over B x d_sae values is slow on a CPU, so each token's top 2k candidates come first:
    the selection equals the flat one unless some token has every candidate selected, when it is redone
    over all values. Ties at the threshold are all kept."""
    B, m = pre.shape
    n = min(int(k * B), B * m)
    relu = pre.relu()
    for r in (min(m, 2 * math.ceil(k)), min(m, 8 * math.ceil(k)), m):
        cand = relu.topk(r, dim=-1, sorted=False).values
        threshold = cand.flatten().topk(n, sorted=False).values.min()
        chosen = cand >= threshold
        if r == m or not chosen.all(dim=-1).any():
            break
    rows, cols = torch.nonzero((relu >= threshold) & (relu > 0), as_tuple=True)
    return Latents(rows, cols, B, m), pre[rows, cols]


def dead_latents_topk(pre: torch.Tensor, dead: torch.Tensor, k_aux: int) -> tuple[Latents, torch.Tensor]:
    """The k_aux largest pre-activations among dead latents, per token (the aux-k loss's latents), as topk_latents."""
    dead_ids = dead.nonzero().squeeze(1)
    latents, values = topk_latents(pre[:, dead_ids], k_aux)
    latents.cols = dead_ids[latents.cols]  # dead_ids ascend, so the order within a token holds
    latents.n_latents = pre.shape[-1]
    return latents, values


# ---------------------------------------------------------------------- JumpReLU's estimators


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """pre * (pre > theta); d/dpre = the gate, d/dtheta = -(theta / eps) K((pre - theta) / eps), K the rectangle."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return (pre > threshold) * grad, grad_threshold, None


class Step(torch.autograd.Function):
    """H(pre - theta) (the L0 count); only theta gets a gradient: -(1 / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0), None


# ---------------------------------------------------------------------- one step's forward


def training_forward(sae, x: torch.Tensor, target: torch.Tensor, dead: torch.Tensor | None, options,
                     step: int) -> dict:
    """Losses of one batch, in the units training runs in (inputs already normalised).

    x [B, d_in]: the dictionary's input; target [B, d_out]: what it reconstructs (x itself for an SAE).
    dead [d_sae] bool: latents dead so far (for the aux-k loss). Returns {"loss": total (with a graph),
    "mse", parts..., "recons" [B, d_out] (detached), "fired" [d_sae] (tokens each latent was active for),
    "l0" (mean active latents per token), "min_active" (BatchTopK's threshold statistic)}.
    options.topk_decoder == "rescale": SAELens's convention for TopK/BatchTopK, latents picked by pre * ||W_dec[i]||,
    the output sum_i relu(pre_i) W_dec[i] (SAELens's relu(pre n) / n W_dec written out: the norms cancel but in
    the choice), BatchTopK's threshold statistic in the rescaled units; the trainer folds the norms at the end.
    """
    cfg = sae.cfg
    b_dec = sae.b_dec if cfg.apply_b_dec_to_input else None
    out: dict = {}
    if cfg.architecture in ("topk", "batchtopk"):
        with torch.no_grad():
            sae_in = x - b_dec if b_dec is not None else x
            pre = torch.addmm(sae.b_enc, sae_in, sae.W_enc)
            norms = sae.W_dec.norm(dim=-1) if options.topk_decoder == "rescale" else None
        select = topk_latents if cfg.architecture == "topk" else batch_topk_latents
        latents, values = select(pre if norms is None else pre * norms, cfg.k)
        if norms is not None:
            values = pre[latents.rows, latents.cols]
        acts = _EncodeSelected.apply(values, sae_in, sae.W_enc, sae.b_enc, b_dec, latents).relu()
        recons = _DecodeSelected.apply(acts, sae.W_dec, latents) + sae.b_dec
        fired = latents.counts(acts.detach())
        if cfg.architecture == "batchtopk":
            scaled = acts.detach() if norms is None else acts.detach() * norms[latents.cols]
            positive = scaled[scaled > 0]
            out["min_active"] = float(positive.min()) if positive.numel() else None
    else:
        sae_in = x - b_dec if b_dec is not None else x
        pre = torch.addmm(sae.b_enc, sae_in, sae.W_enc)
        if cfg.architecture == "relu":
            acts = pre.relu()
        else:
            acts = JumpReLU.apply(pre, sae.threshold, options.jumprelu_bandwidth)
        recons = acts @ sae.W_dec + sae.b_dec
        fired = (acts.detach() > 0).sum(0)
    if cfg.skip:
        recons = recons + x @ sae.W_skip.T
    mse = (recons - target).pow(2).sum(-1).mean()
    loss = mse
    out.update(mse=float(mse.detach()), fired=fired, l0=float(fired.sum()) / x.shape[0], recons=recons.detach())
    if cfg.architecture == "relu":
        l1 = coefficient(step, options.l1_coefficient, options.sparsity_warmup_steps) * \
            (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        loss = loss + l1
        out["l1_loss"] = float(l1.detach())
    elif cfg.architecture == "jumprelu":
        l0 = coefficient(step, options.l0_coefficient, options.sparsity_warmup_steps) * \
            Step.apply(pre, sae.threshold, options.jumprelu_bandwidth).sum(-1).mean()
        loss = loss + l0
        out["l0_loss"] = float(l0.detach())
    elif dead is not None and options.aux_coefficient:
        aux = aux_k_loss(sae, pre, sae_in, b_dec, dead, (target - recons).detach(), norms)
        if aux is not None:
            loss = loss + options.aux_coefficient * aux
            out["aux_loss"] = float(options.aux_coefficient * aux.detach())
    out["loss"] = loss
    return out


def aux_k_loss(sae, pre: torch.Tensor, sae_in: torch.Tensor, b_dec: torch.Tensor | None, dead: torch.Tensor,
               residual: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor | None:
    """min(n_dead / k_aux, 1) * mean_t ||W_dec^T z_aux - residual||^2 with k_aux = d_out // 2 (Gao et al.;
    SAELens's calculate_topk_aux_loss), z_aux the top k_aux dead pre-activations (no ReLU); None if none is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    k_aux = residual.shape[-1] // 2
    scale = min(n_dead / k_aux, 1.0)
    latents, values = dead_latents_topk(pre if norms is None else pre * norms, dead, min(k_aux, n_dead))
    if norms is not None:  # picked in rescaled units; SAELens's z / ||W_dec|| times W_dec is the raw pre times W_dec
        values = pre[latents.rows, latents.cols]
    z = _EncodeSelected.apply(values, sae_in, sae.W_enc, sae.b_enc, b_dec, latents)
    recons = _DecodeSelected.apply(z, sae.W_dec, latents)
    return scale * (recons - residual).pow(2).sum(-1).mean()
