"""Peak private host memory of models.load, as a ratio to the loaded weights' bytes (issue 17).

    python benchmarks/load_memory.py [--dir DIR]

Writes a synthetic float32 LLaMA-layout checkpoint (~286 MiB; the same one tests/test_load_memory.py
uses) and loads it in fresh processes (tests/memory_probe.py samples RssAnon every 0.5 ms): to the CPU
in float32 and in bfloat16, and to cuda:0 when a GPU is there. Goals: <= 1.1x on the CPU, <= 0.3x of the
weights in host memory while loading to a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_load_memory import write_llama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    import torch

    base = Path(args.dir or tempfile.mkdtemp())
    big = write_llama(base / "big", hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=12, num_key_value_heads=4, vocab_size=16000)
    tiny = write_llama(base / "tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    runs = [("float32", "cpu", 1.1), ("bfloat16", "cpu", 1.1)]
    if torch.cuda.is_available():
        runs.append(("float32", "cuda:0", 0.3))
    print("| load | weights MiB | peak private MiB | ratio | goal |\n| --- | --- | --- | --- | --- |")
    for dtype, where, goal in runs:
        out = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), str(big), dtype, where,
                              str(tiny)], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = got["peak_anon"] / got["weight_bytes"]
        print(f"| {dtype} to {where} | {got['weight_bytes'] / 2**20:.0f} | {got['peak_anon'] / 2**20:.0f} | "
              f"{ratio:.3f}x | <= {goal}x {'met' if ratio <= goal else 'NOT met'} |")


if __name__ == "__main__":
    main()
