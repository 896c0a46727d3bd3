"""The original transformer, trained here: a small encoder-decoder on the toy translation task.

    python -m models.translation        # train and save models/trained/translation-2l (~1-2 min on 2 cores)

"Attention Is All You Need" in miniature: sinusoidal positions as [sin | cos] halves,
embeddings shared by both stacks and the output layer and scaled by sqrt(d_model),
post-LN blocks (the residual add, then LayerNorm), ReLU MLPs, cross-attention in every
decoder block. Trained from a fixed seed on models/toy_translation.py and saved with its
configuration, loss curve, tokenizer and a model card.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import toy_translation as toy
from models.config import TransformerConfig
from models.encoder_decoder import HookedEncoderDecoder
from models.training import TrainConfig, TrainResult, train

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
NAME = "translation-2l"


@dataclass
class TranslationSpec:
    name: str = NAME
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 256
    batch_size: int = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, lr=2e-3, weight_decay=0.01,
                                                                   warmup_steps=200, seed=0))
    init_range: float = 0.05

    def config(self) -> TransformerConfig:
        return TransformerConfig(
            n_layers=self.n_layers, n_decoder_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads, d_vocab=len(toy.VOCAB), n_ctx=32, d_mlp=self.d_mlp, act_fn="relu",
            normalization_type="LN", positional_embedding_type="sinusoidal", post_ln=True, embed_ln=False,
            final_norm=False, encoder_decoder=True, tied_embeddings=True, embed_scale=self.d_model ** 0.5,
            embed_scale_in_dtype=False, decoder_start_token_id=toy.BOS, pad_token_id=toy.PAD, bos_token_id=toy.BOS,
            eos_token_id=toy.EOS, init_range=self.init_range, model_name=self.name,
        )


def loss(model, batch) -> torch.Tensor:
    src, src_mask, tgt, tgt_mask = batch
    return model(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask, return_type="loss")


def train_spec(spec: TranslationSpec | None = None, steps: int | None = None,
               progress: bool = True) -> tuple[HookedEncoderDecoder, TrainResult]:
    """Build and train the model (deterministic from the spec's seed)."""
    spec = spec or TranslationSpec()
    torch.manual_seed(spec.train.seed)
    model = HookedEncoderDecoder(spec.config(), tokenizer=toy.build_tokenizer())
    cfg = spec.train if steps is None else TrainConfig(**{**spec.train.to_dict(), "steps": steps})
    result = train(model, toy.batches(spec.batch_size, seed=spec.train.seed + 1), cfg, progress=progress, loss_fn=loss)
    model.requires_grad_(False)
    return model, result


@torch.no_grad()
def exact_match(model, pairs: list) -> float:
    """Share of sentences whose greedy translation is the target exactly."""
    src, mask, tgt, _ = toy.collate(pairs)
    out = model.generate(src, attention_mask=mask, max_new_tokens=tgt.shape[1])
    hits = 0
    for i, pair in enumerate(pairs):
        ids = out[i, 1:].tolist()
        ids = ids[: ids.index(toy.EOS)] if toy.EOS in ids else ids
        hits += ids == pair.target_ids[1:-1]
    return hits / len(pairs)


def save(model, result: TrainResult, spec: TranslationSpec, directory: Path | None = None) -> Path:
    directory = Path(directory or TRAINED_DIR / spec.name)
    model.save(directory)
    accuracy = exact_match(model, toy.pairs(500, seed=12345))
    final = sum(result.losses[-100:]) / len(result.losses[-100:])
    record = {"name": spec.name, "model": model.cfg.to_dict(), "train": result.config.to_dict(),
              "batch_size": spec.batch_size, "seconds": round(result.seconds, 1), "final_loss": final,
              "first_losses": result.losses[:20], "losses": result.losses, "held_out_exact_match": accuracy,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    (directory / "training.json").write_text(json.dumps(record, indent=1))
    (directory / "README.md").write_text(_card(spec, result, final, accuracy))
    return directory


def _card(spec: TranslationSpec, result: TrainResult, final: float, accuracy: float) -> str:
    t = result.config
    return f"""# {spec.name}

"Attention Is All You Need" in miniature, trained by this project on a toy translation task that
needs reordering (`analyses.seq2seq` reads it). Load it with `models.load("{spec.name}")`.

## Architecture
An encoder and a decoder of {spec.n_layers} post-LN blocks each (the residual add, then LayerNorm),
d_model {spec.d_model}, {spec.n_heads} heads of d_head {spec.d_model // spec.n_heads}, ReLU MLPs of width {spec.d_mlp},
cross-attention in every decoder block; sinusoidal positions as [sin | cos] halves; one token
table shared by both stacks and the output layer, scaled by sqrt(d_model). Vocabulary: {len(toy.VOCAB)} words
(`<pad>`, `<s>`, `</s>`, {len(toy.SOURCE_WORDS)} source words, {len(toy.TARGET_WORDS)} target words); a word-level
tokenizer is saved alongside and appends `</s>` to the source.

## Task (`models/toy_translation.py`)
Source: subject, verb, object, each noun with 0-2 adjectives before it ("big red fox chases small cat").
Target: subject, object, verb, each noun followed by its adjectives in reverse order, every word replaced
by its own target word ("voxa redo bigo cata smalo chasu"). Each target word translates one source word,
so the alignment is known exactly.

## Training
{t.steps} steps of batch {spec.batch_size} fresh random sentences, AdamW (lr {t.lr}, weight decay {t.weight_decay},
{t.warmup_steps} warm-up steps, cosine decay), gradient clipping {t.grad_clip}, seed {t.seed}, init
N(0, {spec.init_range}). It took {result.seconds:.1f} s on {torch.get_num_threads()} CPU threads (torch {torch.__version__}).
Final loss (mean of the last 100 steps): {final:.4f} nats per target token. Greedy translations of 500 held-out
sentences: {accuracy:.1%} exactly right. The loss curve is in `training.json`.

Reproduce: `python -m models.translation`.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="train the toy-translation encoder-decoder into models/trained/")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = TranslationSpec()
    model, result = train_spec(spec)
    print("saved", save(model, result, spec, args.out), f"in {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
