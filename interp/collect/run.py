"""collect_activations: run a model over a corpus and write chosen hooks' activations to sharded files.

Shards are fixed ranges of the packed sequences (`sequences_per_shard` each, from `shard_bytes`),
so their names and contents never depend on how the work was split: a single process, a resumed
run and a `torchrun` of any world size write the same files, byte for byte. Under `torchrun` rank r
takes shards r, r + world, r + 2 world, ...; rank 0 writes the manifest once every rank is done.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import inspect
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from interp.collect.corpus import load_corpus
from interp.collect.dataset import ActivationDataset
from interp.collect.packing import document_ids, pack, tokenizer_identity
from interp.collect.shards import (FORMAT, FORMAT_VERSION, MANIFEST, check_out_dir, identity_of, shard_name,
                                   write_json, write_shard)
from interp.names import HookNameError, closest_names
from interp.tokens import bos_id, require_tokenizer

DEFAULT_SHARD_BYTES = 256 * 2**20
# Hooks whose position axis is not axis 1 ([batch, head, query, key]): stored query-major,
# [sequences, query, head, key], so that every hook is one row per token.
QUERY_MAJOR = ("hook_pattern", "hook_attn_scores")
CONVENTION = ("documents tokenised without special tokens, joined with BOS between them, cut into rows of seq_len "
              "that each begin with BOS; the last partial row dropped (SAELens's defaults)")


def collect_activations(model, corpus, hooks, out_dir, *, seq_len: int, positions=None, dtype=None,
                        batch_size: int = 8, shard_bytes: int = DEFAULT_SHARD_BYTES, max_sequences: int | None = None,
                        max_tokens: int | None = None, prepend_bos: bool | None = None,
                        progress: bool = True) -> ActivationDataset:
    """Run `model` over `corpus` and write `hooks`' activations to `out_dir`; returns the ActivationDataset.

    corpus: anything `load_corpus` reads (None: the bundled English Wikipedia summaries).
    hooks: hook names, short keys (`("resid_post", 3)`), globs (`"blocks.*.hook_resid_post"`) or a filter.
    seq_len: tokens per packed sequence. Documents are tokenised without special tokens and joined with
      BOS between them; every row of seq_len begins with BOS (SAELens's and TransformerLens' convention;
      `interp.collect.packing`). prepend_bos=False packs without BOS; None uses BOS when the tokenizer
      (or the config, for token-id corpora) has one.
    positions: None for every position, or a list / slice of positions (negative counts from the end)
      to keep, e.g. [-1] or slice(1, None) (every position but the BOS).
    dtype: what activations are stored as (e.g. torch.float16); None keeps the model's dtype. Integer
      hooks (expert indices) stay integers.
    batch_size: sequences per forward. shard_bytes: about how big each shard is (default 256 MiB);
      two shards' worth of memory are held (one filling while the other is written).
    max_sequences / max_tokens: stop packing after this many sequences (tokens, rounded up to sequences).

    Each forward is `model(tokens, stop_at_layer=deepest hooked layer + 1, return_type=None)`. Every shard
    is written under a temporary name and renamed when complete; calling again with the same arguments
    after a crash or kill skips the finished shards, and the result is byte-identical to an uninterrupted
    run. Bad input (an empty corpus, unknown hooks, an out_dir holding another collection) raises before
    anything is written. Under `torchrun` (torch.distributed initialised, or RANK and WORLD_SIZE set, when
    a gloo group is started here and destroyed at the end) rank r writes shards r, r + world, ...; rank 0
    writes the manifest after every rank has finished, and the files equal a single process's.
    """
    out_dir = Path(out_dir)
    corpus = load_corpus(corpus).require_text()
    names = resolve_hooks(model, hooks)
    _check_model(model, seq_len, batch_size)
    positions = normalize_positions(positions, seq_len)
    tokenizer = getattr(model, "tokenizer", None)
    if not corpus.is_tokens:
        require_tokenizer(tokenizer, getattr(model, "source", "its source"))
    bos = _bos(model, tokenizer, prepend_bos)
    rank, world, owned = _distributed()
    try:
        return _collect(model, corpus, names, out_dir, tokenizer, bos, rank, world, seq_len=seq_len,
                        positions=positions, dtype=dtype, batch_size=batch_size, shard_bytes=shard_bytes,
                        max_sequences=max_sequences, max_tokens=max_tokens, progress=progress)
    finally:
        if owned:
            torch.distributed.destroy_process_group()


def _collect(model, corpus, names, out_dir: Path, tokenizer, bos, rank: int, world: int, *, seq_len, positions, dtype,
             batch_size, shard_bytes, max_sequences, max_tokens, progress) -> ActivationDataset:
    limit = max_sequences if max_tokens is None else min(max_sequences or math.inf, math.ceil(max_tokens / seq_len))
    if limit is not None and limit < 1:
        raise ValueError(f"max_sequences={max_sequences}, max_tokens={max_tokens} leave nothing to collect: pass "
                         "at least 1, or None for the whole corpus")
    tokens = pack(document_ids(corpus, tokenizer), seq_len, bos, limit)  # [n_sequences, seq_len] int32
    _check_vocab(model, tokens)
    capture = _Capture(model, names, positions, _as_dtype(dtype))
    # The shapes come from a forward of the first batch, which the rank that writes shard 0 keeps as that
    # shard's first batch (no forward is spent on probing); other ranks probe one sequence.
    first = tokens[:batch_size] if rank == 0 and not (out_dir / shard_name(0)).exists() else tokens[:1]
    specs = capture.probe(first)
    per_sequence = sum(math.prod(s["shape"]) * s["itemsize"] for s in specs.values()) + 4 * seq_len
    per_shard = min(len(tokens), max(1, shard_bytes // per_sequence))
    if per_shard > batch_size:
        per_shard -= per_shard % batch_size  # whole batches only: the same forwards in every run
    plan = [(a, min(a + per_shard, len(tokens))) for a in range(0, len(tokens), per_shard)]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": model_identity(model),
        "tokenizer": tokenizer_identity(tokenizer),
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint, "documents": len(corpus)},
        "packing": {"seq_len": seq_len, "bos_token_id": bos, "n_sequences": len(tokens),
                    "n_tokens": int(tokens.size), "tokens_hash": hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
                    "convention": CONVENTION if bos is not None else "documents concatenated, no special tokens"},
        "positions": positions,
        "dtype": None if dtype is None else str(_as_dtype(dtype)).removeprefix("torch."),
        "hooks": {n: {"shape": s["shape"], "dtype": s["dtype"], "stored": s["stored"]} for n, s in specs.items()},
        "stop_at_layer": capture.stop,
        "batch_size": batch_size,
        "sequences_per_shard": per_shard,
    }
    identity = identity_of(manifest)
    check_out_dir(out_dir, identity)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = [k for k in range(len(plan)) if k % world == rank]
    todo = [k for k in mine if not (out_dir / shard_name(k)).exists()]  # a finished shard: same identity
    total = sum(plan[k][1] - plan[k][0] for k in mine) * seq_len
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=total - sum(plan[k][1] - plan[k][0] for k in todo) * seq_len, unit="tok",
              unit_scale=True, desc=f"collect {manifest['model']['name']}" + (f" rank {rank}" if world > 1 else ""),
              disable=not progress or rank != 0) as bar:
        capture.run(tokens, [(k, *plan[k]) for k in todo], out_dir, identity, batch_size, bar)
    _finish(out_dir, manifest, plan, rank, world)
    return ActivationDataset(out_dir)


class _Capture:
    """Forward hooks that copy each hook's activations (at the kept positions) into a shard's buffers."""

    def __init__(self, model, names: list[str], positions: list[int] | None, dtype: torch.dtype | None) -> None:
        self.model, self.names, self.dtype = model, names, dtype
        self.stop = stop_layer(model, names)
        self.device = torch.device(model.device)  # both HookedTransformer and interp.attach's wrapper have it
        self.index = None if positions is None else torch.tensor(positions, device=self.device)
        self.buffers: dict[str, torch.Tensor] = {}
        self.row = 0
        self.takes_stop = "stop_at_layer" in inspect.signature(model.forward).parameters
        self.store = _read_only(lambda tensor, hook: self._put(hook.name, tensor))

    def _select(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        if name.endswith(QUERY_MAJOR):
            tensor = tensor.movedim(2, 1)
        return tensor if self.index is None else tensor.index_select(1, self.index)

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        buf = self.buffers[name]
        buf[self.row:self.row + tensor.shape[0]].copy_(self._select(tensor, name), non_blocking=buf.is_pinned())

    def _forward(self, tokens, fn) -> None:
        with torch.no_grad(), self.model.hooks(fwd_hooks=[(n, fn) for n in self.names]):
            if not self.takes_stop:  # a module hooked with interp.attach runs whole
                self.model(tokens)
            elif self.stop is None:
                self.model(tokens, return_type=None)
            else:
                self.model(tokens, stop_at_layer=self.stop, return_type=None)

    def probe(self, tokens) -> dict[str, dict]:
        """Each hook's stored shape [positions, *features], dtype and item size, from one sequence."""
        seen: dict[str, torch.Tensor] = {}

        @_read_only
        def record(tensor, hook) -> None:
            if hook.name not in seen:  # a copy: the forward may still edit the tensor in place after its hook
                seen[hook.name] = tensor.detach().clone()

        self._forward(torch.as_tensor(tokens, device=self.device).long(), record)
        specs = {}
        for name in self.names:
            if name not in seen:
                raise HookNameError(f"hook {name!r} did not fire on a forward of this model, so it has nothing to "
                                    "collect (an opt-in hook needs its switch on, e.g. set_use_attn_result(True))")
            t = seen[name]
            axis = 2 if name.endswith(QUERY_MAJOR) else 1
            if t.dim() <= axis or t.shape[axis] != tokens.shape[1]:
                raise ValueError(f"hook {name!r} has shape {tuple(t.shape)}, with no position axis of length seq_len="
                                 f"{tokens.shape[1]} (axis {axis}); collect hooks that hold one entry per token")
            stored = self._select(t, name)
            dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
            specs[name] = {"shape": list(stored.shape[1:]), "dtype": str(dtype).removeprefix("torch."),
                           "itemsize": torch.empty((), dtype=dtype).element_size(), "torch_dtype": dtype,
                           "stored": "[sequence, query, head, key]" if axis == 2 else "[sequence, position, ...]"}
        self.specs = specs
        self.probed = seen  # the probe batch's activations, kept for shard 0
        return specs

    def _allocate(self, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
        pin = self.device.type == "cuda"
        bufs = {n: torch.empty((rows, *s["shape"]), dtype=s["torch_dtype"], pin_memory=pin)
                for n, s in self.specs.items()}
        bufs["tokens"] = torch.empty((rows, seq_len), dtype=torch.int32)
        return bufs

    def run(self, tokens, shards: list[tuple[int, int, int]], out_dir: Path, identity: dict, batch_size: int,
            bar) -> None:
        """Fill and write `shards` (index, first, end sequence): one fills while the previous one is written."""
        if not shards:
            return
        rows = max(b - a for _, a, b in shards)
        slots: list[dict | None] = [None, None]
        pending: dict[int, object] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as writer:
            for i, (k, a, b) in enumerate(shards):
                slot = i % 2
                if slot in pending:
                    pending.pop(slot).result()  # its buffers are free again (and a write error surfaces here)
                self.buffers = slots[slot] = slots[slot] or self._allocate(rows, tokens.shape[1])
                for start in range(a, b, batch_size):
                    batch = torch.from_numpy(tokens[start:min(start + batch_size, b)])
                    self.row = start - a
                    probed = self.probed if start == 0 else {}
                    if probed and next(iter(probed.values())).shape[0] == batch.shape[0]:  # the same forward
                        for name, tensor in probed.items():
                            self._put(name, tensor)
                    else:
                        self._forward(batch.to(self.device, torch.long), self.store)
                    self.probed = {}
                    bar.update(batch.numel())
                self.buffers["tokens"][:b - a].copy_(torch.from_numpy(tokens[a:b]))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the non-blocking copies have landed
                shard = {n: t[:b - a] for n, t in self.buffers.items()}
                meta = {"identity": identity, "shard": k, "sequences": [a, b]}
                pending[slot] = writer.submit(write_shard, out_dir / shard_name(k), shard, meta)
            for future in pending.values():
                future.result()


def _read_only(fn):
    # The hooks only copy: a model may then compute the activation off its fast path (a hooked pattern
    # keeps the fused attention kernel; interp.hooks' read_only).
    fn.read_only = True
    return fn


def _finish(out_dir: Path, manifest: dict, plan, rank: int, world: int) -> None:
    """Rank 0 writes the manifest once every rank's shards are on disk; every rank learns whether it did."""
    if world > 1:
        torch.distributed.barrier()
    error = None
    if rank == 0:
        shards = []
        for k, (a, b) in enumerate(plan):
            path = out_dir / shard_name(k)
            if not path.exists():
                error = f"{path.name} is missing after every rank finished: run again to write it"
                break
            shards.append({"file": path.name, "sequences": [a, b], "bytes": path.stat().st_size})
        if error is None:
            write_json(out_dir / MANIFEST, {**manifest, "shards": shards})
    if world > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RuntimeError(error)


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we initialised the process group and must destroy it)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1 and "RANK" in os.environ:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run one process")
        dist.init_process_group("gloo")  # torchrun's env:// rendezvous; gloo needs no accelerator
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def model_identity(model) -> dict:
    """Name, a hash of the config (device excluded) and a hash of a sample of every weight."""
    cfg = model.cfg
    fields = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    fields.pop("device", None)
    config = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        # The first and last 256 entries of every tensor tell checkpoints apart without reading them whole
        # (gathered by index: most weights are transposed views, which reshape(-1) would copy whole).
        n = t.numel()
        index = torch.cat([torch.arange(min(256, n)), torch.arange(max(n - 256, 0), n)]).to(t.device)
        sample = t.detach()[torch.unravel_index(index, t.shape)] if t.dim() else t.detach().reshape(1)
        sample = sample.cpu().contiguous()
        sample = sample.view(torch.int16) if sample.dtype == torch.bfloat16 else sample
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode() + sample.numpy().tobytes())
    return {"name": getattr(cfg, "model_name", type(model).__name__), "config_hash": config,
            "weights_hash": digest.hexdigest()[:16]}


