"""What a student of "Attention Is All You Need" asks of an encoder-decoder, answered on the one trained here.

    python -m analyses.seq2seq [--model translation-2l] [--out reports/seq2seq]

On the toy translation task (models/toy_translation.py), where the alignment of every
target word to its source word is known:

1. Does the model translate? Greedy translations of held-out sentences, exact match.
2. Which source token does each decoder step read? Each cross-attention head's (and each
   layer's head-mean) argmax over the source at the step that predicts a target word,
   scored against the known alignment, and the attention mass on the aligned token.
3. What does the encoder's self-attention do? Attention from each adjective to its noun,
   from each noun to its adjectives, to itself and to </s>, per head.
4. What do the sinusoidal positions add to the residual stream? Their norm against the
   (scaled) token embeddings', their share of the first block's input variance, and how
   alike two positions' vectors are (cosine, as a function of distance).
5. Where does the information travel? Patching a corrupted object noun back, at every
   (layer, position) of the encoder, and of the decoder's stream and cross-attention output.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import toy_translation as toy

ROLES = ("adjective -> its noun", "noun -> its adjectives", "self", "</s>")


@dataclass
class Seq2SeqResult:
    model_name: str
    n_sentences: int
    exact_match: float
    alignment: torch.Tensor  # [n_decoder_layers, n_heads + 1]: argmax hits; the last column is the head mean
    alignment_mass: torch.Tensor  # [n_decoder_layers, n_heads + 1]: mean attention on the aligned source token
    encoder_roles: torch.Tensor  # [n_encoder_layers, n_heads, len(ROLES)]: mean attention mass of each kind
    position_norm_ratio: float  # |position vector| / |scaled token embedding|, mean over a sentence's tokens
    position_variance_share: float  # of the first block's input, over real source tokens
    position_similarity: torch.Tensor  # [n, n] cosine of position vectors 0..n-1
    example: dict  # one sentence: words, the best layer's head-mean cross-attention, the alignment
    patching: dict = field(default_factory=dict)  # name -> PatchResult
    seconds: float = 0.0

    @property
    def best(self) -> tuple[int, int, float]:
        """(decoder layer, head (n_heads: the head mean), alignment accuracy) of the best-aligned attention."""
        flat = int(self.alignment.flatten().argmax())
        layer, head = divmod(flat, self.alignment.shape[1])
        return layer, head, float(self.alignment[layer, head])

    @property
    def layer_alignment(self) -> torch.Tensor:
        """[n_decoder_layers]: the head-mean cross-attention's alignment accuracy per layer."""
        return self.alignment[:, -1]

    def headline(self) -> str:
        layer, head, score = self.best
        which = "the head mean" if head == self.alignment.shape[1] - 1 else f"head {head}"
        return (f"{self.exact_match:.0%} of {self.n_sentences} held-out sentences translated exactly; decoder layer "
                f"{layer} cross-attention ({which}) reads the aligned source word at {score:.1%} of steps")

    def to_frame(self):
        import pandas as pd

        rows = []
        for layer in range(self.alignment.shape[0]):
            for head in range(self.alignment.shape[1]):
                rows.append({"layer": layer, "head": "mean" if head == self.alignment.shape[1] - 1 else head,
                             "alignment accuracy": float(self.alignment[layer, head]),
                             "mass on aligned": float(self.alignment_mass[layer, head])})
        return pd.DataFrame(rows)

    def plot(self):
        """Alignment accuracy of each decoder layer's cross-attention heads (and their mean) -> `Figure`."""
        from interp.plots import heatmap

        n_heads = self.alignment.shape[1] - 1
        return heatmap(self.alignment, [f"dec L{layer}" for layer in range(self.alignment.shape[0])],
                       [f"H{h}" for h in range(n_heads)] + ["mean"], signed=False, vmin=0.0, vmax=1.0,
                       title="cross-attention argmax = aligned source word", colorbar_label="share of steps")

    def to_dict(self) -> dict:
        layer, head, score = self.best
        return {"model": self.model_name, "sentences": self.n_sentences, "exact_match": self.exact_match,
                "alignment": self.alignment.tolist(), "alignment_mass": self.alignment_mass.tolist(),
                "best": {"layer": layer, "head": head, "accuracy": score},
                "layer_alignment": self.layer_alignment.tolist(), "encoder_roles": self.encoder_roles.tolist(),
                "roles": list(ROLES), "position_norm_ratio": self.position_norm_ratio,
                "position_variance_share": self.position_variance_share,
                "position_similarity": self.position_similarity.tolist(), "example": self.example,
                "patching": {k: v.to_dict() for k, v in self.patching.items()}, "seconds": self.seconds}

    def save(self, directory) -> Path:
        from interp.plots import heatmap
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "seq2seq.json").write_text(json.dumps(self.to_dict(), indent=1))
        page = Page(f"An encoder-decoder, read: {self.model_name}",
                    {"command": f"python -m analyses.seq2seq --model {self.model_name}", "model": self.model_name,
                     "held-out sentences": self.n_sentences})
        page.text(f"{self.headline()}. The task: subject-verb-object sentences with adjectives before their nouns "
                  "become subject-object-verb with adjectives after their nouns, reversed, every word replaced by "
                  "its own target word; so the alignment of every target word to its source word is known.")
        page.heading("Which source word does each decoder step read?")
        page.text("At the step that predicts a target word, the argmax of each cross-attention head over the source, "
                  "scored against the known alignment (chance is about one in the source length, ~1/7).")
        page.figure(self.plot())
        ex = self.example
        page.figure(heatmap(torch.tensor(ex["pattern"]), [f"-> {w}" for w in ex["target"]], ex["source"],
                            signed=False, vmin=0.0, vmax=1.0, title=f"decoder layer {ex['layer']}, head mean: {ex['source_text']!r}"),
                    caption="Rows: the step predicting each target word; the aligned source words are "
                            + ", ".join(f"{t}<-{ex['source'][a]}" for t, a in zip(ex["target"], ex["alignment"])))
        page.heading("The encoder's self-attention")
        rows = [{"layer": layer, "head": head, **{role: float(self.encoder_roles[layer, head, i])
                                                  for i, role in enumerate(ROLES)}}
                for layer in range(self.encoder_roles.shape[0]) for head in range(self.encoder_roles.shape[1])]
        page.table(rows, caption="Mean attention mass from a word to ...")
        page.heading("What the sinusoidal positions add")
        page.text(f"A position vector's norm is {self.position_norm_ratio:.2f}x the scaled token embedding's; "
                  f"position accounts for {self.position_variance_share:.1%} of the first block's input variance "
                  "over source tokens. Their cosine similarity falls with distance (below), so nearby positions "
                  "look alike to attention.")
        n = self.position_similarity.shape[0]
        page.figure(heatmap(self.position_similarity, [str(i) for i in range(n)], [str(i) for i in range(n)],
                            signed=True, title="cos(position i, position j)"))
        for name, result in self.patching.items():
            page.heading(f"Patching: {name}")
            page.figure(result.plot())
        return page.save(directory / "index.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


# ---------------------------------------------------------------------- the measurements
@torch.no_grad()
def _alignment(model, pairs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    n_layers, n_heads = len(model.decoder.blocks), model.cfg.n_heads
    hits = torch.zeros(n_layers, n_heads + 1)
    mass = torch.zeros(n_layers, n_heads + 1)
    steps = 0
    example = {}
    for i, pair in enumerate(pairs):
        src, tgt = torch.tensor([pair.source_ids]), torch.tensor([pair.target_ids[:-1]])
        names = [f"decoder.blocks.{layer}.cross_attn.hook_pattern" for layer in range(n_layers)]
        _, cache = model.run_with_cache(src, tgt, names_filter=names)
        aligned = torch.tensor(pair.alignment + [len(pair.source)])  # the last step predicts </s>: reads </s>
        for layer in range(n_layers):
            pattern = cache[names[layer]][0]  # [heads, target step, source]
            pattern = torch.cat([pattern, pattern.mean(0, keepdim=True)])  # + the head mean
            hits[layer] += (pattern.argmax(-1) == aligned).float().sum(-1)
            mass[layer] += pattern.gather(-1, aligned[None, :, None].expand(pattern.shape[0], -1, 1))[..., 0].sum(-1)
            if i == 0:
                example.setdefault("patterns", []).append(pattern[-1].tolist())
        steps += len(aligned)
    hits, mass = hits / steps, mass / steps
    layer = int(hits[:, -1].argmax())
    pair = pairs[0]
    example = {"layer": layer, "pattern": example["patterns"][layer], "source": pair.source + ["</s>"],
               "target": pair.target + ["</s>"], "alignment": pair.alignment + [len(pair.source)],
               "source_text": pair.source_text}
    return hits, mass, example


@torch.no_grad()
def _encoder_roles(model, pairs) -> torch.Tensor:
    n_layers, n_heads = len(model.encoder.blocks), model.cfg.n_heads
    sums = torch.zeros(n_layers, n_heads, len(ROLES))
    counts = torch.zeros(len(ROLES))
    for pair in pairs:
        src = torch.tensor([pair.source_ids])
        names = [f"encoder.blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
        _, cache = model.run_with_cache(src, torch.tensor([[toy.BOS]]), names_filter=names)  # the encoder's patterns
        eos = len(pair.source)
        nouns = {"subj": pair.roles.index("subj"), "obj": pair.roles.index("obj")}
        for q, role in enumerate(pair.roles):
            targets = {"self": [q], "</s>": [eos]}
            if role.endswith("_adj"):
                targets["adjective -> its noun"] = [nouns[role[:-4]]]
            else:
                own = [k for k, r in enumerate(pair.roles) if r == f"{role}_adj"]
                if own and role in nouns:
                    targets["noun -> its adjectives"] = own
            for r_i, role_name in enumerate(ROLES):
                if role_name not in targets:
                    continue
                counts[r_i] += 1
                for layer in range(n_layers):
                    sums[layer, :, r_i] += cache[names[layer]][0, :, q, targets[role_name]].sum(-1)
    return sums / counts.clamp(min=1)


@torch.no_grad()
def _positions(model, pairs) -> tuple[float, float, torch.Tensor]:
    W_pos = model.encoder.pos_embed.W_pos
    scale = model.cfg.embed_scale or 1.0
    ratios, token_parts, position_parts = [], [], []
    for pair in pairs:
        ids = torch.tensor(pair.source_ids)
        tok = model.W_E[ids] * scale
        pos = W_pos[: len(ids)]
        ratios.append((pos.norm(dim=-1) / tok.norm(dim=-1)).mean())
        token_parts.append(tok)
        position_parts.append(pos)
    tok, pos = torch.cat(token_parts), torch.cat(position_parts)
    total = tok + pos
    share = float(((pos - pos.mean(0)).pow(2).sum()) / (total - total.mean(0)).pow(2).sum())
    n = 12
    unit = torch.nn.functional.normalize(W_pos[:n], dim=-1)
    return float(torch.stack(ratios).mean()), share, unit @ unit.T


def _patching_pairs(n: int, seed: int):
    """Clean and corrupted sentences (the object noun swapped) of one shape, the decoder's shared prefix
    (up to the object's translation) and the two answers."""
    gen = torch.Generator().manual_seed(seed)
    clean, corrupt, prefix, good, bad = [], [], [], [], []
    for _ in range(n):
        nouns = torch.randperm(len(toy.NOUNS), generator=gen)[:3].tolist()
        adjs = torch.randperm(len(toy.ADJECTIVES), generator=gen)[:2].tolist()
        verb = toy.VERBS[int(torch.randint(len(toy.VERBS), (1,), generator=gen))]
        subj, obj, other = (toy.NOUNS[i] for i in nouns)
        a, b = (toy.ADJECTIVES[i] for i in adjs)
        p, q = toy.make_pair(subj, [a], verb, obj, [b]), toy.make_pair(subj, [a], verb, other, [b])
        clean.append(p.source_ids)
        corrupt.append(q.source_ids)
        prefix.append(p.target_ids[:3])  # <s>, subject, its adjective: the next word is the object
        good.append(toy.WORD_ID[toy.LEXICON[obj]])
        bad.append(toy.WORD_ID[toy.LEXICON[other]])
    return torch.tensor(clean), torch.tensor(corrupt), torch.tensor(prefix), torch.tensor(good), torch.tensor(bad)


def _patching(model, n_pairs: int, seed: int, progress: bool) -> dict:
    from interp.patching import logit_diff, seq2seq_patch

    clean, corrupt, prefix, good, bad = _patching_pairs(n_pairs, seed)
    metric = logit_diff(good, bad, normalized=True)
    sweeps = {"encoder resid_pre": ("encoder", "resid_pre"), "decoder resid_pre": ("decoder", "resid_pre"),
              "decoder cross_attn_out": ("decoder", "cross_attn_out")}
    return {name: seq2seq_patch(model, clean, corrupt, prefix, stack=stack, kind=kind, metric=metric,
                                progress=progress) for name, (stack, kind) in sweeps.items()}


def seq2seq_study(model, n_sentences: int = 200, n_patching_pairs: int = 8, seed: int = 7,
                  progress: bool = False) -> Seq2SeqResult:
    """Translation, alignment, encoder self-attention, positions and patching on the toy task."""
    from models.translation import exact_match

    if not getattr(model.cfg, "encoder_decoder", False):
        raise ValueError(f"the seq2seq study reads an encoder-decoder; {model.cfg.model_name} is not one")
    start = time.perf_counter()
    pairs = toy.pairs(n_sentences, seed=seed)
    hits, mass, example = _alignment(model, pairs)
    ratio, share, similarity = _positions(model, pairs)
    return Seq2SeqResult(model.cfg.model_name, n_sentences, exact_match(model, pairs), hits, mass,
                         _encoder_roles(model, pairs), ratio, share, similarity, example,
                         _patching(model, n_patching_pairs, seed + 1, progress), time.perf_counter() - start)


def main(argv=None) -> None:
    import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="translation-2l")
    parser.add_argument("--out", default="reports/seq2seq")
    parser.add_argument("--sentences", type=int, default=200)
    args = parser.parse_args(argv)
    result = seq2seq_study(models.load(args.model), n_sentences=args.sentences, progress=True)
    print(result.headline())
    print("wrote", result.save(args.out))


if __name__ == "__main__":
    main()
