"""Do a word's vectors sort by sense? Similarity within and between senses, nearest-centroid
accuracy (Coenen, Reif et al. 2019) and linear probes with a shuffled-label control, per layer.

Ties count fractionally: if the held-out vector is equally close to k centroids, one of
which is right, it scores 1/k (the expected accuracy of breaking the tie at random). That
is what makes SmolLM2's layer 0 score chance: RoPE leaves every context's static vector
the same, so every centroid is the same vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from interp.shift.geometry import pairwise_cosine
from interp.shift.trace import WordTrace


def sense_similarity(trace: WordTrace) -> tuple[torch.Tensor, torch.Tensor]:
    """(within, between): mean cosine over pairs of distinct contexts of the same / of different senses, [L + 1] each."""
    y = trace.label_index()
    sim = pairwise_cosine(trace).double()  # [L + 1, n, n]
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool)
    if not (same & off).any() or not (~same).any():
        raise ValueError("within/between similarity needs a sense with 2 contexts and at least 2 senses")
    return sim[:, same & off].mean(-1).float(), sim[:, ~same].mean(-1).float()


def _scores(v: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """Closeness of vectors [..., d] to centroids [..., k, d] (higher = closer): [..., k]."""
    if metric == "cosine":
        return (F.normalize(v, dim=-1)[..., None, :] * F.normalize(centroids, dim=-1)).sum(-1)
    if metric == "euclidean":
        return -(v[..., None, :] - centroids).norm(dim=-1)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def centroid_accuracy(trace: WordTrace, metric: str = "cosine", rtol: float = 1e-9) -> torch.Tensor:
    """Leave-one-out nearest-sense-centroid accuracy at each layer, [L + 1] (ties share credit)."""
    y = trace.label_index()
    k = int(y.max()) + 1
    onehot = F.one_hot(y, k).double()  # [n, k]
    counts = onehot.sum(0)
    if (counts < 2).any():
        raise ValueError("leave-one-out needs at least 2 contexts of every sense")
    v = trace.vectors.double().transpose(0, 1)  # [L + 1, n, d]
    sums = torch.einsum("nk,lnd->lkd", onehot, v)  # [L + 1, k, d]
    # Each context's centroids without it: its own sense's sum minus itself, over count - 1.
    loo = sums[:, None].expand(-1, len(y), -1, -1).clone()  # [L + 1, n, k, d]
    loo[:, torch.arange(len(y)), y] -= v
    loo = loo / (counts[None, None, :, None] - onehot[None, :, :, None])
    scores = _scores(v, loo, metric)  # [L + 1, n, k]
    best = scores.max(-1, keepdim=True).values
    tied = (scores >= best - rtol * best.abs().clamp_min(1e-12))
    credit = tied.gather(-1, y[None, :, None].expand(scores.shape[0], -1, 1))[..., 0] / tied.sum(-1)
    return credit.mean(-1).float()


@dataclass
class ProbeScores:
    """Cross-validated linear-probe accuracy per layer [L + 1], and the same probe on shuffled labels."""

    accuracy: torch.Tensor
    control: torch.Tensor
    chance: float
    folds: int


def _newton_logistic(Z: torch.Tensor, y: torch.Tensor, k: int, l2: float, max_iter: int) -> torch.Tensor:
    """Batched damped Newton for mean CE(Z beta + b) + l2/2 ||beta||^2; Z [B, n, r], y [B, n] -> [B, r + 1, k].

    The problems are small (r + 1) k unknowns each, so exact Hessians [B, (r+1)k, (r+1)k] are
    cheap, and Newton with Armijo backtracking converges in a few dozen vectorised steps
    (L-BFGS needs thousands of tiny, unvectorised ones). The bias is unpenalised and softmax
    ignores a shift shared by all classes: a 1e-9 ridge keeps the Hessian invertible there
    without moving the optimum.
    """
    B, n, r = Z.shape
    Zt = torch.cat([Z, torch.ones(B, n, 1, dtype=Z.dtype)], dim=-1)  # [B, n, r + 1]
    Y = F.one_hot(y, k).to(Z.dtype)  # [B, n, k]
    penalty = torch.ones(r + 1, k, dtype=Z.dtype)
    penalty[-1] = 0  # no penalty on the bias
    theta = torch.zeros(B, r + 1, k, dtype=Z.dtype)

    def loss(th):
        logits = Zt @ th
        return (torch.logsumexp(logits, -1) - (logits * Y).sum(-1)).mean(-1) + 0.5 * l2 * (penalty * th * th).sum((1, 2))

    eye = torch.eye((r + 1) * k, dtype=Z.dtype)
    ridge = (l2 * penalty + 1e-9).flatten()
    current = loss(theta)
    for _ in range(max_iter):
        P = torch.softmax(Zt @ theta, -1)  # [B, n, k]
        grad = Zt.transpose(1, 2) @ (P - Y) / n + l2 * penalty * theta  # [B, r + 1, k]
        if float(grad.abs().max()) < 1e-10:
            break
        # H[(a, c), (e, d)] = mean_i z_ia z_ie (p_ic [c = d] - p_ic p_id), plus the ridge
        cov = torch.diag_embed(P) - P[..., :, None] * P[..., None, :]  # [B, n, k, k]
        outer = (Zt[..., :, None] * Zt[..., None, :]).reshape(B, n, -1)  # [B, n, (r + 1)^2]
        H = (outer.transpose(1, 2) @ cov.reshape(B, n, -1) / n).reshape(B, r + 1, r + 1, k, k)
        H = H.permute(0, 1, 3, 2, 4).reshape(B, (r + 1) * k, (r + 1) * k)
        H = H + eye * ridge
        step = torch.linalg.solve(H, grad.reshape(B, -1)).reshape(B, r + 1, k)
        t = torch.ones(B, 1, 1, dtype=Z.dtype)
        slope = (grad * step).sum((1, 2))
        for _ in range(40):  # Armijo backtracking, per problem
            trial = loss(theta - t * step)
            # float64 rounding of a converged problem's loss must not block the others
            ok = trial <= current - 1e-4 * t[:, 0, 0] * slope + 1e-13 * (1 + current.abs())
            if bool(ok.all()):
                break
            t = torch.where(ok[:, None, None], t, t / 2)
        theta = theta - t * step
        current = loss(theta)
    return theta


def fit_span_logistic(X: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-2, max_iter: int = 100):
    """Many L2-regularised multinomial logistic regressions at once, each solved in its rows' span.

    X [B, n, d], y [B, n]: B independent problems (layers, label sets) on standardised features.
    The minimiser of mean CE(Xs W + b) + l2/2 ||W||^2 lies in the span of the rows of Xs (a
    component orthogonal to them changes no logit, only the penalty), so with Xs = U S V^T and
    W = V beta the problem has n unknowns per class instead of d, the same optimum and the
    same conditioning; all B are solved together by batched Newton steps (`_newton_logistic`),
    which is what makes a probe per layer and per fold cheap.
    Returns predict(X_new [B, m, d]) -> [B, m] class indices.
    """
    X = X.double()
    mean, std = X.mean(1, keepdim=True), X.std(1, unbiased=False, keepdim=True)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))  # constant features stay 0
    Xs = (X - mean) / std
    # Xs = U S V^T from the n x n Gram matrix (cheaper than an SVD of [n, d]); zero singular
    # values give zero columns of Z and zero rows of V^T: harmless.
    evals, U = torch.linalg.eigh(Xs @ Xs.transpose(1, 2))  # [B, n], [B, n, n]
    S = evals.clamp_min(0).sqrt()
    Z = U * S[:, None, :]  # [B, n, r]: the rows' coordinates in the span
    inv = torch.where(S > 1e-10 * S.amax(-1, keepdim=True).clamp_min(1e-300), 1 / S.clamp_min(1e-300), 0)
    Vh = (Xs.transpose(1, 2) @ U * inv[:, None, :]).transpose(1, 2)  # [B, r, d]
    theta = _newton_logistic(Z, y, n_classes, l2, max_iter)  # [B, r + 1, k]: beta, then the bias row
    beta, bias = theta[:, :-1], theta[:, -1:]
    W = Vh.transpose(1, 2) @ beta  # [B, d, k]

    def predict(X_new: torch.Tensor) -> torch.Tensor:
        return (((X_new.double() - mean) / std) @ W + bias).argmax(-1)

    predict.W, predict.b = W, bias[:, 0]
    return predict


def control_labels(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random labels independent of the senses: each sense's contexts get the labels in equal shares.

    A plain permutation of a few dozen labels often agrees with the senses well above chance,
    and a probe that finds the senses then scores above chance on the "control" too.
    """
    k = int(y.max()) + 1
    out = torch.empty_like(y)
    start = 0
    for c in range(k):
        members = (y == c).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=g)]
        out[members] = (torch.arange(len(members)) + start) % k  # a rotating start spreads the remainders
        start += len(members)
    return out