def resolve_hooks(model, hooks) -> list[str]:
    """Hook names in model order: names, short keys, globs (`blocks.*.hook_resid_post`) or a filter."""
    if not hasattr(model, "hook_dict"):
        raise TypeError(f"collect_activations needs a hooked model (models.load, or interp.attach(module)); got a "
                        f"{type(model).__name__}")
    items = [hooks] if isinstance(hooks, str) or callable(hooks) else list(hooks or [])
    if isinstance(hooks, tuple) and hooks and not all(isinstance(h, str) and "." in h for h in hooks):
        items = [hooks]  # a short key such as ("resid_post", 3)
    names: list[str] = []
    for item in items:
        if isinstance(item, str) and any(c in item for c in "*?["):
            found = [n for n in model.hook_dict if fnmatch.fnmatchcase(n, item)]
            if not found:
                close = closest_names(item.replace("*", "0"), list(model.hook_dict))
                raise HookNameError(f"no hook point matches {item!r}" + (f"; closest: {', '.join(close)}" if close
                                                                          else "") + " (globs such as "
                                    "'blocks.*.hook_resid_post')")
            names += found
        else:
            names += model.resolve_hook_names(item)
    if not names:
        raise HookNameError(f"hooks={hooks!r} names no hook point: pass names such as 'blocks.0.hook_resid_post'")
    order = {n: i for i, n in enumerate(model.hook_dict)}
    return sorted(set(names), key=order.__getitem__)


