"""The runs a patching experiment compares: clean, corrupted (or ablated), and their caches.

Corruptions: a corrupted prompt of the same length (symmetric token replacement), or
Gaussian noise on chosen token embeddings (Zhang & Nanda 2023: std = 3 x the embedding
std). Ablations replace a site's activation by zero, its mean over a dataset, or its
value on another prompt (resample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.positions import SelectorSpec, TokenizedPrompt, as_selector


class PromptLengthError(ValueError):
    """Prompts that must line up position by position do not have the same number of tokens."""


def as_tokens(model, prompts, what: str = "prompts", prepend_bos: bool | None = None) -> torch.Tensor:
    """[n, pos] token ids for strings (all the same length, no padding) or ids."""
    if isinstance(prompts, torch.Tensor):
        t = prompts
        return (t[None] if t.dim() == 1 else t).to(model.device)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not hasattr(model, "tokenize"):
        raise TypeError(f"{type(model).__name__} has no tokenizer of its own: give {what} as token ids [n, pos]")
    rows = [model.tokenize(p, prepend_bos=prepend_bos).tokens[0] for p in prompts]
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        detail = ", ".join(f"{p!r}: {len(r)}" for p, r in list(zip(prompts, rows))[:6])
        raise PromptLengthError(f"{what} must all have the same number of tokens to be patched position by "
                                f"position; got {detail}. Reword them, or run groups of equal length separately")
    return torch.stack(rows).to(model.device)


def check_pairs(clean: torch.Tensor, corrupted: torch.Tensor, model) -> None:
    if clean.shape != corrupted.shape:
        raise PromptLengthError(
            f"clean and corrupted prompts differ in length: clean {tuple(clean.shape)} vs corrupted "
            f"{tuple(corrupted.shape)} (prompts x tokens). Patching swaps activations position by position, so each "
            "corrupted prompt must tokenize to as many tokens as its clean prompt (e.g. swap names of one token each)"
        )


@dataclass
class GaussianNoise:
    """Noise added to the embeddings of the positions `positions` selects (the subject, typically)."""

    positions: SelectorSpec
    scale: float = 3.0  # in units of the embedding matrix's std
    seed: int = 0
    std: float | None = None  # absolute std; default: scale x W_E.std()

    def sample(self, model, prompts: list, tokens: torch.Tensor, prepend_bos: bool | None = None) -> torch.Tensor:
        """The noise added to each prompt's embeddings [n_prompts, pos, d_model] (zero off the chosen positions)."""
        select = as_selector(self.positions)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            for p in select(TokenizedPrompt.from_model(model, prompt, prepend_bos)):
                mask[i, p] = True
        std = self.std if self.std is not None else self.scale * float(model.W_E.detach().float().std())
        g = torch.Generator().manual_seed(self.seed)
        if not mask.any():
            raise ValueError(f"the noise positions {self.positions!r} select no token in any prompt")
        return torch.randn(*tokens.shape, model.cfg.d_model, generator=g) * std * mask[..., None]


@dataclass
class Run:
    """A run of the experiment: its tokens and, for noise corruption, what is added to its embeddings."""

    tokens: torch.Tensor  # [n, pos]
    embed_noise: torch.Tensor | None = None  # [n, pos, d_model]

    @property
    def hooks(self) -> list:
        return self.hooks_for(None)

    def hooks_for(self, prompt: torch.Tensor | None) -> list:
        """Hooks that make a batch of rows (row r is prompt `prompt[r]`; None: every prompt once) this run."""
        if self.embed_noise is None:
            return []
        noise = self.embed_noise if prompt is None else self.embed_noise[prompt.cpu()]

        def add_noise(embed, hook):
            return embed + noise.to(embed.device, embed.dtype)

        return [("hook_embed", add_noise)]


def ablation_source(kind: str, base_acts: torch.Tensor, ablation: str, dataset_acts: torch.Tensor | None = None,
                    seed: int = 0) -> torch.Tensor:
    """Replacement activations [n_prompts, ...] for an ablation of the base run's activation `base_acts`."""
    if ablation == "zero":
        return torch.zeros_like(base_acts)
    if ablation == "mean":
        ref = base_acts if dataset_acts is None else dataset_acts
        return ref.float().mean(0, keepdim=True).to(base_acts.dtype).expand_as(base_acts)
    if ablation == "resample":
        ref = base_acts if dataset_acts is None else dataset_acts
        n = base_acts.shape[0]
        g = torch.Generator().manual_seed(seed)
        if dataset_acts is None:
            if n < 2:
                raise ValueError("resample ablation needs at least two prompts (or ablation_data=...)")
            # A derangement: every prompt takes another prompt's activation.
            perm = (torch.arange(n) + torch.randint(1, n, (1,), generator=g)) % n
        else:
            perm = torch.randint(ref.shape[0], (n,), generator=g)
        return ref[perm.to(ref.device)]
    raise ValueError(f"ablation must be 'zero', 'mean' or 'resample', got {ablation!r}")
