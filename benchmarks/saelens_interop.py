"""Our dictionary files against SAELens's own code, both ways, through files.

    python benchmarks/saelens_interop.py [--workdir DIR] [--tokens 512]

ours -> SAELens: we build random dictionaries of every kind, write them with `save_dictionary`, and SAELens's
`SAE.load_from_disk` (in its own environment, benchmarks/saelens_env.py) reads them and encodes the same
inputs. SAELens -> ours: SAELens builds random SAEs of its classes, writes them with its own `save_model`, and
`load_dictionary` reads them. pre-6 -> both: flat configs as SAELens 3-5 wrote them, read by both.
Inputs, weights and encodings travel as safetensors files. The table gives the largest absolute difference of
the latent activations and of the reconstructions, and the mean L0 (so a difference of 0 is not the trivial
one of all-zero codes); the acceptance bound is 1e-6 on both. For our files both sides read the same file;
"file vs saved" is how far that file's outputs are from the in-memory dictionary it was saved from
(rounding, where saving folds a normalisation factor into the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.saelens_env import run_in_saelens  # noqa: E402
from interp.sae import DictionaryConfig, SparseDictionary, load_dictionary, save_dictionary  # noqa: E402

D_IN, D_SAE, D_OUT, K = 48, 192, 40, 12

# Ours -> SAELens: (name, DictionaryConfig keywords). The SAELens architecture each is written as is in the table.
OURS = [
    ("relu", dict(architecture="relu", apply_b_dec_to_input=True)),
    ("topk", dict(architecture="topk", k=K, apply_b_dec_to_input=True)),
    ("topk-rescaled", dict(architecture="topk", k=K, apply_b_dec_to_input=True,
                           rescale_acts_by_decoder_norm=True)),
    ("jumprelu", dict(architecture="jumprelu")),
    ("batchtopk", dict(architecture="batchtopk", k=K, apply_b_dec_to_input=True)),
    ("relu-normalised", dict(architecture="relu", apply_b_dec_to_input=True,
                             normalize_activations="expected_average_only_in", norm_scaling_factor=2.5)),
    ("relu-layer-norm", dict(architecture="relu", apply_b_dec_to_input=True, normalize_activations="layer_norm")),
    ("relu-constant-norm", dict(architecture="relu", normalize_activations="constant_norm_rescale")),
    ("transcoder", dict(architecture="relu", out_hook_name="blocks.3.hook_mlp_out", d_out=D_OUT)),
    ("jumprelu-skip-transcoder", dict(architecture="jumprelu", out_hook_name="blocks.3.hook_mlp_out", d_out=D_OUT,
                                      skip=True)),
]
# SAELens -> ours: (name, SAELens architecture, its config keywords)
THEIRS = [
    ("standard", "standard", dict(apply_b_dec_to_input=True)),
    ("topk", "topk", dict(k=K, apply_b_dec_to_input=True)),
    ("topk-rescaled", "topk", dict(k=K, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True)),
    ("jumprelu", "jumprelu", dict(apply_b_dec_to_input=False)),
    ("transcoder", "transcoder", dict(apply_b_dec_to_input=False, d_out=D_OUT)),
    ("skip-transcoder", "skip_transcoder", dict(apply_b_dec_to_input=False, d_out=D_OUT)),
    ("jumprelu-transcoder", "jumprelu_transcoder", dict(apply_b_dec_to_input=False, d_out=D_OUT)),
]

# Pre-6 flat configs, written here as SAELens 3-5 wrote them (with the all-ones `scaling_factor` those kept);
# both SAELens's loader and ours read them.
LEGACY = [
    ("relu-flat", {"hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 3, "activation_fn_str": "relu",
                   "normalize_activations": False, "sae_lens_training_version": "3.13.0", "dtype": "torch.float32"}),
    ("topk-flat", {"hook_point": "blocks.3.hook_resid_pre", "activation_fn_str": "topk",
                   "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": False, "dtype": "float32"}),
]


def _write_legacy(folder: Path, cfg: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.3, "b_enc": torch.randn(D_SAE, generator=gen) * 0.5,
               "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.3, "b_dec": torch.randn(D_IN, generator=gen) * 0.5,
               "scaling_factor": torch.ones(D_SAE)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "model_name": "random", **cfg}))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


# Runs inside the SAELens environment: argv[1] is the work folder, with plan.json and inputs.safetensors.
SAELENS_SIDE = r'''
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEMetadata

work = Path(sys.argv[1])
plan = json.loads((work / "plan.json").read_text())
x = load_file(str(work / "inputs.safetensors"))
out = {}


def run(sae, name):
    xin = x["x"][:, : sae.cfg.d_in].contiguous()
    with torch.no_grad():
        acts = sae.encode(xin)
        recons = sae.forward(xin) if hasattr(sae, "W_skip") else sae.decode(acts)
    out[name + "/acts"], out[name + "/recons"] = acts.contiguous(), recons.contiguous()


for folder in plan["ours"] + plan["legacy"]:
    sae = SAE.load_from_disk(str(work / folder))
    out[folder + "/architecture"] = torch.tensor([ord(c) for c in sae.cfg.architecture()])
    run(sae, folder)

for i, (name, arch, kwargs) in enumerate(plan["theirs"]):
    sae_cls, cfg_cls = get_sae_class(arch)
    hooks = {"hook_name": "blocks.3.hook_resid_post"} if "transcoder" not in arch else \
        {"hook_name": "blocks.3.ln2.hook_normalized", "hook_name_out": "blocks.3.hook_mlp_out"}
    cfg = cfg_cls(d_in=plan["d_in"], d_sae=plan["d_sae"], metadata=SAEMetadata(model_name="random", **hooks),
                  **kwargs)
    sae = sae_cls(cfg)
    torch.manual_seed(100 + i)
    with torch.no_grad():
        for pname, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if pname in ("W_enc", "W_dec", "W_skip") else 0.5))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 1.5)
    sae.save_model(str(work / "theirs" / name))
    run(sae, "theirs/" + name)

save_file(out, str(work / "saelens_out.safetensors"))
import importlib.metadata as md
print(json.dumps({"sae-lens": md.version("sae-lens"), "transformer-lens": md.version("transformer-lens"),
                  "torch": torch.__version__}))
'''


def _random_dictionary(kwargs: dict, seed: int) -> SparseDictionary:
    hook = "blocks.3.ln2.hook_normalized" if kwargs.get("out_hook_name") else "blocks.3.hook_resid_post"
    cfg = DictionaryConfig(d_in=D_IN, d_sae=D_SAE, hook_name=hook, model_name="random", **kwargs)
    sae = SparseDictionary(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.startswith("W_") else 0.5))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=gen) * 1.5)
    return sae.eval()


def _outputs(sae: SparseDictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x[:, : sae.cfg.d_in]
    with torch.no_grad():
        acts = sae.encode(x)
        return acts, sae.decode(acts, x)


def compare(workdir: Path, tokens: int = 512) -> tuple[list[dict], dict]:
    """Run both directions in `workdir`; returns (one row per dictionary, the SAELens env's versions)."""
    workdir = Path(workdir)
    (workdir / "ours").mkdir(parents=True, exist_ok=True)
    (workdir / "theirs").mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, max(D_IN, D_OUT), generator=gen) * 1.5
    save_file({"x": x}, str(workdir / "inputs.safetensors"))
    ours = {}
    for i, (name, kwargs) in enumerate(OURS):
        ours[name] = _random_dictionary(kwargs, seed=i)
        save_dictionary(ours[name], workdir / "ours" / name)
    for i, (name, cfg) in enumerate(LEGACY):
        _write_legacy(workdir / "legacy" / name, cfg, seed=50 + i)
    plan = {"d_in": D_IN, "d_sae": D_SAE, "ours": [f"ours/{n}" for n, _ in OURS],
            "legacy": [f"legacy/{n}" for n, _ in LEGACY], "theirs": [list(t) for t in THEIRS]}
    (workdir / "plan.json").write_text(json.dumps(plan))
    done = run_in_saelens(SAELENS_SIDE, str(workdir), timeout=900)
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    theirs = load_file(str(workdir / "saelens_out.safetensors"))

    rows = []
    for name, sae in ours.items():
        # Compared: the file as SAELens reads it and as we read it. `vs_in_memory` is how far the file is from
        # the dictionary we saved (non-zero only where saving folds a normalisation factor into the weights).
        reread = load_dictionary(workdir / "ours" / name)
        acts, recons = _outputs(reread, x)
        acts_mem, recons_mem = _outputs(sae, x)
        arch = "".join(chr(int(c)) for c in theirs[f"ours/{name}/architecture"])
        rows.append(_row("ours -> SAELens", name, arch, acts, recons, theirs[f"ours/{name}/acts"],
                         theirs[f"ours/{name}/recons"], ours_arch=reread.cfg.architecture,
                         vs_in_memory=float(max((acts - acts_mem).abs().max(), (recons - recons_mem).abs().max()))))
    for name, _ in LEGACY:
        sae = load_dictionary(workdir / "legacy" / name)
        acts, recons = _outputs(sae, x)
        arch = "".join(chr(int(c)) for c in theirs[f"legacy/{name}/architecture"])
        rows.append(_row("pre-6 -> both", name, arch, acts, recons, theirs[f"legacy/{name}/acts"],
                         theirs[f"legacy/{name}/recons"], ours_arch=sae.cfg.architecture))
    for name, arch, _ in THEIRS:
        sae = load_dictionary(workdir / "theirs" / name)
        acts, recons = _outputs(sae, x)
        rows.append(_row("SAELens -> ours", name, arch, acts, recons, theirs[f"theirs/{name}/acts"],
                         theirs[f"theirs/{name}/recons"], ours_arch=sae.cfg.architecture))
    return rows, versions


