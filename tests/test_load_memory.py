"""Loading never holds a second copy of the weights in host memory (issue 17).

Each load runs in its own process (tests/memory_probe.py), which samples its private (anonymous)
memory; the checkpoint is a synthetic float32 LLaMA-layout safetensors file of about 250 MB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).with_name("memory_probe.py")
pytestmark = pytest.mark.slow


def write_llama(directory: Path, **sizes) -> Path:
    """A float32 LLaMA-layout checkpoint written tensor by tensor (no transformers model in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(tie_word_embeddings=False, **sizes)
    cfg.save_pretrained(directory)
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg.vocab_size, d)}
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (cfg.intermediate_size, d),
                       p + "mlp.up_proj.weight": (cfg.intermediate_size, d),
                       p + "mlp.down_proj.weight": (d, cfg.intermediate_size),
                       p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    generator = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()},
              directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    big = write_llama(tmp_path_factory.mktemp("llama_fp32"), hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4, vocab_size=16000)
    tiny = write_llama(tmp_path_factory.mktemp("llama_tiny"), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return big, tiny


def probe(checkpoint: tuple[Path, Path], dtype: str, where) -> dict:
    where = where if isinstance(where, str) else json.dumps(where)
    big, tiny = checkpoint
    out = subprocess.run([sys.executable, str(PROBE), str(big), dtype, where, str(tiny)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_to_cpu_holds_one_copy(checkpoint, dtype):
    got = probe(checkpoint, dtype, "cpu")
    ratio = got["peak_anon"] / got["weight_bytes"]
    print(f"{dtype}: peak private memory {got['peak_anon'] / 2**20:.0f} MiB for {got['weight_bytes'] / 2**20:.0f} "
          f"MiB of weights = {ratio:.3f}x")
    assert got["devices"] == ["cpu"]
    # At least the weights themselves (a private copy, not the file's pages), and no second copy on the way:
    # bfloat16 never passes through a whole float32 model.
    assert 0.95 <= ratio <= 1.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loading_to_gpu_keeps_host_memory_small(checkpoint):
    got = probe(checkpoint, "float32", "cuda:0")
    ratio = got["peak_anon"] / got["weight_bytes"]
    print(f"to cuda:0: host peak {got['peak_anon'] / 2**20:.0f} MiB for {got['weight_bytes'] / 2**20:.0f} MiB = {ratio:.3f}x")
    assert got["devices"] == ["cuda:0"]
    assert ratio <= 0.3
