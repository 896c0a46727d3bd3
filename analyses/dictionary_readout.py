"""Reading the latents that patching ranks highest for factual recall, so a person can judge whether they make
sense: where in the prompt each one acts, what it fires on in the corpus, and what it makes the model predict.

The last needs care. A layer-15 latent's direct logits (`W_dec @ W_U`) skip the fifteen blocks after it and
read as noise on SmolLM2, so the output side is measured causally instead: in the latent's own top corpus
contexts, zero it at the token it peaks on (spliced with the error term, so nothing else changes) and see which
next tokens lose the most probability there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureReading:
    """One latent the factual-recall prompt depends on, read from both sides."""

    feature: int
    effect: float  # mean attribution over the pairs, every position
    landmark: str  # the clean landmark of the pair whose logit difference leans on it most
    position: str  # the token of that prompt where most of it sits
    position_share: float  # that position's share of the pair's summed |attribution| over positions
    clean_activation: float  # its activation there, in that prompt
    corrupted_activation: float  # ... and with the other landmark in its place
    peaks_on: list[str]  # the corpus tokens its top contexts peak on, most frequent first
    context: str  # its strongest corpus context, the peak token in [[ ]]
    promotes: list[tuple[str, float]]  # next tokens whose mean probability falls most when it is zeroed

    def row(self) -> dict:
        return {"latent": self.feature, "effect": round(self.effect, 4), "matters most for": self.landmark,
                "at token": self.position, "share there": round(self.position_share, 2),
                "activation (clean / corrupted)": f"{self.clean_activation:.2f} / {self.corrupted_activation:.2f}",
                "peaks on (corpus)": ", ".join(repr(t) for t in self.peaks_on),
                "zeroing it lowers": ", ".join(f"{t!r} {v:+.3f}" for t, v in self.promotes),
                "strongest context": self.context}


def attribution_by_position(model, sae, latents: list[int] | None = None) -> torch.Tensor:
    """Attribution patching of the factual pairs (Eiffel Tower against each other landmark, both ways) over the
    dictionary's latents (`latents`, or all) at every position -> [n_pairs, n_latents, pos]: what restoring each
    clean activation gives back to the logit difference. Summed over positions it is the latent's effect."""
    from analyses.factual import factual_pairs
    from analyses.patching_study import answer_ids
    from interp.patching import attribution_patch, logit_diff

    pairs = factual_pairs()
    metric = logit_diff(answer_ids(model, pairs.clean_answer), answer_ids(model, pairs.corrupted_answer))
    result = attribution_patch(model, pairs.clean, pairs.corrupted, kind="sae_acts_post", by="feature_pos",
                               saes=[sae], metric=metric, features=latents)
    # per_prompt is the metric's estimated value with the site patched: its effect is that less the corrupted run's
    return result.per_prompt[:, 0] - result.corrupted_metric[:, None, None]


def prompt_positions(model, sae, latents: list[int], attribution: torch.Tensor | None = None) -> dict:
    """Where in the factual prompts each latent acts: {"clean": clean prompts, "tokens": [n_pairs][pos] clean str
    tokens, "attribution" [n_pairs, n_latents, pos] (given, or `attribution_by_position` of `latents`),
    "clean_acts" / "corrupted_acts" [n_pairs, n_latents, pos]}. The pairs are all of one token length."""
    from analyses.factual import factual_pairs
    from interp.sae.splice import run_with_cache_with_saes

    pairs = factual_pairs()
    if attribution is None:
        attribution = attribution_by_position(model, sae, latents)
    name = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    acts = {}
    for side, prompts in (("clean", pairs.clean), ("corrupted", pairs.corrupted)):
        _, cache = run_with_cache_with_saes(model, prompts, [sae], use_error_term=True,
                                            names_filter=lambda n: n == name)
        acts[side] = cache[name][..., latents].transpose(1, 2)  # [n_pairs, n_latents, pos]
    tokens = [model.to_str_tokens(p) for p in pairs.clean]
    if attribution.shape[-1] != acts["clean"].shape[-1] or any(len(t) != attribution.shape[-1] for t in tokens):
        raise RuntimeError("the factual pairs are no longer of one token length; the readout assumes they are")
    return {"clean": pairs.clean, "tokens": tokens, "attribution": attribution, "clean_acts": acts["clean"],
            "corrupted_acts": acts["corrupted"]}


