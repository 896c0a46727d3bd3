"""What a training run reads and writes besides the dictionary: the batches, and its checkpoints.

A checkpoint is one torch file, `checkpoint-{tokens:012d}.pt`, written under a temporary name, fsync'd and
renamed (a file under its final name is whole); the newest `keep` are kept. It carries the run's identity
(the dictionary's config, the training options that change the weights, the collection's identity), and a
resume refuses one whose identity differs, naming the fields.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from interp.collect.dataset import ActivationDataset

__all__ = ["IncompatibleCheckpointError", "data_identity", "latest_checkpoint", "paired_batches", "save_checkpoint"]


class IncompatibleCheckpointError(ValueError):
    """checkpoint_dir holds a checkpoint of a different run; the message names the fields that differ."""


def save_checkpoint(directory, tokens: int, state: dict, keep: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"checkpoint-{tokens:012d}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(directory.glob("checkpoint-*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(directory, identity: dict, device) -> dict | None:
    """The newest checkpoint's state in `directory` (None if there is none); raises if it is another run's."""
    found = sorted(Path(directory).glob("checkpoint-*.pt"))
    if not found:
        return None
    state = torch.load(found[-1], map_location=device, weights_only=True)
    differ = differences(state["identity"], identity)
    if differ:
        raise IncompatibleCheckpointError(
            f"{found[-1]} is a checkpoint of another run ({'; '.join(differ)}): use another checkpoint_dir, or "
            "delete its checkpoints to start over")
    return state


def paired_batches(ds: ActivationDataset, hooks: list[str], batch_size: int, seed: int):
    """Batches of the input hook, and of the output hook for a transcoder (None for an SAE), row-aligned.

    ActivationDataset.batches draws the same permutations for two hooks when their buffers hold the same
    number of rows, so each hook gets buffer_bytes = rows x its own row size."""
    rows_per_buffer = max(batch_size, (256 * 2**20) // row_bytes(ds, hooks[0]))
    streams = [ds.batches(h, batch_size, seed=seed, drop_last=True, buffer_bytes=rows_per_buffer * row_bytes(ds, h))
               for h in hooks]
    if len(streams) == 1:
        for x in streams[0]:
            yield x.reshape(x.shape[0], -1), None
    else:
        for x, y in zip(*streams):
            yield x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)


def row_bytes(ds: ActivationDataset, hook: str) -> int:
    return math.prod(ds.shape(hook)[1:]) * ds.tensor(0, hook).element_size()


def data_identity(ds: ActivationDataset) -> dict:
    m = ds.manifest
    return {"model": m["model"], "packing": {k: m["packing"].get(k) for k in ("seq_len", "n_sequences", "tokens_hash")},
            "positions": m["positions"], "hooks": m["hooks"], "dtype": m["dtype"]}


def differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out
