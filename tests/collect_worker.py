"""One collection run for tests/test_collect.py, as its own process (plain, or one rank of torchrun).

    python tests/collect_worker.py OUT_DIR TOKENS.npy SHARD_BYTES

Builds the same small random model in every process (seeded) and collects two hooks of a token-id
corpus; prints the shards this process wrote, so the test can see that ranks split the work.
"""

from __future__ import annotations

import os
import sys

import torch

import interp.collect.run as run
import models
from interp.collect import collect_activations


def tiny_model() -> models.HookedTransformer:
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=64, n_ctx=32, d_mlp=32,
                                   bos_token_id=1, model_name="collect-worker")
    return models.HookedTransformer(cfg).requires_grad_(False)


def main(out_dir: str, tokens: str, shard_bytes: str) -> None:
    rank = os.environ.get("RANK", "-")
    real = run.write_shard

    def logged(path, tensors, metadata):
        print(f"rank {rank} wrote {path.name}", flush=True)
        real(path, tensors, metadata)

    run.write_shard = logged
    collect_activations(tiny_model(), tokens, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"], out_dir,
                        seq_len=8, batch_size=2, shard_bytes=int(shard_bytes), progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
