"""Every decoder family: our forward against `transformers`' forward of the same weights.

    python benchmarks/families.py [--rounds 5] [--only gemma2 olmo2 ...]

For each family a random checkpoint of a few hundred MB (d_model 640, 10 layers, 32k
vocabulary, windows of 64 where the family has them) runs batch 4 x 128 tokens three
ways, interleaved round by round: the `transformers` model (its default attention
implementation, the one a user gets), our model with no hooks, and our
`run_with_cache` (the default cache: every hook point but the opt-in hook_result, so the
explicit attention path). Prints median times and the median over rounds of each round's
ratio to the `transformers` forward (paired ratios: this 2-core VM drifts by +-5% between
rounds, and a ratio of medians taken minutes apart would carry that drift).
Goal: no-hook <= 1.05x for every family.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

D, H, KV, LAYERS, MLP, VOCAB, CTX, WINDOW = 640, 10, 5, 10, 1728, 32000, 512, 64
_LLAMA = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, intermediate_size=MLP,
              num_hidden_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=CTX, tie_word_embeddings=False)
_GPT = dict(n_embd=D, n_head=H, n_layer=LAYERS, n_inner=4 * D, vocab_size=VOCAB, n_positions=CTX)
_PARALLEL = dict(hidden_size=D, num_attention_heads=H, num_hidden_layers=LAYERS, intermediate_size=4 * D,
                 vocab_size=VOCAB, max_position_embeddings=CTX)

# family -> (config class, its arguments)
FAMILIES = {
    "gpt2": ("GPT2Config", _GPT),
    "llama": ("LlamaConfig", _LLAMA),
    "mistral": ("MistralConfig", {**_LLAMA, "sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", {**_LLAMA, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 5}),
    "qwen3": ("Qwen3Config", {**_LLAMA, "head_dim": 80}),
    "gemma": ("GemmaConfig", {**_LLAMA, "num_key_value_heads": 1, "head_dim": 80}),
    "gemma2": ("Gemma2Config", {**_LLAMA, "head_dim": 80, "sliding_window": WINDOW}),
    "gemma3": ("Gemma3TextConfig", {**_LLAMA, "head_dim": 80, "sliding_window": WINDOW}),
    "olmo": ("OlmoConfig", {**_LLAMA, "clip_qkv": 8.0}),
    "olmo2": ("Olmo2Config", _LLAMA),
    "phi3": ("Phi3Config", {**_LLAMA, "sliding_window": WINDOW}),
    "gpt_neox": ("GPTNeoXConfig", _PARALLEL),
    "gptj": ("GPTJConfig", {**_GPT, "rotary_dim": 32}),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=D, num_heads=H, num_layers=LAYERS, intermediate_size=4 * D,
                                     vocab_size=VOCAB, max_position_embeddings=CTX, window_size=WINDOW,
                                     attention_types=[[["global", "local"], LAYERS // 2]])),
    "opt": ("OPTConfig", dict(hidden_size=D, num_attention_heads=H, num_hidden_layers=LAYERS, ffn_dim=4 * D,
                              vocab_size=VOCAB, max_position_embeddings=CTX, word_embed_proj_dim=D)),
    "phi": ("PhiConfig", {**_PARALLEL, "qk_layernorm": True}),
    "stablelm": ("StableLmConfig", {**_PARALLEL, "num_key_value_heads": H, "intermediate_size": MLP,
                                    "use_parallel_residual": True, "qk_layernorm": True, "use_qkv_bias": True}),
    "gpt_bigcode": ("GPTBigCodeConfig", {**_GPT, "multi_query": True}),
}


def build(name: str):
    import transformers

    cls, kwargs = FAMILIES[name]
    config = getattr(transformers, cls)(**kwargs, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return hf


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, rounds: int, batch: int, seq: int) -> dict:
    import models

    hf = build(name)
    model = models.load(hf, name=name)
    size_mb = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2 ** 20
    tokens = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens)
        err = (ours - ref).abs().max().item()
    runs = {
        "transformers": lambda: hf(tokens),
        "ours": lambda: model(tokens),
        "ours run_with_cache": lambda: model.run_with_cache(tokens),
    }
    times = {k: [] for k in runs}
    ratios = {"ours": [], "ours run_with_cache": []}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        # Each variant against the transformers forward in its own loop (a forward right after a cache is
        # freed pays for the allocator's state), pairs in alternating order so neither side always goes first.
        for key in ratios:
            for r in range(rounds):
                pair = ["transformers", key] if r % 2 == 0 else [key, "transformers"]
                t = {k: timed(runs[k]) for k in pair}
                times["transformers"].append(t["transformers"])
                times[key].append(t[key])
                ratios[key].append(t[key] / t["transformers"])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = dict(family=name, mb=size_mb, attn=hf.config._attn_implementation, err=err, **med,
               ratio=statistics.median(ratios["ours"]), cache_ratio=statistics.median(ratios["ours run_with_cache"]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--only", nargs="*", default=None, choices=list(FAMILIES))
    parser.add_argument("--worker", choices=list(FAMILIES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_error()
    if args.worker:  # one family in this process, its numbers as one JSON line
        print(json.dumps(bench(args.worker, args.rounds, args.batch, args.seq)))
        return
    print(f"batch {args.batch} x {args.seq} tokens, float32, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, median of {args.rounds} interleaved rounds, each family in a fresh process")
    print("(x: the median over rounds of each round's time / the transformers forward's in that round)")
    print("| family | weights | transformers attention | transformers s | no-hook s | no-hook x | run_with_cache s "
          "| run_with_cache x | max abs logit diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    for name in args.only or FAMILIES:
        # A fresh process per family: the allocator state a previous family leaves behind moved one side's
        # time by up to 10% in either direction on this machine.
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--rounds", str(args.rounds), "--batch",
                              str(args.batch), "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratio, cache = r["ratio"], r["cache_ratio"]
        worst = max(worst, ratio)
        print(f"| {name} | {r['mb']:.0f} MB | {r['attn']} | {r['transformers']:.3f} | {r['ours']:.3f} | {ratio:.3f} "
              f"| {r['ours run_with_cache']:.3f} | {cache:.3f} | {r['err']:.1e} |", flush=True)
    print(f"worst no-hook ratio: {worst:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
