"""A toy translation task that needs reordering, with every alignment known.

Source ("English", subject-verb-object, adjectives before their noun):

    big red fox chases small cat </s>

Target (subject-object-verb, adjectives after their noun in reverse order, every word
replaced by its own target word):

    <s> foxa redo bigo cata smallo chaseu </s>

Each target word translates exactly one source word, so the alignment (which source
position each target position translates) is known exactly; the decoder must read the
source out of order (the verb last, adjectives after their noun, reversed), which is what
its cross-attention has to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOUNS = ["cat", "dog", "bird", "fish", "fox", "cow", "horse", "mouse", "wolf", "bear", "frog", "duck", "goat", "lion",
         "sheep", "pig"]
ADJECTIVES = ["big", "small", "red", "blue", "old", "young", "fast", "slow"]
VERBS = ["sees", "likes", "chases", "bites", "finds", "helps", "hears", "follows"]
SPECIALS = ["<pad>", "<s>", "</s>"]
PAD, BOS, EOS = 0, 1, 2


def _target_word(word: str, kind: str) -> str:
    """The target language's word for a source word: its consonant frame and a class vowel (N: a, A: o, V: u)."""
    stem = word[:-1] if word.endswith(("s", "e")) and kind == "verb" else word
    return stem + {"noun": "a", "adjective": "o", "verb": "u"}[kind]


SOURCE_WORDS = NOUNS + ADJECTIVES + VERBS
LEXICON = {w: _target_word(w, kind) for kind, words in (("noun", NOUNS), ("adjective", ADJECTIVES), ("verb", VERBS))
           for w in words}
TARGET_WORDS = [LEXICON[w] for w in SOURCE_WORDS]
VOCAB = SPECIALS + SOURCE_WORDS + TARGET_WORDS
assert len(set(VOCAB)) == len(VOCAB), "source and target words are distinct tokens"
WORD_ID = {w: i for i, w in enumerate(VOCAB)}


@dataclass
class Pair:
    source: list[str]  # words, without </s>
    target: list[str]
    alignment: list[int]  # target word i translates source word alignment[i]
    roles: list[str]  # each source word's role: "subj", "subj_adj", "verb", "obj", "obj_adj"

    @property
    def source_ids(self) -> list[int]:
        return [WORD_ID[w] for w in self.source] + [EOS]

    @property
    def target_ids(self) -> list[int]:
        return [BOS] + [WORD_ID[w] for w in self.target] + [EOS]

    @property
    def source_text(self) -> str:
        return " ".join(self.source)

    @property
    def target_text(self) -> str:
        return " ".join(self.target)


def make_pair(subject: str, subject_adjs: list[str], verb: str, obj: str, object_adjs: list[str]) -> Pair:
    source, roles = [], []

    def add(words: list[str], role: str) -> list[int]:
        """Append words in one role; their source positions."""
        start = len(source)
        source.extend(words)
        roles.extend([role] * len(words))
        return list(range(start, len(source)))

    s_adjs, (s_noun,) = add(subject_adjs, "subj_adj"), add([subject], "subj")
    (v,) = add([verb], "verb")
    o_adjs, (o_noun,) = add(object_adjs, "obj_adj"), add([obj], "obj")
    # Target order: subject noun, its adjectives reversed, object noun, its adjectives reversed, verb.
    order = [s_noun] + s_adjs[::-1] + [o_noun] + o_adjs[::-1] + [v]
    return Pair(source, [LEXICON[source[i]] for i in order], order, roles)


def sample_pair(gen: torch.Generator, max_adjectives: int = 2) -> Pair:
    def pick(words):
        return words[int(torch.randint(len(words), (1,), generator=gen))]

    def adjectives():
        n = int(torch.randint(max_adjectives + 1, (1,), generator=gen))
        chosen = torch.randperm(len(ADJECTIVES), generator=gen)[:n].tolist()
        return [ADJECTIVES[i] for i in chosen]

    subject, obj = pick(NOUNS), pick(NOUNS)
    return make_pair(subject, adjectives(), pick(VERBS), obj, adjectives())


def pairs(n: int, seed: int) -> list[Pair]:
    gen = torch.Generator().manual_seed(seed)
    return [sample_pair(gen) for _ in range(n)]


def collate(batch: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source ids, source mask, target ids, target mask), right-padded, for a batch of pairs."""
    def pad(rows):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask

    src, src_mask = pad([p.source_ids for p in batch])
    tgt, tgt_mask = pad([p.target_ids for p in batch])
    return src, src_mask, tgt, tgt_mask


def batches(batch_size: int, seed: int):
    """An endless stream of training batches (collated), deterministic from the seed."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield collate([sample_pair(gen) for _ in range(batch_size)])


def build_tokenizer():
    """A word-level tokenizer over VOCAB: whitespace-split words, </s> appended to each text (the source
    convention); decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.WordLevel(WORD_ID, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")