def stop_layer(model, names: list[str]) -> int | None:
    """The first block no hook needs (None: the whole forward, e.g. for ln_final or hooks outside blocks)."""
    stops = []
    for name in names:
        try:
            stops.append(model.hook_dict[name].layer() + 1)
        except (ValueError, AttributeError):
            if name.split(".")[0] not in ("hook_embed", "hook_pos_embed", "hook_token_type_embed", "ln_embed"):
                return None
            stops.append(0)
    return max(stops)


def normalize_positions(positions, seq_len: int) -> list[int] | None:
    if positions is None:
        return None
    if isinstance(positions, slice):
        wanted = list(range(seq_len))[positions]
    else:
        wanted = [positions] if isinstance(positions, int) else [int(p) for p in positions]
    out = []
    for p in wanted:
        if not -seq_len <= p < seq_len:
            raise ValueError(f"position {p} is outside a sequence of seq_len={seq_len}: use 0..{seq_len - 1} or "
                             "negative positions from the end")
        out.append(p % seq_len)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"positions={positions!r} must name at least one position, each once")
    return out


def _check_model(model, seq_len: int, batch_size: int) -> None:
    cfg = model.cfg
    if getattr(cfg, "encoder_decoder", False):
        raise TypeError("collect_activations runs one stack over text; an encoder-decoder also needs decoder "
                        "inputs: collect from a decoder-only or encoder-only model")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be at least 1")
    n_ctx = getattr(cfg, "n_ctx", None)
    if n_ctx is not None and seq_len > n_ctx:
        raise ValueError(f"seq_len={seq_len} is longer than the context of {cfg.model_name} (n_ctx={n_ctx}): "
                         f"use seq_len <= {n_ctx}")


def _bos(model, tokenizer, prepend_bos: bool | None) -> int | None:
    if prepend_bos is False:
        return None
    bos = bos_id(tokenizer) if tokenizer is not None else getattr(model.cfg, "bos_token_id", None)
    if bos is None and prepend_bos:
        raise ValueError("prepend_bos=True, but the model's tokenizer (and config) has no BOS token: pass "
                         "prepend_bos=False")
    return bos


def _check_vocab(model, tokens) -> None:
    d_vocab = getattr(model.cfg, "d_vocab", None)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (d_vocab is not None and high >= d_vocab):
        raise ValueError(f"token ids run from {low} to {high}, outside the vocabulary of "
                         f"{getattr(model.cfg, 'model_name', 'the model')} (0..{(d_vocab or 0) - 1}): the corpus was "
                         "tokenised for another model")


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype: use e.g. 'float32', 'float16', 'bfloat16'")
    return value
