"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with
the Tuned Lens"): one affine translator per layer, trained so that the model's own head
reads layer l's residual stream as the final layer would:

    logits_l = unembed(ln_final(h + A_l h + b_l))        (A_l, b_l start at 0: the logit lens)

trained to minimise KL(final logits || lens logits) at every position of a corpus, with
the model's weights frozen. The last slot (the output of the last block) has no
translator: its lens is the model's output.

Training is made cheap for a CPU: the residual streams are cached once under no_grad;
the translators then train on mini-batches of cached vectors, the KL's `[tokens, d_vocab]`
tensors taken a chunk of tokens at a time. By default each translator starts from a
least-squares fit (the "linear shortcut" of Din et al. 2023) of the final stream's
direction from layer l's, which gets most of the way in a second; the KL steps then
refine it. `init="identity"` is the paper's start.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from interp.shift.lens import check_lens_model, logit_lens

WEIGHTS, META = "tuned_lens.pt", "tuned_lens.json"


class TunedLens(nn.Module):
    """`lens(resid [..., d_model], layer) -> logits [..., d_vocab]`; `layer` indexes the
    residual stream as `trace_word` does (0 = what block 0 reads, n_layers = the output)."""

    name = "tuned"

    def __init__(self, model) -> None:
        super().__init__()
        check_lens_model(model)
        cfg = model.cfg
        self.model_name, self.d_model, self.n_layers = str(cfg.model_name), int(cfg.d_model), int(cfg.n_layers)
        W = model.unembed.W_U
        self.translators = nn.ModuleList(nn.Linear(self.d_model, self.d_model) for _ in range(self.n_layers))
        with torch.no_grad():
            for t in self.translators:  # A = 0, b = 0: h + A h + b = h, the logit lens
                t.weight.zero_()
                t.bias.zero_()
        self.to(device=W.device, dtype=W.dtype)
        self.info: dict = {}  # how it was trained (saved with it)
        object.__setattr__(self, "model", model)  # a reference, not a submodule: not in state_dict

    def translate(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """`h + A_l h + b_l`, `[..., d_model]`; the identity at the last slot."""
        layer = layer % (self.n_layers + 1) if layer < 0 else layer
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.n_layers}")
        w = self.translators[0].weight
        resid = resid.to(device=w.device, dtype=w.dtype)
        return resid if layer == self.n_layers else resid + self.translators[layer](resid)

    def forward(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        return logit_lens(self.model, self.translate(resid, layer))

    # ------------------------------------------------------------------ files
    def save(self, directory) -> Path:
        """`directory/tuned_lens.pt` (translator weights) and `tuned_lens.json` (model name, shapes, training)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, directory / WEIGHTS)
        meta = {"format": 1, "model_name": self.model_name, "d_model": self.d_model, "n_layers": self.n_layers,
                "training": self.info}
        (directory / META).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory, model) -> "TunedLens":
        """Load translators saved by `save` onto `model`; refuse a model of another shape."""
        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        cfg = model.cfg
        if (meta["d_model"], meta["n_layers"]) != (cfg.d_model, cfg.n_layers):
            raise ValueError(
                f"the tuned lens in {directory} was trained on {meta['model_name']} (n_layers={meta['n_layers']}, "
                f"d_model={meta['d_model']}); {cfg.model_name} has n_layers={cfg.n_layers}, d_model={cfg.d_model}"
            )
        lens = cls(model)
        lens.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
        lens.info = meta.get("training", {})
        return lens.requires_grad_(False)


# ---------------------------------------------------------------------- corpus and streams
def generate_corpus(model, prompts: list[str], n_tokens: int = 4000, seed: int = 0, temperature: float = 1.0,
                    max_rounds: int = 8) -> list[str]:
    """Texts sampled from the model itself (prompt + continuation) until they hold >= `n_tokens`.

    A lens trained on the model's own samples sees the distribution it will read. Uses
    `model.generate` (sampling, seeded); each round continues every prompt once more.
    """
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"{type(model).__name__} has no generate(); pass your own texts to train_tuned_lens")
    texts, total, per_prompt = [], 0, max(1, math.ceil(n_tokens / len(prompts)))
    budget = min(per_prompt, model.cfg.n_ctx - max(model.to_tokens(p).shape[-1] for p in prompts))
    for r in range(max_rounds):
        out = model.generate(list(prompts), max_new_tokens=budget, do_sample=True, temperature=temperature,
                             seed=seed + r, return_type="str")
        for text in out:
            texts.append(text)
            total += model.to_tokens(text, truncate=True).shape[-1]
        if total >= n_tokens:
            break
    return texts


def residual_streams(model, texts: list, max_seq_len: int = 128, skip_first: bool = True) -> torch.Tensor:
    """Every layer's stream at every position of `texts`: `[n_tokens, n_layers + 1, d_model]`.

    Each item is a string or a sequence of token ids (e.g. random tokens for a random model).
    `skip_first` leaves out position 0 of each text: it sees only itself, and many models
    park huge "attention sink" activations there.
    """
    n = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    chunks = []
    with torch.no_grad():
        for text in texts:
            tokens = model.to_tokens(text, truncate=True) if isinstance(text, str) else \
                torch.as_tensor(text, device=model.W_E.device).reshape(1, -1)
            tokens = tokens[:, :max_seq_len]
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names, return_type=None)
            stream = torch.stack([cache[name][0] for name in names], dim=1)  # [pos, n_layers + 1, d_model]
            chunks.append(stream[1:] if skip_first else stream)
    return torch.cat(chunks).float()


def _kl_terms(model, lens, streams: torch.Tensor, layers, chunk: int):
    """Yield (layer, KL summed over a chunk of tokens, n tokens) of final || lens; the graph
    stays alive for the translators' gradients, so the caller backpropagates each one."""
    n = model.cfg.n_layers
    for start in range(0, streams.shape[0], chunk):
        part = streams[start:start + chunk]
        with torch.no_grad():
            target = logit_lens(model, part[:, n]).float().log_softmax(-1)  # [chunk, d_vocab]
            p = target.exp()
            neg_entropy = (p * target).sum()
        for l in layers:
            logits = logit_lens(model, part[:, l]) if lens is None else lens(part[:, l], l)
            yield l, neg_entropy - (p * logits.float().log_softmax(-1)).sum(), part.shape[0]


def lens_kl(model, streams: torch.Tensor, lens=None, chunk: int = 256) -> torch.Tensor:
    """Mean KL(final || lens) in nats at every slot, `[n_layers + 1]` (0 at the last), on
    streams from `residual_streams` (held-out text, to judge a tuned lens)."""
    n = model.cfg.n_layers
    total = torch.zeros(n + 1, dtype=torch.float64)
    with torch.no_grad():
        for l, kl, _ in _kl_terms(model, lens, streams, range(n + 1), chunk):
            total[l] += float(kl)
    return total / streams.shape[0]


# ---------------------------------------------------------------------- training
def _least_squares_init(lens: TunedLens, streams: torch.Tensor, ridge: float) -> None:
    """Fit h + A h + b to the final stream's direction, per layer, in closed form.

    The final norm ignores a vector's scale, so each token's target is the final stream
    rescaled to the input's RMS, and each token is weighted by 1 / RMS^2: every token
    counts by its direction, not by the size of its (sometimes huge) activations.
    """
    n, d = lens.n_layers, lens.d_model
    y = streams[:, n] / streams[:, n].pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    for l in range(n):
        h = streams[:, l].double()
        r = h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
        X = torch.cat([h / r, 1 / r], dim=-1)  # [n_tokens, d + 1]
        Y = y.double() - h / r  # what A h + b must add, per unit of input RMS
        G = X.T @ X
        G += ridge * G.diagonal().mean() * torch.eye(d + 1, dtype=G.dtype, device=G.device)
        M = torch.linalg.solve(G, X.T @ Y)  # [d + 1, d]
        with torch.no_grad():
            lens.translators[l].weight.copy_(M[:d].T)
            lens.translators[l].bias.copy_(M[d])


DEFAULT_DOCUMENTS = 64  # Wikipedia summaries, ~128 tokens each at max_seq_len: ~8k positions


def train_tuned_lens(model, texts: list | None = None, *, streams: torch.Tensor | None = None,
                     steps: int = 12, lr: float = 1e-4, batch_tokens: int = 64, max_seq_len: int = 128,
                     init: str = "least_squares", ridge: float = 1e-2, chunk: int = 64, seed: int = 0,
                     verbose: bool = False) -> TunedLens:
    """Train a `TunedLens` on `texts` (or precomputed `streams` from `residual_streams`); with neither, on
    the toolkit's default real text, the first `DEFAULT_DOCUMENTS` English Wikipedia summaries
    (interp.collect.default_corpus).

    Each step draws `batch_tokens` cached positions and updates every translator on
    KL(final || lens) with Adam; only the translators have gradients. `init` is
    "least_squares" (closed-form warm start, see `_least_squares_init`) or "identity".
    The default lr suits the warm start (SmolLM2: held-out KL 2.26 nats after the fit,
    2.00 after 12 steps); from the identity, use ~1e-2 and many more steps.
    """
    if init not in ("least_squares", "identity"):
        raise ValueError(f"init must be 'least_squares' or 'identity', got {init!r}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    lens = TunedLens(model)
    if streams is None:
        if texts is None:
            from interp.collect import default_corpus

            texts = list(default_corpus().texts[:DEFAULT_DOCUMENTS])
        if not texts:
            raise ValueError("train_tuned_lens needs texts or streams (an empty list was given)")
        streams = residual_streams(model, texts, max_seq_len=max_seq_len)
    streams = streams.to(lens.translators[0].weight.device)
    n_tokens, n = streams.shape[0], lens.n_layers
    if init == "least_squares":
        _least_squares_init(lens, streams, ridge)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(n_tokens, (min(batch_tokens, n_tokens),), generator=gen)
        batch = streams[idx]
        opt.zero_grad()
        total = 0.0
        for _, kl, _ in _kl_terms(model, lens, batch, range(n), chunk):
            loss = kl / (batch.shape[0] * n)  # mean over tokens and layers
            loss.backward()  # one [chunk, d_vocab] graph at a time
            total += float(loss.detach())
        opt.step()
        losses.append(total)
        if verbose and (step % 10 == 0 or step == steps - 1):
            print(f"step {step}: mean KL {total:.4f} nats ({time.perf_counter() - t0:.1f}s)")
    lens.info = {"n_tokens": n_tokens, "steps": steps, "lr": lr, "batch_tokens": batch_tokens, "init": init,
                 "seed": seed, "final_loss": losses[-1] if losses else None,
                 "seconds": round(time.perf_counter() - t0, 2)}
    return lens.requires_grad_(False)
