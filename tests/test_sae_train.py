"""interp.sae.train: dictionary training on an ActivationDataset. Losses and gradients against hand computations
(the sparse TopK path against dense autograd), SAELens's schedules and normalisation by hand, the decoder
convention, checkpoints resumed bit for bit, seeds; and two checks that training works: a TopK SAE recovers a
planted dictionary, a transcoder learns a model's MLP."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import models
from family_specs import randomize_
from interp.collect import ActivationDataset, collect_activations, default_corpus
from interp.collect.shards import FORMAT, FORMAT_VERSION, shard_name, write_json, write_shard
from interp.sae import DictionaryConfig, SparseDictionary
from interp.sae import losses
from interp.sae.train import IncompatibleCheckpointError, TrainingOptions, train_dictionary

QUIET = dict(progress=False)


# ---------------------------------------------------------------------- data
def synthetic_collection(path: Path, hooks: dict[str, torch.Tensor], per_shard: int = 16) -> ActivationDataset:
    """hooks: name -> [sequences, positions, d] -> a finished collection folder (a manifest and shards)."""
    path.mkdir(parents=True, exist_ok=True)
    n_seq, seq_len = next(iter(hooks.values())).shape[:2]
    tokens = torch.zeros(n_seq, seq_len, dtype=torch.int32)
    shards = []
    for i, a in enumerate(range(0, n_seq, per_shard)):
        b = min(a + per_shard, n_seq)
        write_shard(path / shard_name(i), {**{h: t[a:b].contiguous() for h, t in hooks.items()}, "tokens": tokens[a:b]},
                    {"index": i})
        shards.append({"file": shard_name(i), "sequences": [a, b], "bytes": 0})
    write_json(path / "manifest.json", {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": {"name": "synthetic"},
        "packing": {"seq_len": seq_len, "n_sequences": n_seq, "tokens_hash": "synthetic"},
        "positions": None, "dtype": None, "shards": shards,
        "hooks": {h: {"shape": list(t.shape[1:]), "dtype": "float32"} for h, t in hooks.items()}})
    return ActivationDataset(path)


def planted(n: int, d: int, m: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n tokens, each a positive combination of s of m random unit directions in R^d -> (x [n, d], D [m, d])."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    idx = torch.rand(n, m, generator=g).topk(s, dim=-1).indices
    z = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, s, generator=g) * 2 + 0.5)
    return z @ D, D


@pytest.fixture(scope="module")
def planted_ds(tmp_path_factory):
    x, D = planted(64 * 64, 32, 32, 3)
    return synthetic_collection(tmp_path_factory.mktemp("planted"), {"h": x.reshape(64, 64, 32)}), D


def random_sae(architecture: str, d_in: int = 16, d_sae: int = 40, k: int | None = 4, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    sae = SparseDictionary(DictionaryConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name="h",
                                            k=k if "topk" in architecture else None, **cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.3)
    return sae


# ---------------------------------------------------------------------- schedules
def test_learning_rate_schedule_is_saelens_s():
    """Warm-up: LinearLR(1/W -> 1 over W - 1 steps); decay: LinearLR(1 -> 0 over D steps) from step T - D."""
    factors = [losses.lr_factor(s, 10, 4, 3) for s in range(10)]
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1 - 0 / 3, 1 - 1 / 3, 1 - 2 / 3]
    assert factors == pytest.approx(expected)
    assert [losses.coefficient(s, 2.0, 4) for s in (0, 1, 4, 9)] == [0.0, 0.5, 2.0, 2.0]
    assert losses.coefficient(0, 2.0, 0) == 2.0


# ---------------------------------------------------------------------- losses by hand
def _dense_topk(sae, x, k):
    sae_in = x - sae.b_dec
    pre = sae_in @ sae.W_enc + sae.b_enc
    top = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return pre, acts, acts @ sae.W_dec + sae.b_dec


def test_topk_loss_and_gradients_equal_dense_autograd():
    """The sparse TopK forward/backward (only k latents per token touched) equals the dense masked computation."""
    sae = random_sae("topk", apply_b_dec_to_input=True)
    x = torch.randn(24, 16)
    options = TrainingOptions()
    out = losses.training_forward(sae, x, x, None, options, step=0)
    out["loss"].backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    _, acts, recons = _dense_topk(sae, x, 4)
    mse = (recons - x).pow(2).sum(-1).mean()
    mse.backward()
    assert out["mse"] == pytest.approx(float(mse.detach()), rel=1e-6)
    assert out["l0"] == float((acts > 0).sum()) / 24
    torch.testing.assert_close(out["fired"], (acts > 0).sum(0))
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_aux_k_loss_by_hand():
    """aux = min(n_dead / k_aux, 1) * mean_t ||z_aux W_dec - (x - x_hat)||^2, k_aux = d // 2, z_aux the top k_aux dead
    pre-activations (no ReLU, no b_dec), the residual detached; its gradient too."""
    options = TrainingOptions(aux_coefficient=0.7)
    x = torch.randn(24, 16)
    for n_dead in (12, 5):  # more dead latents than k_aux = 8, and fewer (scale 5 / 8, k_aux 5)
        sae = random_sae("topk", apply_b_dec_to_input=True, seed=n_dead)
        dead = torch.zeros(40, dtype=torch.bool)
        dead[torch.randperm(40, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
        out = losses.training_forward(sae, x, x, dead, options, step=0)
        out["loss"].backward()
        sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad()
        pre, _, recons = _dense_topk(sae, x, 4)
        k_aux = min(8, n_dead)
        masked = torch.where(dead, pre, -torch.inf)
        top = masked.topk(k_aux, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        residual = (x - recons).detach()
        aux = 0.7 * min(n_dead / 8, 1.0) * (z @ sae.W_dec - residual).pow(2).sum(-1).mean()
        assert out["aux_loss"] == pytest.approx(float(aux.detach()), rel=1e-5)
        ((recons - x).pow(2).sum(-1).mean() + aux).backward()
        for name, p in sae.named_parameters():
            torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert "aux_loss" not in losses.training_forward(sae, x, x, torch.zeros(40, dtype=torch.bool), options, 0)


def test_rescale_convention_is_saelens_s_topk():
    """topk_decoder="rescale": SAELens's TopKTrainingSAE as its source writes it, hidden_pre * ||W_dec||, top k, ReLU,
    (acts / ||W_dec||) @ W_dec + b_dec, and its aux-k loss on the rescaled pre-activations: loss and gradients."""
    sae = random_sae("topk", apply_b_dec_to_input=True, seed=3)
    x = torch.randn(24, 16)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    options = TrainingOptions(topk_decoder="rescale")
    out = losses.training_forward(sae, x, x, dead, options, step=0)
    out["loss"].backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    norm = sae.W_dec.norm(dim=-1)
    hidden = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * norm
    top = hidden.topk(4, dim=-1)
    acts = torch.zeros_like(hidden).scatter(-1, top.indices, top.values.relu())
    recons = (acts * (1 / norm)) @ sae.W_dec + sae.b_dec
    mse = (recons - x).pow(2).sum(-1).mean()
    aux_top = torch.where(dead, hidden, -torch.inf).topk(8, dim=-1)
    z = torch.zeros_like(hidden).scatter(-1, aux_top.indices, aux_top.values)
    aux = min(int(dead.sum()) / 8, 1.0) * ((z * (1 / norm)) @ sae.W_dec - (x - recons).detach()).pow(2).sum(-1).mean()
    (mse + aux).backward()
    assert out["mse"] == pytest.approx(float(mse.detach()), rel=1e-5)
    assert out["aux_loss"] == pytest.approx(float(aux.detach()), rel=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rescale_training_folds_the_norms(planted_ds):
    """Trained with rescaled activations, the dictionary is saved folded (SAELens's fold): unit decoder rows, and
    it computes what training computed, sum_i relu(pre_i) W_dec[i] over the top k of pre_i ||W_dec[i]||."""
    ds, _ = planted_ds
    run = train_dictionary(ds, architecture="topk", d_sae=32, k=3, tokens=40 * 256, batch_size=256, lr=1e-2,
                           topk_decoder="rescale", log_every=40, **QUIET)
    torch.testing.assert_close(run.sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-5, rtol=0)
    x = ds.load("h").reshape(-1, 32)
    factor = run.sae.cfg.norm_scaling_factor
    ev = 1 - (run.sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev == pytest.approx(run.log[-1]["explained_variance"], abs=0.05) and ev > 0.5, (ev, factor)


def test_relu_l1_loss_by_hand():
    sae = random_sae("relu", apply_b_dec_to_input=True)
    x = torch.randn(24, 16)
    options = TrainingOptions(l1_coefficient=3.0, sparsity_warmup_steps=4)
    out = losses.training_forward(sae, x, x, None, options, step=1)  # warm-up: coefficient 3 * 1/4
    acts = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    l1 = 0.75 * (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    mse = (acts @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    assert out["l1_loss"] == pytest.approx(float(l1.detach()), rel=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(float((mse + l1).detach()), rel=1e-6)


def test_jumprelu_loss_and_straight_through_gradients_by_hand():
    """L0 = sum H(pre - theta); d theta from the JumpReLU: -(theta / eps) K, from the step: -(1 / eps) K, with
    K the rectangle on (pre - theta) / eps; pre gets the gate's gradient only."""
    sae = random_sae("jumprelu")
    x = torch.randn(64, 16)
    eps, coef = 0.5, 0.2
    options = TrainingOptions(l0_coefficient=coef, jumprelu_bandwidth=eps)
    out = losses.training_forward(sae, x, x, None, options, step=0)
    out["loss"].backward()
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        theta = sae.threshold
        gate = (pre > theta).float()
        acts = pre * gate
        recons = acts @ sae.W_dec + sae.b_dec
        kernel = (((pre - theta) / eps).abs() < 0.5).float()
        g_acts = (2 * (recons - x) / 64) @ sae.W_dec.T  # d mse / d acts
        g_theta = (-(theta / eps) * kernel * g_acts).sum(0) + (-(1 / eps) * kernel * coef / 64).sum(0)
        g_W_dec = acts.T @ (2 * (recons - x) / 64)
        g_W_enc = x.T @ (g_acts * gate)
    assert out["l0_loss"] == pytest.approx(coef * float(gate.sum(-1).mean()), rel=1e-6)
    torch.testing.assert_close(sae.threshold.grad, g_theta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.grad, g_W_dec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.W_enc.grad, g_W_enc, atol=1e-5, rtol=1e-5)


def test_batch_topk_selects_the_batch_s_largest():
    torch.manual_seed(0)
    pre = torch.randn(64, 50) * torch.rand(64, 1) * 3  # rows of very different scales: some take many latents
    lat, values = losses.batch_topk_latents(pre, 3)
    flat = pre.relu().flatten()
    expected = torch.zeros_like(flat).scatter(0, flat.topk(3 * 64).indices, 1.0).reshape(64, 50)
    got = torch.zeros(64, 50)
    got[lat.rows, lat.cols] = 1.0
    assert torch.equal(got, expected) and (lat.rows[1:] >= lat.rows[:-1]).all()
    assert torch.equal(values, pre[lat.rows, lat.cols])


# ---------------------------------------------------------------------- what train_dictionary does
def test_normalisation_factor_is_sqrt_d_over_mean_norm(planted_ds):
    ds, _ = planted_ds
    run = train_dictionary(ds, architecture="topk", d_sae=32, k=3, tokens=256, batch_size=256, **QUIET)
    x = ds.load("h").reshape(-1, 32).double()
    assert run.sae.cfg.normalize_activations == "expected_average_only_in"
    assert run.sae.cfg.norm_scaling_factor == pytest.approx(32 ** 0.5 / float(x.norm(dim=-1).mean()), rel=1e-9)
    none = train_dictionary(ds, architecture="topk", d_sae=32, k=3, tokens=256, batch_size=256, normalize="none",
                            **QUIET)
    assert none.sae.cfg.normalize_activations == "none" and none.sae.cfg.norm_scaling_factor is None


def test_decoder_rows_stay_unit_norm_for_topk_and_batchtopk_only(planted_ds):
    ds, _ = planted_ds
    for arch in ("topk", "batchtopk"):
        run = train_dictionary(ds, architecture=arch, d_sae=32, k=3, tokens=2048, batch_size=256, lr=1e-2, **QUIET)
        torch.testing.assert_close(run.sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-5, rtol=0)
    relu = train_dictionary(ds, architecture="relu", d_sae=32, tokens=2048, batch_size=256, lr=1e-2, **QUIET)
    assert (relu.sae.W_dec.norm(dim=-1) - 0.1).abs().max() > 1e-3  # free: it moved from SAELens's 0.1 start


def test_batchtopk_becomes_a_jumprelu_at_its_learnt_threshold(planted_ds):
    ds, _ = planted_ds
    # the threshold is an average of each batch's smallest active value started at 0 (SAELens); at rate 0.05, 100
    # steps bring it to 99% of its value
    run = train_dictionary(ds, architecture="batchtopk", d_sae=32, k=3, tokens=100 * 256, batch_size=256, lr=3e-3,
                           batchtopk_threshold_lr=0.05, **QUIET)
    threshold = run.extra["topk_threshold"]
    assert threshold > 0 and torch.equal(run.sae.threshold, torch.full((32,), threshold))
    x = ds.load("h").reshape(-1, 32)
    l0 = (run.sae.encode(x) > 0).sum(-1).float().mean()
    assert 1.5 < l0 < 6, l0  # the threshold keeps about k latents per token at inference


def test_resume_continues_bit_identically(planted_ds, tmp_path):
    ds, _ = planted_ds
    kw = dict(architecture="topk", d_sae=64, k=3, tokens=24 * 256, batch_size=256, lr=3e-3, seed=3, dead_window=2,
              log_every=4, **QUIET)  # dead_window=2: the aux-k loss is on, its counters must resume too
    whole = train_dictionary(ds, **kw)
    first = train_dictionary(ds, checkpoint_dir=str(tmp_path), stop_at_tokens=7 * 256, **kw)
    assert not first.finished and first.steps == 7 and list(tmp_path.glob("checkpoint-*.pt"))
    rest = train_dictionary(ds, checkpoint_dir=str(tmp_path), checkpoint_every=4 * 256, **kw)
    assert rest.finished and rest.resumed_from == 7 * 256 and rest.steps == 24  # 16 steps an epoch: crosses one
    for name, p in whole.sae.named_parameters():
        assert torch.equal(p, dict(rest.sae.named_parameters())[name]), name
    assert [r["loss"] for r in rest.log] == [r["loss"] for r in whole.log]
    assert any(r.get("aux_loss") for r in whole.log)
    assert len(list(tmp_path.glob("checkpoint-*.pt"))) == 2  # keep_checkpoints
    with pytest.raises(IncompatibleCheckpointError, match="seed"):
        train_dictionary(ds, checkpoint_dir=str(tmp_path), **{**kw, "seed": 4})


def test_same_seed_same_weights_other_seed_other_weights(planted_ds):
    ds, _ = planted_ds
    kw = dict(architecture="topk", d_sae=32, k=3, tokens=4 * 256, batch_size=256, **QUIET)
    a, b, c = train_dictionary(ds, seed=1, **kw), train_dictionary(ds, seed=1, **kw), train_dictionary(ds, seed=2, **kw)
    assert torch.equal(a.sae.W_enc, b.sae.W_enc) and torch.equal(a.sae.W_dec, b.sae.W_dec)
    assert not torch.equal(a.sae.W_dec, c.sae.W_dec)
    from matplotlib.figure import Figure

    frame = a.to_frame()
    assert list(frame.columns[:5]) == ["step", "tokens", "lr", "loss", "mse"] and frame["step"].iloc[-1] == 4
    assert isinstance(a.plot(), Figure) and a.tokens_per_second > 0


def test_topk_recovers_a_planted_dictionary(planted_ds):
    """Tokens are sparse positive combinations of 32 unknown directions; a TopK SAE finds every one of them."""
    ds, D = planted_ds
    run = train_dictionary(ds, architecture="topk", d_sae=64, k=3, tokens=400 * 256, batch_size=256, lr=3e-3,
                           decay_fraction=0.3, **QUIET)
    cos = (D @ run.sae.W_dec_normed.T).max(dim=1).values
    assert cos.min() > 0.9, cos.sort().values[:5]
    assert run.log[-1]["explained_variance"] > 0.9 and run.log[-1]["l0"] == 3


def test_transcoder_learns_the_mlp(smollm2_tokenizer, tmp_path):
    """A transcoder from a tiny model's MLP input (ln2 output) to its MLP output, both from one collection,
    explains most of the MLP output's variance on tokens it did not train on."""
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=len(smollm2_tokenizer),
                                   n_ctx=32, d_mlp=32, model_name="sae-train-tiny")
    model = models.HookedTransformer(cfg, tokenizer=smollm2_tokenizer).requires_grad_(False)
    randomize_(model, std=0.3)  # an MLP whose output is not ~0 (the default init's is)
    hooks = ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"]
    ds = collect_activations(model, default_corpus(), hooks, tmp_path / "acts", seq_len=32, max_sequences=320,
                             batch_size=32, positions=slice(1, None), progress=False)
    run = train_dictionary(ds, architecture="topk", d_sae=128, k=8, hook=hooks[0], out_hook=hooks[1],
                           tokens=150 * 256, batch_size=256, lr=3e-3, **QUIET)
    sae = run.sae
    assert sae.cfg.is_transcoder and sae.cfg.writes_to == hooks[1] and not sae.cfg.apply_b_dec_to_input
    tokens = torch.tensor([[smollm2_tokenizer.bos_token_id] + list(range(1000, 1031))])  # held out
    _, cache = model.run_with_cache(tokens, names_filter=hooks)
    x, y = cache[hooks[0]][0, 1:], cache[hooks[1]][0, 1:]
    ev = 1 - (sae(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert ev > 0.7, ev
    assert run.log[-1]["explained_variance"] > 0.8


def test_trained_dictionaries_save_and_load_back(planted_ds, tmp_path):
    """What training returns goes through SAELens's format (interp.sae.formats: the normalisation factor folded, a
    BatchTopK as a JumpReLU at its threshold) and comes back computing the same."""
    from interp.sae import load_dictionary, save_dictionary

    ds, _ = planted_ds
    x = ds.load("h").reshape(-1, 32)[:200]
    for arch in ("topk", "batchtopk", "jumprelu"):
        run = train_dictionary(ds, architecture=arch, d_sae=32, k=3 if "topk" in arch else None, tokens=1024,
                               batch_size=256, **QUIET)
        back = load_dictionary(save_dictionary(run.sae, tmp_path / arch))
        torch.testing.assert_close(back(x), run.sae(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- bad input
def test_bad_input_names_the_problem(planted_ds, tmp_path):
    ds, _ = planted_ds
    with pytest.raises(TypeError, match="unknown option.*learning_rate"):
        train_dictionary(ds, d_sae=32, k=3, learning_rate=1e-3)
    with pytest.raises(ValueError, match="width"):
        train_dictionary(ds, k=3)
    with pytest.raises(ValueError, match="no full step"):
        train_dictionary(ds, d_sae=32, k=3, tokens=100, batch_size=256)
    with pytest.raises(ValueError, match="d_in is 8"):
        train_dictionary(ds, DictionaryConfig(architecture="topk", d_in=8, d_sae=32, hook_name="h", k=3), tokens=256)
    with pytest.raises(ValueError, match="exceed"):
        train_dictionary(ds, d_sae=32, k=3, tokens=1024, batch_size=256, warmup_steps=4, **QUIET)
    two = synthetic_collection(tmp_path / "two", {"a": torch.randn(2, 8, 4), "b": torch.zeros(2, 8, 4)})
    with pytest.raises(ValueError, match="say which with hook="):
        train_dictionary(two, d_sae=8, k=2)
    options = dataclasses.replace(TrainingOptions(), tokens=8, batch_size=8, progress=False)
    assert train_dictionary(two, hook="a", d_sae=8, k=2, options=options).steps == 1
    assert math.isfinite(train_dictionary(two, hook="a", d_sae=8, k=2, options=options).log[-1]["loss"])
    with pytest.raises(ValueError, match="zero in all 16 rows"):  # norm_tokens: min(1000 batches, all)
        train_dictionary(two, hook="b", d_sae=8, k=2, options=options)
