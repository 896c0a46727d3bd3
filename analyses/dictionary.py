"""Dictionary features on SmolLM2: a residual-stream SAE and a transcoder for the MLP of layer 15, trained here
on the bundled Wikipedia summaries, read against the shift study's words and the factual-recall prompt.

    python -m analyses.dictionary [--out reports/dictionary] [--train] [--tokens 800000]

- Which latents separate the senses of "mole" (and carry "Eiffel" into "tower"): the shift study's contexts,
  the residual stream after block 15 at the word, encoded; a latent separates a sense when its mean there
  exceeds its mean in every other sense. For "Eiffel" the components that write each such latent come from
  the shift study's decomposition (interp.shift.decompose): each head's, MLP's and embedding's share of the
  latent's pre-activation (they sum to it, less the dictionary's own bias terms).
- Which latents the factual-recall prompt depends on: attribution patching over every latent at once
  (interp.patching, kind="sae_acts_post"), Eiffel Tower against the other landmarks, and their dashboards,
  each read from both sides (analyses.dictionary_readout): where in the prompt it acts, what it fires on in
  the corpus, and which next tokens lose probability when it is zeroed in its own top contexts.
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass, field
from pathlib import Path

LAYER = 15
SAE_HOOK = f"blocks.{LAYER}.hook_resid_post"
MLP_IN, MLP_OUT = f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out"
DICTIONARIES = Path(__file__).resolve().parents[1] / "models" / "trained" / "dictionaries"
SAE_DIR, TRANSCODER_DIR = DICTIONARIES / "smollm2-l15-resid-topk", DICTIONARIES / "smollm2-l15-mlp-transcoder-topk"
WIDTH, K = 2304, 32  # 4 x d_model, 32 latents a token: float16 files of ~5 MB each


# Five passes over the collection at a learning rate the step count can use: at SAELens's 3e-4 with 1,171 steps
# of 1,024 and a 1,000-step dead window, 948 of the SAE's 2,304 latents ended dead (41%) and its held-out
# explained variance was 0.68. A 50-step window turns the aux-k loss on while it can still revive them.
TRAINING = dict(lr=2e-3, warmup_steps=30, dead_window=50)


def train_study_dictionaries(model, activations=None, *, tokens: int = 3_000_000, collect_tokens: int = 600_000,
                             batch_size: int = 4096, seed: int = 0, out: Path = DICTIONARIES, log=print) -> dict:
    """Collect (unless `activations`, an ActivationDataset folder with the three hooks, is given) and train the
    study's SAE and transcoder; save them in SAELens's format (float16) under `out`. Returns the TrainingRuns."""
    import tempfile

    import torch

    from interp.collect import ActivationDataset, collect_activations
    from interp.sae.formats import save_dictionary
    from interp.sae.train import train_dictionary

    if activations is None:
        activations = Path(tempfile.mkdtemp()) / "acts"
        # Every position but the first: SmolLM2's stream at a row's BOS is ~150x the median norm elsewhere
        # (25,000 vs 170 at block 15), and a dictionary fitted with it spends capacity and explained variance on
        # that one token. (The BOS between documents inside a row stays: the packing puts it there, and there
        # its stream is ordinary, median norm 202 against 172, 0.4% of the variance.)
        collect_activations(model, None, [SAE_HOOK, MLP_IN, MLP_OUT], activations, seq_len=128,
                            positions=slice(1, None), max_tokens=collect_tokens, dtype=torch.float16, batch_size=16)
    ds = ActivationDataset(activations)
    runs = {}
    for name, kwargs, folder in (("sae", dict(hook=SAE_HOOK), out / SAE_DIR.name),
                                 ("transcoder", dict(hook=MLP_IN, out_hook=MLP_OUT), out / TRANSCODER_DIR.name)):
        run = train_dictionary(ds, architecture="topk", d_sae=WIDTH, k=K, tokens=tokens, batch_size=batch_size,
                               seed=seed, **TRAINING, **kwargs)
        run.sae.cfg.model_name, run.sae.cfg.dtype = model.cfg.model_name, "float16"
        save_dictionary(run.sae.to(torch.float16), folder)
        log(f"  {name}: {run.tokens:,} tokens in {run.seconds:.0f} s, explained variance "
            f"{run.log[-1]['explained_variance']:.3f} at the end of training -> {folder}")
        runs[name] = run
    return runs


def load_study_dictionaries(device=None):
    """(sae, transcoder) as shipped in models/trained/dictionaries, in float32."""
    import torch

    from interp.sae.formats import load_dictionary

    missing = [d for d in (SAE_DIR, TRANSCODER_DIR) if not d.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is not there: train the study's dictionaries with "
                                "`python -m analyses.dictionary --train`")
    return tuple(load_dictionary(d, dtype=torch.float32, device=device) for d in (SAE_DIR, TRANSCODER_DIR))


@dataclass
class SenseFeatures:
    """For each sense of a word, the latents whose mean at the word exceeds their mean in every other sense."""

    study: str
    word: str
    senses: list[str]
    features: dict[str, list[int]]  # sense -> latent ids, best first
    margins: dict[str, list[float]]  # the margin over the next sense's mean
    means: object  # torch [n_senses, d_sae]: mean activation per sense
    components: dict[int, list[tuple[str, float]]] = field(default_factory=dict)  # latent -> (component, share)


def _layer(sae) -> int:
    """The block whose output a residual-stream SAE reads (blocks.<l>.hook_resid_post)."""
    name = sae.cfg.hook_name
    if not (name.startswith("blocks.") and name.endswith(".hook_resid_post")):
        raise ValueError(f"the study reads a residual-stream SAE on blocks.<l>.hook_resid_post; this one reads {name}")
    return int(name.split(".")[1])


def sense_features(model, sae, study: str = "mole", n_top: int = 3) -> SenseFeatures:
    """The separating latents of a shift study's word (analyses.shift_data.STUDIES) at the SAE's block output."""
    import torch

    from analyses.shift_data import STUDIES, flatten
    from interp.shift.trace import trace_word

    spec = STUDIES[study]
    contexts, labels = flatten(spec["senses"])
    trace = trace_word(model, spec["word"], contexts, labels)
    with torch.no_grad():  # vectors[:, l + 1] is the stream after block l (entry 0: the embedding)
        acts = sae.encode(trace.vectors[:, _layer(sae) + 1].to(sae.W_enc.dtype))  # [n, d_sae]
    senses = list(spec["senses"])
    means = torch.stack([acts[[i for i, l in enumerate(labels) if l == s]].mean(0) for s in senses])
    features, margins = {}, {}
    for i, sense in enumerate(senses):
        others = torch.cat([means[:i], means[i + 1:]]).max(0).values
        margin = means[i] - others
        top = margin.topk(n_top)
        keep = [(int(f), float(m)) for f, m in zip(top.indices, top.values) if m > 0]
        features[sense], margins[sense] = [f for f, _ in keep], [m for _, m in keep]
    return SenseFeatures(study, spec["word"], senses, features, margins, means)


def writers(model, sae, study: str, sense: str, latents: list[int], n_top: int = 5) -> dict[int, list]:
    """Which components write each latent's pre-activation at the word, over the sense's contexts: the shift
    study's decomposition of the stream the SAE reads, projected on the latent's encoder direction."""
    from analyses.shift_data import STUDIES
    from interp.shift.decompose import decompose
    from interp.shift.trace import trace_word

    contexts = STUDIES[study]["senses"][sense]
    trace = trace_word(model, STUDIES[study]["word"], contexts)
    shares = None
    for tokens, read in zip(trace.token_ids, trace.read_positions):
        dec = decompose(model, tokens[None], [read[-1]], layer=_layer(sae) + 1)
        scale = sae.cfg.norm_scaling_factor or 1.0  # the encoder reads x * scale (SAELens's normalisation)
        per = dec.components[0].float() @ sae.W_enc.detach()[:, latents].float().cpu() * scale  # [k, latents]
        shares = per if shares is None else shares + per
    shares = shares / len(contexts)
    return {f: sorted(((dec.labels[c], float(shares[c, j])) for c in range(shares.shape[0])),
                      key=lambda t: -abs(t[1]))[:n_top] for j, f in enumerate(latents)}


def factual_features(model, sae, n_top: int = 10):
    """Attribution patching over every latent and position for the factual-recall pairs: (latent ids, mean effect on
    the logit difference, the attribution [n_pairs, d_sae, pos] from analyses.dictionary_readout)."""
    from analyses.dictionary_readout import attribution_by_position

    attribution = attribution_by_position(model, sae)
    mean = attribution.sum(-1).mean(0)  # [d_sae]: what restoring the clean latent gives back, on average
    top = mean.abs().topk(n_top).indices
    return [int(i) for i in top], [float(mean[i]) for i in top], attribution


@dataclass
class DictionaryStudy:
    model_name: str
    dictionary: str  # the SAE's config, as text
    mole: SenseFeatures
    tower: SenseFeatures
    factual: list[int]
    factual_effects: list[float]
    evaluation: dict = field(default_factory=dict)  # "sae" / "transcoder" -> evaluation result
    dashboards: object = None
    readings: list = field(default_factory=list)  # FeatureReading per factual latent (analyses.dictionary_readout)

    def headline(self) -> str:
        mole = ", ".join(f"{s}: {f[0]}" for s, f in self.mole.features.items() if f)
        return f"mole's senses separate on latents ({mole}); factual recall leans on latent {self.factual[0]}"

    def to_dict(self) -> dict:
        """The numbers for results.json."""
        out = {"dictionary": self.dictionary, "factual_latents": self.factual,
               "factual_effects": [round(e, 4) for e in self.factual_effects],
               "factual_readings": [r.row() for r in self.readings]}
        for study in (self.mole, self.tower):
            out[f"{study.study}_latents"] = {s: study.features[s] for s in study.senses}
        for name, ev in self.evaluation.items():
            row = ev.summary()
            out[f"{name}_evaluation"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        return out

    def save(self, directory) -> Path:
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        page = Page(f"Dictionary features: {self.model_name}", run={"dictionary": self.dictionary})
        page.text(self.headline())
        for study in (self.mole, self.tower):
            page.heading(f"Latents that separate the senses of {study.word!r}")
            page.raw(_table(["sense", "latents (best first)", "margin over the next sense"],
                            [[html.escape(s), ", ".join(_link(f) for f in study.features[s]),
                              ", ".join(f"{m:.2f}" for m in study.margins[s])] for s in study.senses]))
            for f, comps in study.components.items():
                page.text(f"latent {f} at 'tower' after 'Eiffel' is written by (share of its pre-activation): "
                          + "; ".join(f"{c} {v:+.2f}" for c, v in comps))
        page.heading("Latents the factual-recall prompt depends on (attribution patching)")
        page.raw(_table(["latent", "mean effect on the logit difference"],
                        [[_link(f), f"{e:+.3f}"] for f, e in zip(self.factual, self.factual_effects)]))
        if self.readings:
            page.text("Each latent read from both sides: the pair (clean landmark) whose logit difference leans on "
                      "it most and the token where it acts there, with its activation in the clean and the "
                      "corrupted prompt; what its top corpus contexts peak on; and what it makes the model predict: "
                      "the next tokens whose probability falls most when it is zeroed at the peak of its top "
                      "contexts (a layer-15 latent's direct logits skip fifteen blocks and read as noise).")
            page.table([r.row() for r in self.readings])
        for name, ev in self.evaluation.items():
            page.heading(f"How good the {name} is")
            page.table([{"metric": k, "value": v} for k, v in ev.summary().items()])
            page.figure(ev.plot())
        if self.dashboards is not None:
            self.dashboards.save(directory / "features")
        return page.save(directory / "index.html")


def _link(feature: int) -> str:
    return f'<a href="features/feature-{feature}.html">{feature}</a>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of cells already escaped (links in them)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def dictionary_study(model, sae, transcoder=None, *, dashboard_tokens: int = 20_000, eval_sequences: int = 16,
                     held_out_from: int = 6_000, seq_len: int = 128, readout_contexts: int = 8,
                     progress: bool = False) -> DictionaryStudy:
    """The study (see the module docstring). The evaluation reads `eval_sequences` packed rows of the corpus from
    row `held_out_from` on, past what the shipped dictionaries were trained on; each factual latent's output side
    is read in `readout_contexts` of its top contexts."""
    from analyses.dictionary_readout import read_factual_features
    from interp.sae.dashboard import feature_dashboards

    mole, tower = sense_features(model, sae, "mole"), sense_features(model, sae, "tower")
    eiffel = tower.features.get("eiffel", [])
    tower.components = writers(model, sae, "tower", "eiffel", eiffel) if eiffel else {}
    factual, effects, attribution = factual_features(model, sae)
    from interp.sae.evaluate import evaluate_dictionary

    evaluation = {name: evaluate_dictionary(model, d, None, n_sequences=eval_sequences, skip_sequences=held_out_from,
                                            seq_len=seq_len)
                  for name, d in (("SAE", sae), ("transcoder", transcoder)) if d is not None}
    chosen = sorted({*factual, *eiffel, *(f for fs in mole.features.values() for f in fs)})
    boards = feature_dashboards(model, sae, None, n_tokens=dashboard_tokens, features=chosen, seq_len=seq_len,
                                progress=progress)
    readings = read_factual_features(model, sae, boards, factual, effects, attribution[:, factual], readout_contexts)
    return DictionaryStudy(model.cfg.model_name, repr(sae.cfg), mole, tower, factual, effects, evaluation, boards,
                           readings)


def main(argv=None) -> None:
    import argparse

    import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/dictionary")
    parser.add_argument("--train", action="store_true", help="train and save the study's dictionaries first")
    parser.add_argument("--tokens", type=int, default=3_000_000)
    parser.add_argument("--activations", default=None, help="an ActivationDataset folder with the three hooks")
    args = parser.parse_args(argv)
    model = models.load("smollm2-135m")
    if args.train:
        train_study_dictionaries(model, args.activations, tokens=args.tokens)
    sae, transcoder = load_study_dictionaries()
    study = dictionary_study(model, sae, transcoder, progress=True)
    print(study.headline())
    print(f"wrote {study.save(args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
