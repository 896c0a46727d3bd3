"""In-context learning on repeated random tokens: the loss on each repeat, per position.

A model that can use its context predicts the second copy of a random segment far better
than the first (which is unpredictable: about ln(d_vocab) nats). The score, after
Olsson et al. (2022), is the mean loss on the last repeat minus that on the first pass:
negative when the model learns in context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.probing.detectors import repeated_random_tokens


@dataclass
class ICLResult:
    model_name: str
    seq_len: int
    n_repeats: int
    loss_per_position: torch.Tensor  # [n_repeats * seq_len - 1]: loss predicting token t+1 of the repeats
    loss_per_repeat: torch.Tensor  # [n_repeats]: mean loss within each copy (the first copy's first token excluded)
    loss_std_per_repeat: torch.Tensor  # [n_repeats]: spread over examples

    @property
    def score(self) -> float:
        """Mean loss on the last repeat minus on the first pass (nats; negative = in-context learning)."""
        return float(self.loss_per_repeat[-1] - self.loss_per_repeat[0])

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"position": range(1, len(self.loss_per_position) + 1),
                             "repeat": [(i + 1) // self.seq_len for i in range(len(self.loss_per_position))],
                             "loss": self.loss_per_position.tolist()})

    def plot(self):
        """The loss at each position of the repeated sequence -> `Figure`."""
        from interp.plots import line_chart

        n = len(self.loss_per_position)
        return line_chart({self.model_name: self.loss_per_position.tolist()}, x=range(1, n + 1), x_label="position",
                          y_label="loss (nats)",
                          title=f"next-token loss on {self.n_repeats} copies of {self.seq_len} random tokens")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


def is_language_model(model) -> bool:
    """A causal model that predicts next tokens (ours: with an unembedding; attached: with an LM head)."""
    if hasattr(model, "is_language_model"):
        return bool(model.is_language_model)
    return bool(model.cfg.causal) and getattr(model, "unembed", None) is not None


def in_context_learning(model, seq_len: int = 50, n_repeats: int = 2, batch: int = 16, seed: int = 0) -> ICLResult:
    """Per-position next-token loss on BOS + `seq_len` random tokens repeated `n_repeats` times."""
    if not is_language_model(model):
        raise ValueError(f"in-context learning needs a causal language model; {model.cfg.model_name} is not one")
    tokens = repeated_random_tokens(model, seq_len, n_repeats, batch, seed)
    with torch.no_grad():
        if hasattr(model, "unembed"):
            loss = model(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
        else:  # an attached model: from its logits
            from interp.patching.engine import as_logits

            logp = as_logits(model(tokens)).float().log_softmax(-1)[:, :-1]
            loss = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    # Entry j predicts token j + 1; drop j = 0 (predicting the first random token from BOS alone).
    loss = loss[:, 1:].float().cpu()  # [batch, n_repeats * seq_len - 1]
    per_copy = torch.stack([loss[:, max(0, r * seq_len - 1): (r + 1) * seq_len - 1].mean(-1) for r in range(n_repeats)], 1)
    return ICLResult(model.cfg.model_name, seq_len, n_repeats, loss.mean(0), per_copy.mean(0), per_copy.std(0))
