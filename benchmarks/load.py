"""Cold and warm load times of the registry models, each in a fresh Python process.

    python benchmarks/load.py [--models smollm2-135m minilm-l6] [--repeats 3]

Cold: an empty cache directory, so SmolLM2's GGUF file is dequantised and its
tokenizer converted (what a first `models.load` on a new machine does). Warm: the
cache filled by the cold run. Times include importing the toolkit and transformers,
since that is what a user waits for; the warm time is split into its stages.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import models
from models import loading
stages = {}
real_read, real_tok = loading.read_weights, loading.load_tokenizer
def timed(name, fn):
    def wrapper(*a, **k):
        s = time.perf_counter(); out = fn(*a, **k); stages[name] = time.perf_counter() - s; return out
    return wrapper
loading.read_weights = timed("read weights", real_read)
loading.load_tokenizer = timed("tokenizer", real_tok)
t1 = time.perf_counter()
model = models.load(sys.argv[1])
t2 = time.perf_counter()
model(model.to_tokens("warm up"))
print(json.dumps({"total": t2 - t0, "import": t1 - t0, "load": t2 - t1, **stages}))
"""


def run(name: str, cache: Path) -> dict:
    env = {**os.environ, "INTERP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="interp-load-bench-"))
    try:
        print(f"{'model':<14} {'kind':<5} {'total s':>8} {'import':>7} {'load':>7} {'weights':>8} {'tokenizer':>9}")
        for name in args.models:
            shutil.rmtree(cache / name, ignore_errors=True)
            rows = [("cold", run(name, cache))]
            warm = [run(name, cache) for _ in range(args.repeats)]
            best = sorted(warm, key=lambda r: r["total"])[len(warm) // 2]
            rows.append(("warm", best))
            for kind, r in rows:
                print(f"{name:<14} {kind:<5} {r['total']:>8.1f} {r['import']:>7.2f} {r['load']:>7.2f} "
                      f"{r.get('read weights', float('nan')):>8.2f} {r.get('tokenizer', float('nan')):>9.2f}")
            print(f"{'':<14} warm median of {args.repeats}: {statistics.median(r['total'] for r in warm):.1f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
