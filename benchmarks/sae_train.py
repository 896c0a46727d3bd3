"""Our dictionary trainer against SAELens's, on the same activations: quality and tokens per second.

    python benchmarks/sae_train.py [--sequences 512] [--tokens 131072] [--d-sae 2304] [--k 32] [--seeds 0 1 2]

Defaults: batches of 2048, lr 3e-3 with 10 warm-up steps and a linear decay over the last 20% (64 steps).

SmolLM2-135M (bundled), blocks.3.hook_resid_post (collected with stop_at_layer=4, so collection is cheap on a
CPU), the bundled Wikipedia corpus packed into 128-token rows (SAELens's BOS convention), BOS positions dropped.
One ActivationDataset; from it, per seed, a TopK SAE of the same width, k, batch size, learning-rate schedule,
normalisation factor and token budget is trained by
  ours     interp.sae.train_dictionary, reading the ActivationDataset's memory-mapped shards, with its default
           decoder convention (rows kept at unit norm, the gradient along them removed)
  ours-rs  the same with topk_decoder="rescale": SAELens 6's convention (rows free, latents ranked by
           pre-activation x row norm, norms folded at the end), the like-for-like comparison
  SAELens  sae_lens 6.54.12's SAETrainer + TopKTrainingSAE (its defaults: dense TopK, decoder norms rescaled),
           in its own environment (benchmarks/saelens_env.py), fed the same rows exported to one tensor file,
           shuffled in memory (cheaper than its ActivationsStore, so its number is if anything flattering)
interleaved seed by seed, so a busy machine slows both alike. The normalisation factor sqrt(d_in) / E||x|| is
estimated once, by our trainer, and handed to SAELens's ActivationScaler, so neither timing includes it.
Both are then evaluated by interp.sae.evaluate_dictionary on held-out rows (the packed sequences after the
collected ones): explained variance, and the change in next-token loss with the SAE spliced in (no error term).
Tokens/s is over the training loop (SAELens: `trainer.fit()`); CPU seconds are reported beside it because
other processes on a small shared machine slow wall time at random.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SAELENS_SCRIPT = r'''
import json, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer

args = json.loads(sys.argv[1])
acts = load_file(args["acts"])["acts"]
N, d = acts.shape
B = args["batch_size"]
seed = args["seed"]
torch.manual_seed(seed)
cfg = TopKTrainingSAEConfig(d_in=d, d_sae=args["d_sae"], k=args["k"], normalize_activations="expected_average_only_in",
                            metadata=SAEMetadata(hook_name=args["hook"], model_name=args["model"]))
sae = TopKTrainingSAE(cfg)
generator = torch.Generator().manual_seed(seed)

def provider():  # every row once per epoch, shuffled, full batches
    while True:
        perm = torch.randperm(N, generator=generator)
        for i in range(0, N - B + 1, B):
            yield acts[perm[i:i + B]]

trainer_cfg = SAETrainerConfig(total_training_samples=args["tokens"], train_batch_size_samples=B, lr=args["lr"],
                               lr_end=args["lr"], lr_warm_up_steps=args["warmup_steps"],
                               lr_decay_steps=args["decay_steps"], dead_feature_window=args["dead_window"])
trainer = SAETrainer(trainer_cfg, sae, provider())
trainer.activation_scaler.scaling_factor = args["norm_scaling_factor"]  # fit() then skips its estimate
start, start_cpu = time.perf_counter(), time.process_time()
trainer.fit()
seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
sae.save_inference_model(args["out"])
print(json.dumps({"seconds": seconds, "cpu": cpu, "tokens": trainer.n_training_samples}))
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=512, help="128-token rows collected for training")
    parser.add_argument("--tokens", type=int, default=131072, help="training budget per run")
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--decay-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-sequences", type=int, default=6)
    parser.add_argument("--keep", type=str, default=None, help="keep the collection and the SAEs in this folder")
    args = parser.parse_args()
    wall = time.perf_counter()
    import models
    from benchmarks.saelens_env import run_in_saelens, versions
    from interp.collect import collect_activations, default_corpus
    from interp.sae.evaluate import evaluate_dictionary
    from interp.sae.formats import load_dictionary
    from interp.sae.train import train_dictionary

    hook = f"blocks.{args.layer}.hook_resid_post"
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sae-train-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    env = versions()  # builds the SAELens environment if needed (minutes, once), before anything is timed
    model = models.load("smollm2-135m")
    torch.set_grad_enabled(False)
    t = time.perf_counter()
    ds = collect_activations(model, default_corpus(), [hook], root / "acts", seq_len=128, batch_size=8,
                             max_sequences=args.sequences, positions=slice(1, None), progress=False)
    collect_s = time.perf_counter() - t
    torch.set_grad_enabled(True)
    from safetensors.torch import save_file

    save_file({"acts": ds.load(hook).reshape(ds.n_tokens, -1).float().contiguous()}, str(root / "acts.safetensors"))
    steps = args.tokens // args.batch_size
    decay = round(args.decay_fraction * steps)
    common = dict(architecture="topk", d_sae=args.d_sae, k=args.k, tokens=args.tokens, batch_size=args.batch_size,
                  lr=args.lr, warmup_steps=args.warmup_steps, decay_fraction=args.decay_fraction, progress=False)
    ours, rescaled, theirs = {}, {}, {}
    for seed in args.seeds:
        for mine, convention in ((ours, "unit"), (rescaled, "rescale")):
            start_cpu = time.process_time()
            run = train_dictionary(ds, seed=seed, topk_decoder=convention, **common)
            mine[seed] = {"sae": run.sae, "seconds": run.seconds, "cpu": time.process_time() - start_cpu,
                          "tokens": run.tokens}
        child = {"acts": str(root / "acts.safetensors"), "batch_size": args.batch_size, "seed": seed,
                 "d_sae": args.d_sae, "k": args.k, "hook": hook, "model": "smollm2-135m", "tokens": args.tokens,
                 "lr": args.lr, "warmup_steps": args.warmup_steps, "decay_steps": decay,
                 "dead_window": run.options.dead_window, "norm_scaling_factor": run.sae.cfg.norm_scaling_factor,
                 "out": str(root / f"saelens-seed{seed}")}
        done = run_in_saelens(SAELENS_SCRIPT, json.dumps(child))
        report = json.loads(done.stdout.strip().splitlines()[-1])
        theirs[seed] = {**report, "sae": load_dictionary(root / f"saelens-seed{seed}", hook_name=hook)}
    t = time.perf_counter()
    groups = {"ours": ours, "ours-rs": rescaled, "SAELens": theirs}
    saes = [runs[s]["sae"] for runs in groups.values() for s in args.seeds]
    results = iter(evaluate_dictionary(model, saes, None, seq_len=128, n_sequences=args.eval_sequences,
                                       skip_sequences=args.sequences, batch_size=3))
    eval_s = time.perf_counter() - t
    for runs in groups.values():
        for seed in args.seeds:
            runs[seed]["eval"] = next(results)
    _print(args, hook, ds, groups, env, steps, collect_s, eval_s, time.perf_counter() - wall)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def _print(args, hook, ds, groups, env, steps, collect_s, eval_s, wall) -> None:
    first = next(iter(groups["ours"].values()))["eval"]
    print(f"SmolLM2-135M {hook}; {ds.n_tokens} training rows ({args.sequences} x 127, BOS dropped), collected in "
          f"{collect_s:.0f} s; CPU, {torch.get_num_threads()} threads; sae-lens {env['sae-lens']}, "
          f"torch {env['torch']}")
    print(f"TopK d_sae={args.d_sae} k={args.k}, {args.tokens} tokens per run = {steps} steps of {args.batch_size}, "
          f"lr {args.lr} (warm-up {args.warmup_steps}, linear decay over the last {args.decay_fraction:.0%}), "
          f"seeds {args.seeds}")
    print(f"evaluated on {first.n_tokens} held-out tokens ({args.eval_sequences} sequences after the collected ones, "
          f"BOS left out): clean CE {first.ce_clean:.4f}, zero-ablation CE {first.ce_zero_ablation:.4f}")
    print()
    print(f"{'trainer':8} {'seed':>4} {'tok/s':>8} {'tok/CPU-s':>9} {'EV':>7} {'ΔCE':>7} {'CE rec.':>7} {'KL':>7} "
          f"{'L0':>5} {'dead':>5}")
    for name, runs in groups.items():
        for seed, r in runs.items():
            e = r["eval"]
            print(f"{name:8} {seed:>4} {r['tokens'] / r['seconds']:>8.0f} {r['tokens'] / r['cpu']:>9.0f} "
                  f"{e.explained_variance:>7.4f} {e.delta_ce:>7.4f} {e.ce_loss_recovered:>7.4f} {e.kl_spliced:>7.4f} "
                  f"{e.l0:>5.1f} {e.dead_fraction:>5.2f}")
    print()
    summary = {}
    for name, runs in groups.items():
        summary[name] = {k: [f(r) for r in runs.values()] for k, f in (
            ("tok/s", lambda r: r["tokens"] / r["seconds"]), ("tok/CPU-s", lambda r: r["tokens"] / r["cpu"]),
            ("EV", lambda r: r["eval"].explained_variance), ("ΔCE", lambda r: r["eval"].delta_ce))}
        print(f"{name:8} mean ± sd over {len(runs)} seeds: " + ", ".join(
            f"{k} {statistics.mean(v):.4g} ± {statistics.stdev(v) if len(v) > 1 else 0:.2g}"
            for k, v in summary[name].items()))
    for name in ("ours", "ours-rs"):
        speed = statistics.mean(summary[name]["tok/s"]) / statistics.mean(summary["SAELens"]["tok/s"])
        speed_cpu = statistics.mean(summary[name]["tok/CPU-s"]) / statistics.mean(summary["SAELens"]["tok/CPU-s"])
        print(f"{name} / SAELens tokens per second: {speed:.2f}x wall, {speed_cpu:.2f}x per CPU second (goal >= 1.5x)")
        for key in ("EV", "ΔCE"):
            a, b = summary[name][key], summary["SAELens"][key]
            spread = max(statistics.stdev(a) if len(a) > 1 else 0, statistics.stdev(b) if len(b) > 1 else 0)
            print(f"  {key}: {name} - SAELens = {statistics.mean(a) - statistics.mean(b):+.4f} "
                  f"(largest seed sd {spread:.4f})")
    print(f"wall time {wall:.0f} s (collection {collect_s:.0f} s, evaluation {eval_s:.0f} s)")


if __name__ == "__main__":
    main()
