"""ActivationDataset: a finished collection, read through memory maps (nothing is loaded until indexed).

    ds = ActivationDataset("acts/")
    ds[0]                                     # {hook: [positions, *features], "tokens": [positions], "sequence": 0}
    ds.load("blocks.5.hook_resid_post")       # [sequences, positions, d_model], in memory
    for x in ds.batches("blocks.5.hook_resid_post", 4096, seed=0):   # [4096, d_model], shuffled, every row once
        ...
    ds.rows("blocks.5.hook_resid_post")       # a torch Dataset of single token rows, for a DataLoader

What a dictionary (SAE) trainer wants is flat rows `[n_tokens, d]` of one hook, shuffled across the
whole collection, with memory bounded whatever its size: `batches` permutes the shard order, then
loads shards up to `buffer_bytes` of that one hook at a time and permutes the rows inside that
buffer (SAELens's activation store mixes the same way). Rows left over from one buffer carry into
the next, so an epoch yields every row exactly once; the same seed gives the same batches.
"""

from __future__ import annotations

import bisect
import math
from pathlib import Path
from typing import Iterator

import torch

from interp.collect.shards import memmap, read_header, read_manifest

DEFAULT_BUFFER_BYTES = 512 * 2**20


class ActivationDataset(torch.utils.data.Dataset):
    """Sequences of a collection written by `collect_activations`; `len` is the number of sequences."""

    def __init__(self, out_dir) -> None:
        self.path = Path(out_dir)
        self.manifest = read_manifest(self.path)
        self.hooks: list[str] = list(self.manifest["hooks"])
        packing = self.manifest["packing"]
        self.seq_len: int = packing["seq_len"]
        self.n_sequences: int = packing["n_sequences"]
        self.positions: list[int] = self.manifest["positions"] or list(range(self.seq_len))
        self.shards = self.manifest["shards"]
        self._starts = [s["sequences"][0] for s in self.shards]
        missing = [s["file"] for s in self.shards if not (self.path / s["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path} lacks {len(missing)} shard(s) its manifest lists ({missing[0]}, ...): "
                                    "copy the whole folder, or collect again")
        self._maps: dict[tuple[int, str], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"ActivationDataset({str(self.path)!r}: {self.n_sequences} sequences x {len(self.positions)} positions"
                f" of {self.manifest['model']['name']}, hooks {self.hooks})")

    def __len__(self) -> int:
        return self.n_sequences

    @property
    def n_tokens(self) -> int:
        """Rows of each hook: sequences x kept positions."""
        return self.n_sequences * len(self.positions)

    def shape(self, hook: str) -> tuple[int, ...]:
        """A sequence's stored shape for `hook`: [positions, *features]."""
        return tuple(self.manifest["hooks"][self._hook(hook)]["shape"])

    def _hook(self, hook: str) -> str:
        if hook not in self.manifest["hooks"]:
            raise KeyError(f"{hook!r} was not collected into {self.path}; it holds {', '.join(self.hooks)}")
        return hook

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memory maps themselves
        return {**self.__dict__, "_maps": {}}

    def tensor(self, shard: int, name: str) -> torch.Tensor:
        """Tensor `name` (a hook or "tokens") of shard `shard`, memory-mapped."""
        key = (shard, name)
        if key not in self._maps:
            path = self.path / self.shards[shard]["file"]
            header, start = read_header(path)
            self._maps[key] = memmap(path, name, header, start)
        return self._maps[key]

    def _locate(self, index: int) -> tuple[int, int]:
        if not -self.n_sequences <= index < self.n_sequences:
            raise IndexError(f"sequence {index} is out of range for {self.n_sequences} sequences")
        index %= self.n_sequences
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _tokens_at_positions(self, shard: int) -> torch.Tensor:
        tokens = self.tensor(shard, "tokens")
        return tokens if self.manifest["positions"] is None else tokens[:, self.positions]

    def __getitem__(self, index: int) -> dict:
        shard, row = self._locate(int(index))
        item = {hook: self.tensor(shard, hook)[row].clone() for hook in self.hooks}
        item["tokens"] = self._tokens_at_positions(shard)[row].long()
        item["sequence"] = int(index) % self.n_sequences
        return item

    def tokens(self) -> torch.Tensor:
        """Every packed sequence `[sequences, seq_len]` (int64), all positions."""
        return torch.cat([self.tensor(k, "tokens") for k in range(len(self.shards))]).long()

    def load(self, hook: str) -> torch.Tensor:
        """All of `hook` in memory: `[sequences, positions, *features]`."""
        hook = self._hook(hook)
        return torch.cat([self.tensor(k, hook) for k in range(len(self.shards))])

    def rows(self, hook: str, with_tokens: bool = False) -> "ActivationRows":
        """A torch Dataset of single token rows of `hook` (`[*features]`, or (row, token id))."""
        return ActivationRows(self, self._hook(hook), with_tokens)

    def batches(self, hook: str, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                with_tokens: bool = False, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> Iterator:
        """Batches of flat rows `[batch, *features]` of `hook` (with `[batch]` token ids when with_tokens).

        Every row appears exactly once (the last batch is smaller unless drop_last); shuffle=False keeps
        the collection's order (sequence, then position). The same seed gives the same batches.
        """
        hook = self._hook(hook)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        features = self.shape(hook)[1:]
        item = torch.empty((), dtype=self.tensor(0, hook).dtype).element_size()
        row_bytes = max(1, math.prod(features) * item)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=generator).tolist() if shuffle else range(len(self.shards))
        carry: list[torch.Tensor] = []
        group: list[int] = []
        held = 0
        for position, shard in enumerate(order):
            group.append(shard)
            held += self.tensor(shard, hook).shape[0] * len(self.positions)
            last = position == len(self.shards) - 1
            if held * row_bytes < buffer_bytes and not last:
                continue
            acts = torch.cat(carry[:1] + [self.tensor(k, hook).reshape(-1, *features) for k in group])
            toks = torch.cat(carry[1:] + [self._tokens_at_positions(k).reshape(-1).long() for k in group]) \
                if with_tokens else None
            if shuffle:
                perm = torch.randperm(acts.shape[0], generator=generator)
                acts, toks = acts[perm], (toks[perm] if with_tokens else None)
            full = acts.shape[0] - acts.shape[0] % batch_size if not last else acts.shape[0]
            for start in range(0, full, batch_size):
                batch = acts[start:start + batch_size]
                if last and drop_last and batch.shape[0] < batch_size:
                    break
                yield (batch, toks[start:start + batch_size]) if with_tokens else batch
            carry = [acts[full:]] + ([toks[full:]] if with_tokens else [])
            group, held = [], carry[0].shape[0]


class ActivationRows(torch.utils.data.Dataset):
    """Token rows of one hook of an ActivationDataset: index j is sequence j // positions, position j % positions."""

    def __init__(self, dataset: ActivationDataset, hook: str, with_tokens: bool = False) -> None:
        self.dataset, self.hook, self.with_tokens = dataset, hook, with_tokens

    def __len__(self) -> int:
        return self.dataset.n_tokens

    def __getitem__(self, index: int):
        n_pos = len(self.dataset.positions)
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} is out of range for {len(self)} rows")
        sequence, pos = divmod(int(index) % len(self), n_pos)
        shard, row = self.dataset._locate(sequence)
        act = self.dataset.tensor(shard, self.hook)[row, pos].clone()
        if not self.with_tokens:
            return act
        return act, int(self.dataset._tokens_at_positions(shard)[row, pos])
