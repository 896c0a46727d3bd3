"""nanoGPT checkpoints: a model with nanoGPT's module names, trained here for a few steps and saved
the way nanoGPT's train.py saves, loads as a HookedTransformer with the same outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import models


class SelfAttention(nn.Module):
    def __init__(self, d, n_head, bias):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias), n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d, n_head, bias):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d, bias=bias), SelfAttention(d, n_head, bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(d, 4 * d, bias=bias), c_proj=nn.Linear(4 * d, d, bias=bias)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class NanoGPTLike(nn.Module):
    """nanoGPT's names and maths (exact GELU, tied lm_head), written for this test."""

    def __init__(self, n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=65, bias=True, dropout=0.0):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer)), ln_f=nn.LayerNorm(n_embd, bias=bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def _train_and_save(tmp_path, bias, compiled_prefix=False):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=65, bias=bias, dropout=0.0)
    model = NanoGPTLike(**args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 65, (16, 13))
    for _ in range(10):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.state_dict()
    if compiled_prefix:  # what torch.compile'd training saves
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "optimizer": opt.state_dict(), "model_args": args, "iter_num": 10,
                "best_val_loss": float(loss.detach()), "config": {"dataset": "synthetic"}}, path)
    return model.eval(), path


@pytest.mark.parametrize("bias,compiled", [(True, False), (False, True)])
def test_nanogpt_checkpoint_loads_with_equal_outputs(tmp_path, bias, compiled):
    ref, path = _train_and_save(tmp_path, bias, compiled)
    model = models.load(str(path))
    idx = torch.randint(0, 65, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)
        _, cache = model.run_with_cache(idx)
    assert cache["pattern", 1].shape == (3, 4, 12, 12)  # the circuit toolkit applies: QK/OV, patterns, ...
    assert model.OV[0, 0].shape == (32, 32)


def test_other_pt_files_are_refused_with_the_way_out(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(Exception, match="interp.attach"):
        models.load(str(path))
