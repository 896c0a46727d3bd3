"""Shared by benchmarks/patterns.py and benchmarks/offload.py: a random-weight model in a real model's shape,
and timing that waits for the GPU.

On CUDA the default shape is LLaMA-3.2-1B's (d_model 2048, 16 layers, 32 heads with 8 KV heads,
d_mlp 8192, vocabulary 128256, untied) in bfloat16 at 8 x 512 tokens; on the CPU a small
LLaMA-like shape in float32, so that a run takes seconds. Every shape flag overrides either.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from models.config import TransformerConfig  # noqa: E402
from models.hooked_transformer import HookedTransformer  # noqa: E402

DEFAULTS = {
    "cuda": dict(d_model=2048, layers=16, heads=32, kv_heads=8, d_mlp=8192, vocab=128256, batch=8, seq=512,
                 dtype="bfloat16", rounds=10),
    "cpu": dict(d_model=256, layers=4, heads=8, kv_heads=2, d_mlp=1024, vocab=4096, batch=2, seq=128,
                dtype="float32", rounds=3),
}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", help="model dtype: bfloat16 (CUDA default), float16, float32 (CPU default)")
    for flag in ("d-model", "layers", "heads", "kv-heads", "d-mlp", "vocab", "batch", "seq", "rounds"):
        p.add_argument(f"--{flag}", type=int)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left out with the defaults of the device's kind."""
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device; run on a GPU machine or pass --device cpu")
    for key, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = getattr(torch, args.dtype) if isinstance(args.dtype, str) else args.dtype
    if args.d_model % args.heads or args.heads % args.kv_heads:
        raise SystemExit(f"--heads {args.heads} must divide --d-model {args.d_model}, and --kv-heads {args.kv_heads} "
                         "must divide --heads")
    return args


def build(args: argparse.Namespace) -> tuple[HookedTransformer, torch.Tensor]:
    """(a frozen random LLaMA-like model on args.device in args.dtype, token ids [batch, seq])."""
    cfg = TransformerConfig(
        n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
        d_head=args.d_model // args.heads, d_vocab=args.vocab, n_ctx=max(args.seq, 2048), d_mlp=args.d_mlp,
        act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_base=500000.0, norm_eps=1e-5, model_name="random-llama-shape")
    torch.manual_seed(0)
    with args.device:  # initialised where it runs: a 1B model on the CPU would take a minute to draw
        model = HookedTransformer(cfg)
    model.requires_grad_(False).to(args.dtype)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    return model, tokens.to(args.device)


def describe(args: argparse.Namespace) -> str:
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    return (f"{where}: d_model {args.d_model}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), "
            f"d_mlp {args.d_mlp}, vocab {args.vocab}; {args.batch} x {args.seq} tokens, "
            f"{str(args.dtype).removeprefix('torch.')}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds for fn(), GPU work included; its result is dropped before returning (a cache frees its memory)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    del out
    return seconds


def interleaved(calls: dict, device: torch.device, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each configuration, round by round in rotating order, so that drift (clocks, allocator
    state) hits every configuration alike."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            timed(calls[name], device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(calls[name], device))
    return times


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of name / base within a round."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def peak_gib(fn, device: torch.device) -> float:
    """GPU memory at the peak of fn() (GiB), nan on the CPU."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    timed(fn, device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"
