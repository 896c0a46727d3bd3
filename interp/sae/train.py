"""Training a sparse dictionary (SAE or transcoder) on an ActivationDataset.

    ds = collect_activations(model, None, ["blocks.5.hook_resid_post"], "acts/", seq_len=128)
    run = train_dictionary(ds, architecture="topk", d_sae=4608, k=32, tokens=2_000_000, seed=0)
    run.sae                                  # SparseDictionary, ready to splice or save
    run.to_frame()                           # the training log: step, tokens, lr, losses, L0, EV, dead latents
    # a transcoder: both hooks collected in the same ActivationDataset
    train_dictionary(ds, hook="blocks.5.ln2.hook_normalized", out_hook="blocks.5.hook_mlp_out", ...)

What a run does, in order: picks the hooks, builds the dictionary (SAELens's initialisation, losses.py),
estimates SAELens's normalisation factor sqrt(d_in) / E||x|| from a shuffled pass over the data (it
multiplies inputs and targets during training and stays in `cfg.norm_scaling_factor`), then takes
`tokens // batch_size` Adam steps (SAELens's defaults: lr 3e-4, betas (0.9, 0.999), gradient norm
clipped to 1) with linear warm-up and a linear decay to 0 over the last `decay_fraction` of steps.
Batches come from `ActivationDataset.batches` with a seed per (seed, epoch), so the data order is a
function of the seed: a checkpoint records (epoch, batch) and a resumed run replays the epoch's order to
there. Checkpoints (every `checkpoint_every` tokens, in `checkpoint_dir`) hold the parameters, Adam's
state, the step, the data position and the dead-latent counters; calling again with the same arguments
resumes from the newest one and ends with the same weights, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from interp.collect.dataset import ActivationDataset
from interp.sae import losses
from interp.sae.dictionary import DictionaryConfig, SparseDictionary
from interp.sae.train_io import (IncompatibleCheckpointError, data_identity, latest_checkpoint, paired_batches,
                                 save_checkpoint)

__all__ = ["IncompatibleCheckpointError", "TrainingOptions", "TrainingRun", "train_dictionary"]

UNIT_DECODER = ("topk", "batchtopk")  # architectures whose decoder rows are kept at unit norm
SPARSE = ("topk", "batchtopk")  # trained through losses.py's sparse path


@dataclass
class TrainingOptions:
    """How to train (SAELens's names and defaults where it has them).

    tokens: the budget (steps = tokens // batch_size). decay_fraction: the last fraction of steps over
    which the learning rate falls linearly to 0. dead_window: steps without firing after which a latent is
    dead (SAELens's dead_feature_window), which turns on the aux-k loss for it. aux_coefficient: weight of
    the TopK/BatchTopK aux-k loss. l1_coefficient (relu), l0_coefficient (jumprelu) and their linear
    warm-up sparsity_warmup_steps. jumprelu_bandwidth / jumprelu_init_threshold: the STE's kernel width and
    the initial threshold. batchtopk_threshold_lr: BatchTopK's threshold is an exponential moving average
    of the smallest active value per batch, at this rate. normalize: "expected_average_only_in" or "none".
    norm_tokens: rows used to estimate the factor (None: 1000 batches, SAELens's count, at most one epoch).
    decoder_init_norm: SAELens's 0.1 heuristic. topk_decoder: TopK/BatchTopK's decoder convention, "unit" (rows kept at
    norm 1, the gradient along them removed) or "rescale" (SAELens 6's rescale_acts_by_decoder_norm: rows free,
    latents ranked by pre-activation x row norm, the norms folded into the encoder when training ends).
    checkpoint_every: tokens between checkpoints (None: none, unless stop_at_tokens); keep_checkpoints: how many
    to keep. stop_at_tokens: checkpoint and return
    early there (a preemptible job's slice; call again to go on).
    """

    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    seed: int = 0
    dead_window: int = 1000
    aux_coefficient: float = 1.0
    l1_coefficient: float = 1.0
    l0_coefficient: float = 1.0
    sparsity_warmup_steps: int = 0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    batchtopk_threshold_lr: float = 0.01
    normalize: str = "expected_average_only_in"
    norm_tokens: int | None = None
    decoder_init_norm: float = 0.1
    topk_decoder: str = "unit"
    clip_grad_norm: float = 1.0
    device: str = "cpu"
    log_every: int = 50
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    stop_at_tokens: int | None = None
    progress: bool = True

    # fields that do not change the trained weights (so a resume may change them)
    NOT_IDENTITY = ("device", "log_every", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "stop_at_tokens",
                    "progress")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def identity(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k not in self.NOT_IDENTITY}


@dataclass
class TrainingRun:
    """What train_dictionary returns: the dictionary, the log (a row every `log_every` steps and the last),
    tokens and steps trained, the seconds the training loop took (not counting the normalisation estimate or
    set-up) and tokens per second over them. `finished` is False after a stop_at_tokens slice."""

    sae: SparseDictionary
    log: list[dict]
    tokens: int
    steps: int
    seconds: float
    options: TrainingOptions
    finished: bool = True
    resumed_from: int | None = None  # tokens of the checkpoint this call started from
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        trained = self.tokens - (self.resumed_from or 0)
        return trained / self.seconds if self.seconds else float("nan")

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.log)

    def plot(self):
        """Loss and explained variance over tokens -> `Figure`."""
        from interp.plots import line_chart

        x = [row["tokens"] for row in self.log]
        series = {"mse": [r["mse"] for r in self.log],
                  "explained variance": [r["explained_variance"] for r in self.log]}
        return line_chart(series, x=x, x_label="tokens", title=repr(self.sae.cfg))


def train_dictionary(dataset, cfg: DictionaryConfig | None = None, *, architecture: str = "topk",
                     d_sae: int | None = None, expansion_factor: int | None = None, k: int | None = None,
                     hook: str | None = None, out_hook: str | None = None, skip: bool = False,
                     apply_b_dec_to_input: bool | None = None, options: TrainingOptions | None = None,
                     **overrides) -> TrainingRun:
    """Train a dictionary on `dataset` (an ActivationDataset or its folder) -> TrainingRun.

    The dictionary is `cfg`, or built from architecture ("topk", "batchtopk", "jumprelu", "relu"), d_sae (or
    expansion_factor x d_in), k, hook (the input; default: the collection's only hook), out_hook (a transcoder's
    target, e.g. the MLP output with hook the MLP input; both must be in the collection) and skip (a skip
    transcoder). apply_b_dec_to_input defaults to SAELens's True for SAEs (transcoders cannot). Training
    options: `options` and/or keyword overrides of TrainingOptions' fields (tokens=, batch_size=, lr=, seed=...).
    """
    options = dataclasses.replace(options or TrainingOptions(), **_checked(overrides))
    ds = dataset if isinstance(dataset, ActivationDataset) else ActivationDataset(dataset)
    cfg = cfg or _config(ds, architecture, d_sae, expansion_factor, k, hook, out_hook, skip, apply_b_dec_to_input)
    cfg = dataclasses.replace(cfg, metadata=dict(cfg.metadata))
    hooks = [cfg.hook_name] + ([cfg.out_hook_name] if cfg.is_transcoder else [])
    for name, width in zip(hooks, (cfg.d_in, cfg.d_out)):
        if math.prod(ds.shape(name)[1:]) != width:
            raise ValueError(f"{name} holds {ds.shape(name)[1:]} per token in {ds.path}, but the dictionary's "
                             f"{'d_out' if name != cfg.hook_name else 'd_in'} is {width}: build it for this collection")
    if options.steps < 1 or ds.n_tokens < options.batch_size:
        raise ValueError(f"tokens={options.tokens} with batch_size={options.batch_size} over {ds.n_tokens} collected "
                         "tokens leaves no full step: raise tokens, lower batch_size, or collect more")
    trainer = _Trainer(ds, cfg, hooks, options)
    return trainer.run()


def _checked(overrides: dict) -> dict:
    names = {f.name for f in dataclasses.fields(TrainingOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"train_dictionary got unknown option(s) {', '.join(unknown)}; TrainingOptions has "
                        f"{', '.join(sorted(names))}")
    return overrides


def _config(ds, architecture, d_sae, expansion_factor, k, hook, out_hook, skip, apply_b_dec_to_input):
    if hook is None:
        if len(ds.hooks) != 1:
            raise ValueError(f"{ds.path} holds {len(ds.hooks)} hooks ({', '.join(ds.hooks)}): say which with hook=")
        hook = ds.hooks[0]
    shape = ds.shape(hook)[1:]
    d_in = math.prod(shape)
    d_out = math.prod(ds.shape(out_hook)[1:]) if out_hook else d_in
    if d_sae is None:
        if expansion_factor is None:
            raise ValueError("give the dictionary's width: d_sae= or expansion_factor= (d_sae = factor x d_in)")
        d_sae = expansion_factor * d_in
    transcoder = out_hook is not None and out_hook != hook
    b_dec_in = (not transcoder) if apply_b_dec_to_input is None else apply_b_dec_to_input
    return DictionaryConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name=hook,
                            out_hook_name=out_hook if transcoder else None, d_out=d_out, k=k, skip=skip,
                            apply_b_dec_to_input=b_dec_in, model_name=ds.manifest["model"]["name"],
                            reshape_activations="hook_z" if len(shape) == 2 else "none")


class _Trainer:
    """One training run's state. Everything that a resumed run needs is in `state()`."""

    def __init__(self, ds: ActivationDataset, cfg: DictionaryConfig, hooks: list[str], options: TrainingOptions):
        self.ds, self.hooks, self.options = ds, hooks, options
        self.device = torch.device(options.device)
        self.sae = SparseDictionary(cfg).to(self.device)
        generator = torch.Generator().manual_seed(options.seed)
        if options.topk_decoder not in ("unit", "rescale"):
            raise ValueError(f"topk_decoder must be 'unit' or 'rescale', got {options.topk_decoder!r}")
        self.unit_decoder = cfg.architecture in UNIT_DECODER and options.topk_decoder == "unit"
        losses.initialise(self.sae, generator, options.decoder_init_norm, self.unit_decoder)
        if cfg.architecture == "jumprelu":
            with torch.no_grad():
                self.sae.threshold.fill_(options.jumprelu_init_threshold)
        if cfg.architecture in SPARSE:  # W_enc [d_in, d_sae] laid out as [d_sae, d_in]: the sparse gradient's layout
            self.sae.W_enc.data = self.sae.W_enc.data.T.contiguous().T
        params = [p for p in self.sae.parameters() if not (cfg.architecture == "batchtopk" and p is self.sae.threshold)]
        self.params = params
        fused = self.device.type == "cpu" or self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(params, lr=options.lr, betas=options.adam_betas, fused=fused)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        self.fired_total = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        self.topk_threshold = 0.0  # BatchTopK's running threshold (float64 in Python, as SAELens keeps a double)
        self.log: list[dict] = []
        self.seconds = self.seconds_before = 0.0  # training-loop seconds, over every call that led here
        self.identity = {"dictionary": {k: v for k, v in cfg.to_dict().items() if k not in ("norm_scaling_factor",
                                                                                         "metadata")},
                         "training": options.identity(), "data": data_identity(ds)}

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainingRun:
        opts = self.options
        resumed = self._resume()
        if resumed is None and opts.normalize == "expected_average_only_in":
            self._estimate_norm()
        elif resumed is None:
            self.sae.cfg.normalize_activations = "none"
        factor = self.sae.cfg.norm_scaling_factor or 1.0
        total, decay = opts.steps, round(opts.decay_fraction * opts.steps)
        if opts.warmup_steps + decay > total:
            raise ValueError(f"warmup_steps={opts.warmup_steps} + decay ({decay} steps) exceed the {total} steps of "
                             "the budget: lower them or raise tokens")
        stop = total if opts.stop_at_tokens is None else min(total, opts.stop_at_tokens // opts.batch_size)
        every = max(1, opts.checkpoint_every // opts.batch_size) if opts.checkpoint_every else None
        bar = _progress(opts, total, self.step)
        stream = self._stream()
        start = time.perf_counter()
        while self.step < stop:
            x, y = next(stream)
            x = x.to(self.device, torch.float32, non_blocking=True) * factor
            y = x if y is None else y.to(self.device, torch.float32, non_blocking=True) * factor
            for group in self.optimizer.param_groups:
                group["lr"] = opts.lr * losses.lr_factor(self.step, total, opts.warmup_steps, decay)
            out = self._step(x, y)
            self.step += 1
            if self.step % opts.log_every == 0 or self.step == total:
                self._log(out, x if y is x else y, time.perf_counter() - start)
                bar.set_postfix(loss=f"{self.log[-1]['loss']:.4g}", L0=f"{out['l0']:.1f}",
                                EV=f"{self.log[-1]['explained_variance']:.3f}", refresh=False)
            bar.update(opts.batch_size)
            if (every and self.step % every == 0) or self.step == stop:
                if opts.checkpoint_dir and (every or self.step < total):
                    self.seconds += time.perf_counter() - start
                    self._save_checkpoint()
                    start = time.perf_counter()
        self.seconds += time.perf_counter() - start
        bar.close()
        self._finish()
        return TrainingRun(self.sae, self.log, self.step * opts.batch_size, self.step,
                           self.seconds - self.seconds_before, opts,
                           finished=self.step == total, resumed_from=resumed,
                           extra={"fired_tokens": self.fired_total.cpu(), "topk_threshold": self.topk_threshold})

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        cfg, opts = self.sae.cfg, self.options
        if cfg.architecture == "jumprelu":
            with torch.no_grad():
                self.sae.threshold.clamp_(min=0.0)  # SAELens projects the threshold to >= 0 before each forward
        dead = self.since_fired > opts.dead_window
        out = losses.training_forward(self.sae, x, y, dead, opts, self.step)
        with torch.no_grad():  # counters as SAELens keeps them: fired this step resets, everyone else ages
            fired = out["fired"]
            self.since_fired += 1
            self.since_fired[fired > 0] = 0
            self.fired_total += fired
            if out.get("min_active") is not None:
                lr = opts.batchtopk_threshold_lr
                self.topk_threshold = (1 - lr) * self.topk_threshold + lr * out["min_active"]
        out["loss"].backward()
        if self.unit_decoder:
            losses.project_decoder_grad(self.sae.W_dec)
        if opts.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, opts.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.unit_decoder:
            losses.renormalise_decoder(self.sae.W_dec)
        out["loss"] = float(out["loss"].detach())
        return out

    def _log(self, out: dict, target: torch.Tensor, seconds: float) -> None:
        residual = (target - out["recons"]).pow(2).sum(-1).sum()
        variance = (target - target.mean(0)).pow(2).sum(-1).sum()
        row = {"step": self.step, "tokens": self.step * self.options.batch_size,
               "lr": self.optimizer.param_groups[0]["lr"], "loss": out["loss"], "mse": out["mse"]}
        row.update({k: out[k] for k in ("aux_loss", "l1_loss", "l0_loss") if k in out})
        row.update(l0=out["l0"], explained_variance=float(1 - residual / variance),
                   dead=int((self.since_fired > self.options.dead_window).sum()), seconds=self.seconds + seconds)
        self.log.append(row)

    def _finish(self) -> None:
        self.sae.W_enc.data = self.sae.W_enc.data.contiguous()
        if self.sae.cfg.architecture in UNIT_DECODER and not self.unit_decoder:
            losses.fold_decoder_norms(self.sae)  # BatchTopK's threshold is already in the folded units
        if self.sae.cfg.architecture == "batchtopk":  # at inference a JumpReLU at the learnt threshold
            with torch.no_grad():
                self.sae.threshold.fill_(self.topk_threshold)
        self.sae.cfg.metadata.update(trained_tokens=self.step * self.options.batch_size, seed=self.options.seed,
                                     training=self.options.identity())
        self.sae.requires_grad_(False).eval()

    # ------------------------------------------------------------------ data
    def _epoch_batches(self, epoch: int):
        seed = int(np.random.SeedSequence([self.options.seed, epoch]).generate_state(1)[0])
        return paired_batches(self.ds, self.hooks, self.options.batch_size, seed)

    def _stream(self):
        """(x, y or None) batches forever, epoch after epoch, from the recorded position on."""
        while True:
            batches = self._epoch_batches(self.epoch)
            for _ in range(self.batch_in_epoch):  # a resumed run replays the epoch's order up to where it was
                next(batches)
            for pair in batches:
                self.batch_in_epoch += 1
                yield pair
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    @torch.no_grad()
    def _estimate_norm(self) -> None:
        """sqrt(d_in) / mean ||x|| over norm_tokens shuffled rows (SAELens's expected_average_only_in)."""
        opts = self.options
        wanted = min(opts.norm_tokens or 1000 * opts.batch_size, self.ds.n_tokens)
        seed = int(np.random.SeedSequence([opts.seed, 2**31]).generate_state(1)[0])  # not any epoch's order
        total, count = 0.0, 0
        for x in self.ds.batches(self.hooks[0], opts.batch_size, seed=seed):
            x = x.reshape(x.shape[0], -1)[: wanted - count]
            total += float(x.to(torch.float64).norm(dim=-1).sum())
            count += x.shape[0]
            if count >= wanted:
                break
        if total == 0:
            raise ValueError(f"{self.hooks[0]} is zero in all {count} rows sampled from {self.ds.path}: there is "
                             "nothing to learn (was the right hook collected?)")
        self.sae.cfg.normalize_activations = "expected_average_only_in"
        self.sae.cfg.norm_scaling_factor = self.sae.cfg.d_in ** 0.5 / (total / count)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"identity": self.identity, "params": {k: v.detach().clone() for k, v in self.sae.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "since_fired": self.since_fired.clone(),
                "fired_total": self.fired_total.clone(), "topk_threshold": self.topk_threshold,
                "norm_scaling_factor": self.sae.cfg.norm_scaling_factor,
                "normalize_activations": self.sae.cfg.normalize_activations, "log": self.log, "seconds": self.seconds}

    def _save_checkpoint(self) -> None:
        save_checkpoint(self.options.checkpoint_dir, self.step * self.options.batch_size, self.state(),
                        self.options.keep_checkpoints)

    def _resume(self) -> int | None:
        if not self.options.checkpoint_dir:
            return None
        state = latest_checkpoint(self.options.checkpoint_dir, self.identity, self.device)
        if state is None:
            return None
        self.sae.load_state_dict(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.since_fired, self.fired_total = state["since_fired"], state["fired_total"]
        self.topk_threshold, self.log = state["topk_threshold"], state["log"]
        self.seconds = self.seconds_before = state["seconds"]
        self.sae.cfg.norm_scaling_factor = state["norm_scaling_factor"]
        self.sae.cfg.normalize_activations = state["normalize_activations"]
        return self.step * self.options.batch_size


def _progress(options: TrainingOptions, total_steps: int, done_steps: int):
    from tqdm.auto import tqdm

    return tqdm(total=total_steps * options.batch_size, initial=done_steps * options.batch_size, unit="tok",
                unit_scale=True, desc="training dictionary", disable=not options.progress, dynamic_ncols=True)
