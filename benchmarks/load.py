"""Cold and warm load times of the registry models, each in a fresh Python process.

    python benchmarks/load.py [--models smollm2-135m minilm-l6] [--repeats 5]

Cold: an empty temporary cache directory (INTERP_CACHE), so SmolLM2's GGUF file is dequantised,
saved as a Hugging Face directory and converted into our own format (what a first `models.load`
on a new machine does). Warm: `python -c "import models; models.load(name)"` on the filled cache,
timed from outside (interpreter start and exit included: what a user waits for), the median of
`--repeats` runs; each run also reports its stages from inside. For a model with a converted copy
the previous warm path, loading its Hugging Face directory (transformers' config and tokenizer,
then the converter), runs alternately with it, and a last child times what a `transformers`
tokenizer would cost instead of the LightTokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Prints the epoch time it started and ended, the stages of models.load, and which heavy modules it imported.
CHILD = r"""
import time
start = time.time()
t0 = time.perf_counter()
import json, sys
import torch
t1 = time.perf_counter()
import models
from models import loading
t2 = time.perf_counter()
stages = {}
def timed(name, fn):
    def wrapper(*a, **k):
        s = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - s
    return wrapper
for name, attr in (("locate", "_locate"), ("weights", "read_weights"), ("tokenizer", "load_tokenizer"),
                   ("build", "_build")):
    setattr(loading, attr, timed(name, getattr(loading, attr)))
source = sys.argv[1]
if sys.argv[2] == "hf":  # the Hugging Face directory: the previous warm path
    from models.registry import resolve
    source = str(resolve(source))
    import models.convert
    models.convert.convert_hf = timed("convert", models.convert.convert_hf)
t3 = time.perf_counter()
model = models.load(source)
t4 = time.perf_counter()
heavy = sorted({m.split(".")[0] for m in sys.modules
                if m.split(".")[0] in ("transformers", "sympy", "accelerate", "gguf")}
               | ({"models.convert"} if "models.convert" in sys.modules else set()))
print(json.dumps({"start": start, "end": time.time(), "total": t4 - t0, "torch": t1 - t0, "toolkit": t2 - t1,
                  "load": t4 - t3, **stages, "tokenizer type": type(model.tokenizer).__name__, "heavy": heavy}))
"""

# What the warm path would pay for a transformers tokenizer instead of the LightTokenizer.
TRANSFORMERS_TOKENIZER = r"""
import json, sys, time
import torch
from models.registry import load_path
directory = load_path(sys.argv[1])
t0 = time.perf_counter()
import transformers
t1 = time.perf_counter()
from transformers.tokenization_utils_tokenizers import TokenizersBackend
t2 = time.perf_counter()
TokenizersBackend.from_pretrained(directory, local_files_only=True)
t3 = time.perf_counter()
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(directory, local_files_only=True)
t4 = time.perf_counter()
print(json.dumps({"import transformers": t1 - t0, "TokenizersBackend import": t2 - t1,
                  "TokenizersBackend.from_pretrained": t3 - t2, "AutoTokenizer.from_pretrained": t4 - t3}))
"""


def env_for(cache: Path) -> dict:
    return {**os.environ, "INTERP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def child(code: str, args: list[str], cache: Path) -> tuple[float, float, dict]:
    """(wall seconds from outside, seconds after the child's last statement, its JSON line)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env_for(cache),
                          cwd=ROOT)
    wall, ended = time.perf_counter() - start, time.time()
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip()[-2000:])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall, ended - report.get("end", ended), report


def median_run(runs: list[tuple[float, float, dict]]) -> tuple[float, float, dict]:
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def show(label: str, runs: list[tuple[float, float, dict]], startup: float) -> None:
    walls = [r[0] for r in runs]
    wall, exit_s, r = median_run(runs)
    stages = ("torch", "toolkit", "locate", "weights", "convert", "tokenizer", "build")
    other = r["load"] - sum(r.get(s, 0.0) for s in ("locate", "weights", "convert", "tokenizer", "build"))
    spread = f" (min {min(walls):.2f}, max {max(walls):.2f}, n={len(walls)})" if len(walls) > 1 else ""
    print(f"  {label}: {wall:.2f} s wall{spread}")
    parts = [f"interpreter {startup:.2f}"] + [f"{s} {r[s]:.2f}" for s in stages if s in r]
    parts += [f"config and the rest {other:.2f}", f"exit {exit_s:.2f}"]
    print("    " + ", ".join(parts))
    print(f"    tokenizer: {r['tokenizer type']}; heavy modules imported: {', '.join(r['heavy']) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from models.registry import REGISTRY

    cache = Path(tempfile.mkdtemp(prefix="interp-load-bench-"))
    try:
        startups = [child("import json, time; print(json.dumps({'end': time.time()}))", [], cache)[0]
                    for _ in range(args.repeats)]
        startup = statistics.median(startups)
        print(f"python -c (interpreter start and exit, nothing imported): {startup:.2f} s")
        for name in args.models:
            print(f"{name}:")
            shutil.rmtree(cache / name, ignore_errors=True)
            converted = REGISTRY[name].converted is not None
            wall, _, _ = child(CHILD, [name, "registry"], cache)
            what = "convert, then load" if converted else "nothing to convert"
            print(f"  cold (empty INTERP_CACHE: {what}): {wall:.1f} s")
            warm, hf = [], []
            for i in range(args.repeats):  # alternate, so both see the same machine
                order = (("warm", warm), ("hf", hf)) if i % 2 == 0 else (("hf", hf), ("warm", warm))
                for kind, runs in order:
                    if kind == "warm" or converted:
                        runs.append(child(CHILD, [name, "registry" if kind == "warm" else "hf"], cache))
            show(f"warm, models.load({name!r}), median of {len(warm)}", warm, startup)
            if converted:
                show("the previous warm path, models.load(<its Hugging Face directory>)", hf, startup)
                tok = json.loads(subprocess.run([sys.executable, "-c", TRANSFORMERS_TOKENIZER, name], check=True,
                                                capture_output=True, text=True, env=env_for(cache),
                                                cwd=ROOT).stdout.strip().splitlines()[-1])
                print("  a transformers tokenizer instead (not on the warm path): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in tok.items()))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
