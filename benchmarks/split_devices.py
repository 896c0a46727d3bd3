"""A model over two devices against the same model on one: every result equal (float32, 1e-4).

    python benchmarks/split_devices.py [--devices cuda:0,cpu] [--tokenizer DIR] [--layers N]

Builds a model with SmolLM2-135M's shape and seeded random weights (no checkpoint needs to travel),
saves it, and loads it twice: on the first device alone, and with its blocks cut between the two
devices (embedding on the first, head on the last). Then compares logits, caches (kept where they ran,
and gathered with device="cpu"), the patching engine (exact, path, attribution), greedy generation,
the head census, the shift study, the stacked weight views (gathered) and TransformerLens' cache
methods, and times the forward of each. Also loads with device_map="auto" under a max_memory that
forces accelerate's planner to use both devices. Prints one line per check and exits non-zero if any
differs by more than the tolerance. Needs a machine with two devices (a GPU and the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TOL = 1e-4
CONTEXTS = ["The American shrew mole", "The star-nosed mole", "One mole of carbon dioxide",
            "A mole of water weighs", "Take a biopsy of the mole", "The doctor removed the mole"]
CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Anna went to the park, Tom gave a ball to"]
CORRUPT = ["When Mary and John went to the store, Mary gave a drink to",
           "When Tom and Anna went to the park, Anna gave a ball to"]


def leaves(obj, path="") -> dict:
    """Every tensor (and plain value) inside a result, by path."""
    from interp.factored_matrix import FactoredMatrix

    if isinstance(obj, torch.Tensor):
        return {path: obj}
    if isinstance(obj, FactoredMatrix):
        return {path + ".A": obj.A, path + ".B": obj.B}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if f.name not in ("seconds",):
                out.update(leaves(getattr(obj, f.name), f"{path}.{f.name}"))
        return out
    if isinstance(obj, dict) or hasattr(obj, "cache_dict"):
        items = obj.cache_dict.items() if hasattr(obj, "cache_dict") else obj.items()
        out = {}
        for k, v in items:
            if k not in ("seconds", "forwards"):
                out.update(leaves(v, f"{path}[{k!r}]"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{path}[{i}]"))
        return out
    if isinstance(obj, (int, float, str, bool, type(None))):
        return {path: obj}
    return {}


def difference(a, b) -> tuple[float, str]:
    """(largest absolute difference over every tensor, where), inf when the structure differs."""
    la, lb = leaves(a), leaves(b)
    if set(la) != set(lb):
        return float("inf"), f"keys differ: {sorted(set(la) ^ set(lb))[:4]}"
    worst, where = 0.0, ""
    for key in la:
        x, y = la[key], lb[key]
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape:
                return float("inf"), f"{key}: shape {getattr(x, 'shape', None)} vs {getattr(y, 'shape', None)}"
            x, y = x.detach().cpu(), y.detach().cpu()
            if x.is_floating_point():
                same = (x == y) | (torch.isnan(x) & torch.isnan(y))  # equal infinities (masked scores) too
                d = (x.double() - y.double()).abs().masked_fill(same, 0).nan_to_num(nan=float("inf"))
                d = float(d.max()) if d.numel() else 0.0
            else:
                d = 0.0 if torch.equal(x, y) else float("inf")
        elif isinstance(x, float) and isinstance(y, float):
            d = 0.0 if (x != x and y != y) else abs(x - y)
        else:
            d = 0.0 if x == y else float("inf")
        if d > worst:
            worst, where = d, key
    return worst, where


def build(directory: Path, tokenizer_dir: Path, layers: int | None) -> None:
    import json

    from models.config import TransformerConfig
    from models.hooked_transformer import HookedTransformer

    cfg = TransformerConfig.from_dict(json.loads((tokenizer_dir / "interp_config.json").read_text()))
    if layers:
        cfg = cfg.replace(n_layers=layers)
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    model.tokenizer = None
    model.save(directory)
    for f in ("tokenizer.json", "tokenizer_config.json", "interp_tokenizer.json"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, directory / f)


def timed(fn, repeats=5):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cuda:0,cpu")
    parser.add_argument("--tokenizer", default=None, help="directory with SmolLM2's interp_config.json and tokenizer")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than SmolLM2's 30")
    args = parser.parse_args()
    import models
    from analyses.heads import head_census
    from interp.patching import activation_patch, attribution_patch, logit_diff, path_patch
    from interp.shift.study import shift_study

    first, second = args.devices.split(",")
    from models.registry import load_path
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else load_path("smollm2-135m")
    directory = Path(tempfile.mkdtemp()) / "smol-random"
    build(directory, tokenizer_dir, args.layers)
    single = models.load(directory, device=first)
    n = single.cfg.n_layers
    device_map = {**{l: first for l in range(n // 2)}, **{l: second for l in range(n // 2, n)}}
    split = models.load(directory, device_map=device_map)
    placed_map = split.device_map or {"embed": first, "head": first}
    print(f"model: {n} layers, d_model {single.cfg.d_model}; split: embed on {placed_map['embed']}, "
          f"blocks 0-{n // 2 - 1} on {first}, {n // 2}-{n - 1} on {second}, head on {placed_map['head']}")
    ids = single.to_tokens(CLEAN)
    correct = [single.to_single_token(" Mary"), single.to_single_token(" Tom")]
    wrong = [single.to_single_token(" John"), single.to_single_token(" Anna")]
    metric = logit_diff(correct, wrong)
    failures = []

    def check(name, fn, tol=TOL):
        try:
            start = time.perf_counter()
            a, b = fn(single), fn(split)
            worst, where = difference(a, b)
            ok = worst <= tol
            print(f"{'ok ' if ok else 'BAD'} {name:<34} max |diff| {worst:.2e}{'' if ok else ' at ' + where}"
                  f"  ({time.perf_counter() - start:.1f} s)")
            if not ok:
                failures.append(name)
        except Exception:
            print(f"ERR {name}")
            traceback.print_exc()
            failures.append(name)

    placed = {str(b.attn.W_Q.device) for b in split.blocks[: n // 2]}, {str(b.attn.W_Q.device) for b in split.blocks[n // 2:]}
    print(f"block weights on: first half {placed[0]}, second half {placed[1]}")
    check("logits", lambda m: m(ids))
    check("loss", lambda m: m(ids, return_type="loss"))
    check("run_with_cache(device='cpu')", lambda m: m.run_with_cache(ids, device="cpu")[1])

    def where_hooks_ran(m):
        _, cache = m.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_post"))
        return [str(cache["resid_post", l].device) for l in range(n)]
    seen = where_hooks_ran(split)
    print(f"{'ok ' if seen == [str(b.attn.W_Q.device) for b in split.blocks] else 'BAD'} hooks see their block's "
          f"device: {seen[0]} ... {seen[-1]}")
    check("cache kept where it ran", lambda m: m.run_with_cache(ids)[1])
    check("accumulated_resid + logit_attrs", lambda m: (lambda c: c.logit_attrs(
        c.accumulated_resid(apply_ln=True, pos_slice=-1), torch.tensor(correct), torch.tensor(wrong), pos_slice=-1))(
        m.run_with_cache(ids)[1]))
    check("stack_head_results", lambda m: m.run_with_cache(ids)[1].stack_head_results(pos_slice=-1))
    check("activation_patch resid_pre", lambda m: activation_patch(m, CLEAN, CORRUPT, kind="resid_pre",
                                                                   metric=metric, progress=False).per_prompt)
    check("activation_patch z by head", lambda m: activation_patch(m, CLEAN, CORRUPT, kind="z", by="head",
                                                                   metric=metric, progress=False).per_prompt)
    check("path_patch each -> resid", lambda m: path_patch(m, CLEAN, CORRUPT, metric=metric,
                                                            progress=False).per_prompt)
    check("attribution_patch z", lambda m: attribution_patch(m, CLEAN, CORRUPT, kind="z", by="head",
                                                             metric=metric).per_prompt)
    check("generate (greedy, KV cache)", lambda m: m.generate(ids, max_new_tokens=12))
    check("generate (no KV cache)", lambda m: m.generate(ids, max_new_tokens=6, use_past_kv_cache=False))
    check("head census", lambda m: head_census(m, n_random=4))
    check("shift study", lambda m: shift_study(m, "mole", CONTEXTS, ["animal", "animal", "unit", "unit", "skin", "skin"]))
    check("W_Q / QK gathered", lambda m: (m.W_Q, m.QK) if m is single else _gathered(m, first))
    try:
        split.W_Q
        print("BAD stacked view on a split model did not refuse")
        failures.append("refusal")
    except Exception as exc:
        print(f"ok  stacked view refuses: {type(exc).__name__}: {str(exc)[:90]}...")
    t_single, t_split = timed(lambda: single(ids)), timed(lambda: split(ids))
    print(f"forward [{tuple(ids.shape)}]: {first} alone {t_single * 1e3:.1f} ms, split {t_split * 1e3:.1f} ms")
    # accelerate's planner, made to spill: the first device may hold about half the weights.
    weight_mb = sum(p.numel() * p.element_size() for p in single.parameters()) / 2**20
    index = torch.device(first).index or 0
    auto = models.load(directory, device_map="auto",
                       max_memory={index: f"{int(weight_mb * 0.6)}MiB", "cpu": "64GiB"})
    print(f"device_map='auto' under max_memory {int(weight_mb * 0.6)} MiB on {first}: "
          f"{sorted(set(auto.device_map.values())) if auto.device_map else 'one device'}")
    worst, _ = difference(single(ids), auto(ids))
    print(f"{'ok ' if worst <= TOL else 'BAD'} auto-planned logits                max |diff| {worst:.2e}")
    if worst > TOL or not auto.device_map:
        failures.append("auto")
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


def _gathered(model, device):
    with model.gathered_on(device):
        return model.W_Q, model.QK


if __name__ == "__main__":
    sys.exit(main())