def causal_outputs(model, sae, dash, feature: int, n_contexts: int = 8, n_top: int = 4) -> list[tuple[str, float]]:
    """Zero `feature` at its peak token in its top `n_contexts` corpus contexts (the dashboard's windows, up to
    the peak) and return the next tokens whose probability falls most on average: what it predicts."""
    from interp.sae.splice import run_with_hooks_with_saes

    i = dash.row(feature)
    left = dash.context[0]
    name = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    bos = model.cfg.bos_token_id

    def zero(acts, hook):
        acts = acts.clone()
        acts[:, -1, feature] = 0.0
        return acts

    drops = []
    for window, value in zip(dash.top_tokens[i, :n_contexts], dash.top_values[i, :n_contexts]):
        if not value == value:  # NaN: fewer contexts than asked
            break
        ids = window[:left + 1]
        ids = ids[ids >= 0]
        if bos is not None and int(ids[0]) != bos:  # the window cut a row: give it the row's start again
            ids = torch.cat([torch.tensor([bos]), ids])
        ids = ids[None]  # [1, pos], the peak last
        with torch.no_grad():
            base = run_with_hooks_with_saes(model, ids, [sae], use_error_term=True, prepend_bos=False)
            edited = run_with_hooks_with_saes(model, ids, [sae], use_error_term=True, fwd_hooks=[(name, zero)],
                                              prepend_bos=False)
        # probability, not log-probability: a log-prob ratio is largest for tokens nobody predicts
        drops.append(edited[0, -1].softmax(-1) - base[0, -1].softmax(-1))
    if not drops:
        return []
    mean = torch.stack(drops).mean(0)
    low = mean.topk(n_top, largest=False)
    return [(model.to_string(int(t)), float(v)) for t, v in zip(low.indices, low.values)]


def read_factual_features(model, sae, dash, latents: list[int], effects: list[float],
                          attribution: torch.Tensor | None = None, n_contexts: int = 8) -> list[FeatureReading]:
    """A FeatureReading per latent (the dashboards `dash` must hold every latent); `attribution`: the latents'
    `attribution_by_position` [n_pairs, n_latents, pos], if already computed."""
    from analyses.factual import TEMPLATE

    where = prompt_positions(model, sae, latents, attribution)
    prefix, suffix = TEMPLATE.split("{}")
    readings = []
    for j, (f, effect) in enumerate(zip(latents, effects)):
        per_pair = where["attribution"][:, j]  # [n_pairs, pos]
        pair = int(per_pair.sum(-1).abs().argmax())  # the pair that leans on it most
        share = per_pair[pair].abs() / per_pair[pair].abs().sum().clamp_min(1e-12)
        p = int(share.argmax())
        landmark = where["clean"][pair][len(prefix):-len(suffix)]
        i = dash.row(f)
        left = dash.context[0]
        window = dash.top_tokens[i, 0]
        text = dash.text([t for t in window.tolist() if t >= 0])
        peak = sum(1 for t in window[:left].tolist() if t >= 0)
        context = "".join(t if k != peak else f"[[{t}]]" for k, t in enumerate(text)).replace("\n", "\u23ce")
        readings.append(FeatureReading(f, effect, landmark, where["tokens"][pair][p], float(share[p]),
                                       float(where["clean_acts"][pair, j, p]),
                                       float(where["corrupted_acts"][pair, j, p]), dash.top_activating_tokens(f, 4),
                                       context, causal_outputs(model, sae, dash, f, n_contexts)))
    return readings