def probe_accuracy(trace: WordTrace, folds: int = 4, l2: float = 1e-2, seed: int = 0) -> ProbeScores:
    """Stratified k-fold logistic-regression accuracy per layer; control: the same probe on labels that
    are random but balanced within each sense (see `control_labels`), scored the same way."""
    y = trace.label_index()
    k = int(y.max()) + 1
    counts = torch.bincount(y, minlength=k)
    if folds < 2 or counts.min() < folds:
        raise ValueError(f"{folds}-fold probes need at least {folds} contexts of every sense (fewest: {int(counts.min())})")
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(y), dtype=torch.long)
    for c in range(k):  # deal each sense's contexts round-robin into folds, in random order
        members = (y == c).nonzero()[:, 0]
        fold_of[members[torch.randperm(len(members), generator=g)]] = torch.arange(len(members)) % folds
    y_control = control_labels(y, g)
    X = trace.vectors.transpose(0, 1).double()  # [L + 1, n, d]
    n_layers = X.shape[0]
    right = torch.zeros(2, n_layers)
    for f in range(folds):  # every layer, real and shuffled labels: one batch of 2 (L + 1) problems
        test = fold_of == f
        Xf = torch.cat([X[:, ~test], X[:, ~test]])  # [2 (L + 1), n_train, d]
        yf = torch.cat([y[~test].expand(n_layers, -1), y_control[~test].expand(n_layers, -1)])
        predict = fit_span_logistic(Xf, yf, k, l2)
        truth = torch.cat([y[test].expand(n_layers, -1), y_control[test].expand(n_layers, -1)])
        got = predict(torch.cat([X[:, test], X[:, test]]))
        right += (got == truth).sum(-1).view(2, n_layers)
    acc, ctl = right / len(y)
    return ProbeScores(acc, ctl, float(counts.max()) / len(y), folds)


def trajectories(trace: WordTrace) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D PCA coordinates of every context's vector at every layer, [n, L + 1, 2], and the variance share of the 2 axes.

    Vectors are unit-normalised and centred per layer first: layers differ in norm by orders
    of magnitude, and centring shows how contexts separate rather than the drift they share.
    """
    v = F.normalize(trace.vectors.double(), dim=-1)
    v = v - v.mean(0, keepdim=True)  # [n, L + 1, d]
    flat = v.reshape(-1, v.shape[-1])  # [n (L + 1), d]
    # The principal axes from the d x d scatter matrix (LAPACK's SVD of the tall matrix is
    # erratic under thread contention here: 0.7 s to 90 s).
    evals, evecs = torch.linalg.eigh(flat.T @ flat)
    axes = evecs[:, -2:].flip(-1)  # the two largest, largest first
    coords = (flat @ axes).reshape(v.shape[0], v.shape[1], 2)
    share = evals[-2:].flip(0).clamp_min(0) / evals.clamp_min(0).sum().clamp_min(1e-300)
    return coords.float(), share.float()
