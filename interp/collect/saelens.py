"""export_saelens: one hook of a collection in the layout SAELens's cached-activation loader reads.

SAELens's `CacheActivationsRunner` saves a Hugging Face `datasets` folder (`Dataset.save_to_disk`):
one row per sequence, a column named by the hook, `Array2D(shape=(context_size, d_in))` in the
stored dtype, and `token_ids`, a fixed-length `Sequence(Value("int32"))` of the same context_size.
Its `ActivationsStore(cached_activations_path=...)` loads that with `datasets.load_from_disk` and
checks the column's shape against `(context_size, d_in)`. With kept positions, context_size is the
number of kept positions (SAELens's `seqpos_slice` does the same) and token_ids are the tokens at
those positions. Rows stay in collection order; SAELens shuffles when it reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from interp.collect.dataset import ActivationDataset


def _datasets():
    try:
        import datasets
    except ImportError:  # an optional dependency: only the export needs it
        raise ImportError("export_saelens writes a Hugging Face datasets folder: pip install datasets") from None
    return datasets


def export_saelens(out_dir, hook: str, dest, *, dtype: str | None = None) -> Path:
    """Write `hook` of the collection in `out_dir` to `dest` as SAELens's cached activations; returns dest.

    dtype: the column's dtype ("float32", "float16"); None keeps the stored one. bfloat16 has no
    Arrow type, so bfloat16 collections need dtype="float32". `dest` must not exist or be empty.
    """
    source = ActivationDataset(out_dir)
    shape = source.shape(hook)
    if len(shape) != 2:
        raise ValueError(f"SAELens caches one vector per token; {hook!r} stores {list(shape)} per sequence "
                         "([positions, ...]): export a hook of shape [positions, d]")
    stored = str(source.tensor(0, hook).dtype).removeprefix("torch.")
    dtype = dtype or stored
    if dtype == "bfloat16":
        raise ValueError(f"{hook!r} is stored as bfloat16, which Arrow (and so SAELens's cache) cannot hold: "
                         "pass dtype='float32'")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not empty: nothing was overwritten; choose a new folder")
    datasets = _datasets()
    from datasets.arrow_writer import ArrowWriter

    n_pos, d_in = shape
    features = datasets.Features({
        hook: datasets.Array2D(shape=(n_pos, d_in), dtype=dtype),
        "token_ids": datasets.Sequence(datasets.Value("int32"), length=n_pos),
    })
    work = dest.with_name(f".{dest.name}.export-tmp")
    shutil.rmtree(work, ignore_errors=True)  # a previous export that was killed
    work.mkdir(parents=True)
    try:
        arrow = work / "data.arrow"
        with ArrowWriter(features=features, path=str(arrow)) as writer:
            for k in range(len(source.shards)):
                acts = source.tensor(k, hook).to(getattr(torch, dtype)).numpy()
                tokens = source._tokens_at_positions(k).numpy().astype(np.int32)
                writer.write_batch({hook: acts, "token_ids": tokens})
            writer.finalize()
        staged = work / "dataset"
        datasets.Dataset.from_file(str(arrow)).save_to_disk(str(staged))
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(staged, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