def _row(direction, name, saelens_arch, acts, recons, their_acts, their_recons, ours_arch, vs_in_memory=0.0
         ) -> dict:
    return {"direction": direction, "dictionary": name, "saelens_architecture": saelens_arch,
            "ours_architecture": ours_arch, "vs_in_memory": vs_in_memory,
            "max_abs_diff_acts": float((acts - their_acts).abs().max()),
            "max_abs_diff_recons": float((recons - their_recons).abs().max()),
            "mean_l0": float((acts > 0).float().sum(-1).mean())}


COLUMNS = [("direction", "direction", 15, "s"), ("dictionary", "dictionary", 24, "s"),
           ("SAELens architecture", "saelens_architecture", 24, "s"),
           ("max abs diff acts", "max_abs_diff_acts", 17, ".2e"),
           ("max abs diff recons", "max_abs_diff_recons", 19, ".2e"), ("mean L0", "mean_l0", 7, ".1f"),
           ("file vs saved", "vs_in_memory", 13, ".1e")]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of compare()'s rows."""
    cell = lambda text, width, fmt: f"{text:<{width}}" if fmt == "s" else f"{text:>{width}{fmt}}"  # noqa: E731
    lines = ["| " + " | ".join(cell(title, width, "s") for title, _, width, _ in COLUMNS) + " |",
             "|" + "|".join("-" * (width + 2) for _, _, width, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r[key], width, fmt) for _, key, width, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="keep the exchanged files here (default: a temporary folder)")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows, versions = compare(Path(args.workdir or tmp), args.tokens)
    print(f"SAELens environment: {versions}; d_in={D_IN}, d_sae={D_SAE}, transcoder d_out={D_OUT}, k={K}, "
          f"{args.tokens} random inputs")
    print(format_table(rows))
    worst = max(max(r["max_abs_diff_acts"], r["max_abs_diff_recons"]) for r in rows)
    print(f"worst difference {worst:.2e} (bound 1e-6); wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
