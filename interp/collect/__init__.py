"""Activations over a corpus bigger than memory.

    from interp.collect import collect_activations, default_corpus, ActivationDataset, export_saelens

    ds = collect_activations(model, default_corpus(), ["blocks.5.hook_resid_post"], "acts/", seq_len=128)
    for x in ds.batches("blocks.5.hook_resid_post", 4096, seed=0):   # [4096, d_model]
        ...
    export_saelens("acts/", "blocks.5.hook_resid_post", "acts-saelens/")

`corpus` (texts, files, token ids; the bundled Wikipedia summaries), `packing` (SAELens's BOS
convention), `run` (collect_activations: shards, resume, torchrun ranks), `shards` (the files and
manifest.json), `dataset` (memory-mapped reads, shuffled batches), `saelens` (the export).
"""

from interp.collect.corpus import Corpus, CorpusFormatError, EmptyCorpusError, default_corpus, load_corpus
from interp.collect.dataset import ActivationDataset, ActivationRows
from interp.collect.packing import pack
from interp.collect.run import collect_activations
from interp.collect.saelens import export_saelens
from interp.collect.shards import IncompatibleOutputError

__all__ = [
    "ActivationDataset", "ActivationRows", "Corpus", "CorpusFormatError", "EmptyCorpusError",
    "IncompatibleOutputError", "collect_activations", "default_corpus", "export_saelens", "load_corpus", "pack",
]
