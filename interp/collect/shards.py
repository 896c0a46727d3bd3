"""The files of a collection: safetensors shards written atomically, and `manifest.json`.

A shard is a plain safetensors file (any safetensors reader opens it): one tensor per hook,
`[sequences, positions, *features]`, and `tokens` `[sequences, seq_len]` (int32). It is written by
our own few lines rather than `safetensors.torch.save_file`, which first copies every tensor into
one bytes object (a second copy of a shard in memory), and whose metadata order is not fixed: here
the header is JSON with sorted keys and tensors are laid out largest item size first (every tensor
aligned for zero-copy memory maps), so the same activations always give the same bytes. Each shard
is written to `.<name>.tmp`, flushed to disk, then renamed: a file under its final name is complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

FORMAT = "interp-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_KEY = "interp_collect"

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
# bfloat16 has no numpy type: its bits are read as int16 and viewed back in torch.
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64, "I64": np.int64,
         "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
TORCH = {v: k for k, v in DTYPES.items()}


class IncompatibleOutputError(ValueError):
    """An output folder that holds something other than this collection."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _raw(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write `tensors` as a safetensors file at `path`, atomically (temporary name, fsync, rename)."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": {META_KEY: json.dumps(metadata, sort_keys=True)}}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(_raw(tensors[name]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> tuple[dict, int]:
    """(the safetensors header of `path`, the byte offset where its data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise IncompatibleOutputError(f"{path} is not a safetensors file (too short)")
        n = struct.unpack("<Q", raw)[0]
        if n > 100_000_000:
            raise IncompatibleOutputError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return header, 8 + n


def shard_metadata(path: Path) -> dict | None:
    """The collection metadata stored in a shard, or None when it is not one of ours."""
    try:
        header, _ = read_header(path)
        return json.loads(header.get("__metadata__", {})[META_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def memmap(path: Path, name: str, header: dict, start: int) -> torch.Tensor:
    """Tensor `name` of a shard, memory-mapped read-only (nothing is read until it is indexed)."""
    info = header[name]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if begin == end:
        return torch.empty(shape, dtype=TORCH[info["dtype"]])
    # Copy-on-write: a tensor the caller edits in place changes its own pages, never the file.
    arr = np.memmap(path, dtype=NUMPY[info["dtype"]], mode="c", offset=start + begin, shape=shape)
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if info["dtype"] == "BF16" else t


def write_json(path: Path, data: dict) -> None:
    """Atomically, with a fixed key order, so equal data gives equal bytes."""
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{out_dir} has no {MANIFEST}: it is not a finished collection (run collect_activations into it; a "
            "killed run resumes where it stopped)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise IncompatibleOutputError(f"{path} is not a manifest of {FORMAT} (format {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise IncompatibleOutputError(f"{path} has format_version {manifest['format_version']}, newer than this "
                                      f"toolkit reads ({FORMAT_VERSION}): update the toolkit")
    return manifest


def identity_of(manifest: dict) -> dict:
    """What must match for files to belong to one collection (names of the tokenizer and corpus may not)."""
    identity = {k: v for k, v in manifest.items() if k not in ("shards", "format")}
    identity["tokenizer"] = {k: v for k, v in manifest["tokenizer"].items() if k != "name"}
    identity["corpus"] = {k: v for k, v in manifest["corpus"].items() if k != "name"}
    return identity


# The fields that say what differs in words a user recognises come first in an error.
FIRST = ("model", "tokenizer", "corpus", "packing", "positions", "dtype", "hooks")


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Fields where two identities differ, as 'field: old vs new'."""
    out = []
    rank = {k: i for i, k in enumerate(FIRST)} if not prefix else {}
    for key in sorted(set(old) | set(new), key=lambda k: (rank.get(k, len(rank)), str(k))):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} there vs {_short(b)} now")
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_out_dir(out_dir: Path, identity: dict) -> None:
    """Refuse an output folder that holds another collection's manifest or shards, before writing anything."""
    if out_dir.exists() and not out_dir.is_dir():
        raise IncompatibleOutputError(f"out_dir {out_dir} is a file: choose a folder")
    if not out_dir.exists():
        return
    found: list[tuple[str, dict | None]] = []
    manifest = out_dir / MANIFEST
    if manifest.exists():
        try:
            found.append((MANIFEST, identity_of(read_manifest(out_dir))))
        except (ValueError, KeyError) as exc:
            raise IncompatibleOutputError(
                f"{manifest} is not a collection manifest ({exc}): choose another out_dir, or move that file"
            ) from None
    for path in sorted(out_dir.glob("shard-*.safetensors")):
        meta = shard_metadata(path)
        found.append((path.name, meta.get("identity") if isinstance(meta, dict) else None))
    for name, old in found:
        diff = ["not written by collect_activations"] if old is None else differences(old, identity)
        if diff:
            raise IncompatibleOutputError(
                f"out_dir {out_dir} holds another collection ({name}: {'; '.join(diff[:4])}"
                f"{'; ...' if len(diff) > 4 else ''}); nothing was written: choose another out_dir, or delete "
                f"{out_dir} to start over (to resume, pass the same model, corpus, hooks and options)"
            )
