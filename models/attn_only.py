"""The attention-only models the framework studies read, and how they are trained.

    python -m models.attn_only                 # train all four into models/trained/ (~10 min on 2 cores)
    python -m models.attn_only attn-only-2l    # one of them

Each model is trained from a fixed seed on the synthetic corpus (models/synthetic.py)
and saved with its configuration, loss curve, tokenizer and a model card.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.config import TransformerConfig
from models.hooked_transformer import HookedTransformer
from models.synthetic import CorpusConfig, SyntheticCorpus, build_tokenizer
from models.training import TrainConfig, TrainResult, train

TRAINED_DIR = Path(__file__).resolve().parent / "trained"


@dataclass
class AttnOnlySpec:
    name: str
    n_layers: int
    layer_norm: bool
    train: TrainConfig
    init_range: float = 0.02
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    batch_size: int = 16
    description: str = ""

    def config(self) -> TransformerConfig:
        # d_head 32: with 16-wide heads (8 x 16) an OV circuit can barely copy 255 tokens and
        # induction did not form within the time budget; 4 x 32 forms it in ~600 steps.
        return TransformerConfig(
            n_layers=self.n_layers, d_model=128, n_heads=4, d_head=32, d_vocab=self.corpus.d_vocab,
            n_ctx=self.corpus.seq_len, d_mlp=None, normalization_type="LN" if self.layer_norm else None,
            positional_embedding_type="standard", bos_token_id=0, eos_token_id=0, pad_token_id=0,
            init_range=self.init_range, model_name=self.name, default_prepend_bos=True,
        )


# LayerNorm models train at lr 1e-3; without norms the residual starts tiny (init 0.02)
# and the model crawls off that saddle, so the LN-free ones start larger and step faster.
_LN_TRAIN = TrainConfig(steps=2500, lr=1e-3, weight_decay=0.01, warmup_steps=100, seed=0, train_biases=False)
_NOLN_TRAIN = TrainConfig(steps=3000, lr=1e-2, weight_decay=0.0, warmup_steps=100, seed=0, train_biases=False)

SPECS = {
    s.name: s
    for s in [
        AttnOnlySpec("attn-only-1l", 1, True, _LN_TRAIN,
                     description="1 layer, LayerNorm: skip-trigrams and the direct path, no induction"),
        AttnOnlySpec("attn-only-2l", 2, True, _LN_TRAIN,
                     description="2 layers, LayerNorm: a previous-token head and induction heads"),
        AttnOnlySpec("attn-only-1l-noln", 1, False, _NOLN_TRAIN, init_range=0.1,
                     description="1 layer, no norms: every path expansion is exact"),
        AttnOnlySpec("attn-only-2l-noln", 2, False, _NOLN_TRAIN, init_range=0.1,
                     description="2 layers, no norms: induction with exact path expansion"),
    ]
}


def train_spec(spec: AttnOnlySpec, progress: bool = True, steps: int | None = None) -> tuple[HookedTransformer, TrainResult]:
    """Build and train one model (deterministic from the spec's seeds)."""
    torch.manual_seed(spec.train.seed)
    model = HookedTransformer(spec.config(), tokenizer=build_tokenizer(spec.corpus.d_vocab))
    cfg = spec.train if steps is None else TrainConfig(**{**spec.train.to_dict(), "steps": steps})
    corpus = SyntheticCorpus(spec.corpus)
    result = train(model, corpus.batches(spec.batch_size, seed=spec.train.seed + 1), cfg, progress=progress)
    model.requires_grad_(False)
    return model, result


def measure(model: HookedTransformer) -> dict:
    """The numbers the model card reports (what the framework analysis looks at)."""
    from interp import circuits
    from interp.probing import prefix_matching_scores, previous_token_scores, repeated_random_tokens

    prefix = prefix_matching_scores(model, batch=32)
    previous = previous_token_scores(model, repeated_random_tokens(model, 25, 4, 16, seed=1))
    copying = circuits.eigenvalue_positivity(circuits.full_ov(model))
    return {
        "prefix_matching": prefix.tolist(),
        "previous_token": previous.tolist(),
        "ov_eigenvalue_positivity": copying.tolist(),
    }


def save_trained(spec: AttnOnlySpec, model: HookedTransformer, result: TrainResult, out: Path) -> Path:
    out = Path(out) / spec.name
    model.save(out)
    metrics = measure(model)
    record = {
        "name": spec.name,
        "description": spec.description,
        "model": model.cfg.to_dict(),
        "corpus": spec.corpus.to_dict(),
        "train": result.config.to_dict(),
        "batch_size": spec.batch_size,
        "seconds": round(result.seconds, 1),
        "final_loss": sum(result.losses[-100:]) / min(100, len(result.losses)),
        "losses": [round(x, 5) for x in result.losses],
        "metrics": metrics,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    (out / "README.md").write_text(model_card(spec, record))
    return out


def model_card(spec: AttnOnlySpec, record: dict) -> str:
    cfg = record["model"]
    fmt = lambda rows: "; ".join(f"layer {l}: " + ", ".join(f"{v:.2f}" for v in r) for l, r in enumerate(rows))  # noqa: E731
    return f"""# {spec.name}

{spec.description}.

An attention-only transformer trained by this project for the transformer-circuits
studies (`analyses.framework`). Load it with `models.load("{spec.name}")`.

## Architecture
{cfg['n_layers']} layer(s) of attention only (no MLP), d_model {cfg['d_model']}, {cfg['n_heads']} heads of
d_head {cfg['d_head']}, {'LayerNorm before each layer and the unembedding' if spec.layer_norm else 'no norms'},
learned positional embeddings (n_ctx {cfg['n_ctx']}), untied embeddings, attention biases fixed at zero.
Vocabulary: {cfg['d_vocab']} tokens named `<bos>`, `t1` ... `t{cfg['d_vocab'] - 1}` (a word-level tokenizer
is saved alongside; it prepends `<bos>`).

## Training data
The synthetic corpus of `models/synthetic.py`, seed {spec.corpus.seed}: half the sequences
are text from a random sparse bigram chain ({spec.corpus.successors} favoured successors per
token) with {spec.corpus.n_skip_trigrams} planted skip-trigrams `a ... b -> c` and occasional
repeated random segments; the other half are one random segment (length
{spec.corpus.periodic_len[0]}-{spec.corpus.periodic_len[1]}) repeated to the end. Sequences of {spec.corpus.seq_len} tokens.

## Training
{record['train']['steps']} steps of batch {record['batch_size']}, AdamW (lr {record['train']['lr']}, weight decay
{record['train']['weight_decay']}, {record['train']['warmup_steps']} warm-up steps, cosine decay), gradient clipping
{record['train']['grad_clip']}, seed {record['train']['seed']}, init N(0, {cfg['init_range']}). It took {record['seconds']} s on
{record['threads']} CPU threads (torch {record['torch']}). Final loss (mean of the last 100 steps):
{record['final_loss']:.3f} nats. The loss curve is in `training.json`.

Reproduce: `python -m models.attn_only {spec.name}`.

## Measured
- Prefix-matching (induction) score, Olsson et al. protocol (BOS + 25 random tokens x 4; the attention
  on the tokens after earlier copies of the current token):
  {fmt(record['metrics']['prefix_matching'])}
- Previous-token score on the same sequences: {fmt(record['metrics']['previous_token'])}
- Eigenvalue positivity of each head's full OV circuit (1 = copying):
  {fmt(record['metrics']['ov_eigenvalue_positivity'])}
"""


def remeasure(spec: AttnOnlySpec, out: Path) -> Path:
    """Recompute the card's measurements for trained weights already in `out` (no training)."""
    from models.loading import load

    directory = Path(out) / spec.name
    record = json.loads((directory / "training.json").read_text())
    record["metrics"] = measure(load(directory))
    (directory / "training.json").write_text(json.dumps(record, indent=1))
    (directory / "README.md").write_text(model_card(spec, record))
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train the attention-only models.")
    parser.add_argument("names", nargs="*", default=list(SPECS), help=f"any of {', '.join(SPECS)}")
    parser.add_argument("--out", default=str(TRAINED_DIR))
    parser.add_argument("--measure-only", action="store_true", help="rewrite the cards' measurements, no training")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in SPECS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(SPECS)}")
        if args.measure_only:
            print(f"{name}: measured -> {remeasure(SPECS[name], Path(args.out))}")
            continue
        model, result = train_spec(SPECS[name])
        path = save_trained(SPECS[name], model, result, Path(args.out))
        print(f"{name}: {result.seconds:.0f} s, final loss {sum(result.losses[-100:]) / 100:.3f} -> {path}")


if __name__ == "__main__":
    main()
