"""What `interp heads|patch|circuits|cache|collect` do (the parser is in analyses/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path


def loader(args):
    """models.load with the command's --device and --dtype."""
    import models

    return lambda name: models.load(name, device=args.device, dtype=args.dtype)


def read_lines(path: str | None) -> list[str]:
    """Non-empty lines of a text file (prompts, contexts); '-' reads standard input."""
    if path is None:
        return []
    import sys

    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def prompts_of(args) -> list[str]:
    return list(args.prompt or []) + read_lines(getattr(args, "prompts_file", None))


def heads(args) -> Path:
    from analyses.heads import census_reports

    index = census_reports(args.models, args.out, loader(args), prompts=prompts_of(args) or None, seed=args.seed)[1]
    print(f"wrote {index}")
    return index


def read_pairs(path: str) -> list[list[str]]:
    """Tab-separated lines: clean prompt, corrupted prompt, answer, wrong answer."""
    rows = []
    for i, line in enumerate(read_lines(path), 1):
        cells = line.split("\t")
        if len(cells) != 4:
            raise ValueError(f"{path}:{i}: expected 4 tab-separated fields (clean, corrupted, answer, wrong answer), "
                             f"got {len(cells)}")
        rows.append(cells)
    return rows


def patch(args) -> Path:
    from analyses.patching_study import answer_ids
    from interp.patching import activation_patch, attribution_patch, compare, logit_diff
    from interp.report import Page

    rows = read_pairs(args.pairs_file) if args.pairs_file else []
    if args.clean is not None or args.corrupted is not None:
        if None in (args.clean, args.corrupted, args.answer, args.wrong):
            raise ValueError("a pair needs --clean, --corrupted, --answer and --wrong (e.g. --answer ' Mary' "
                             "--wrong ' John'), or --pairs-file")
        rows.append([args.clean, args.corrupted, args.answer, args.wrong])
    if not rows:
        raise ValueError("give a pair (--clean ... --corrupted ... --answer ... --wrong ...) or --pairs-file")
    model = loader(args)(args.model)
    clean, corrupted, answer, wrong = (list(col) for col in zip(*rows))
    metric = logit_diff(answer_ids(model, answer), answer_ids(model, wrong), normalized=args.normalized)
    common = dict(kind=args.kind, by=args.by, direction=args.direction, metric=metric)
    results = {}
    if args.method in ("exact", "both"):
        results["exact"] = activation_patch(model, clean, corrupted, **common)
    if args.method in ("attribution", "both"):
        results["attribution"] = attribution_patch(model, clean, corrupted, **common)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    page = Page(f"Activation patching on {args.model}: {args.kind} by {args.by}",
                {"command": "interp patch", "model": args.model, "pairs": rows, "kind": args.kind, "by": args.by,
                 "direction": args.direction, "method": args.method, "normalized": args.normalized})
    numbers = {}
    for method, res in results.items():
        page.heading(f"{method} ({res.seconds:.1f} s, {res.forwards} forwards)", 2)
        page.figure(res.plot())
        page.table([{**cell, "effect": value} for cell, value in res.top(10)], caption="largest effects")
        res.save(out, name=method)
        numbers[method] = res.to_dict()
        for cell, value in res.top(5):
            print(f"{method:<12} {cell} {value:+.3f}")
    if len(results) == 2:
        agreement = compare(results["exact"], results["attribution"])
        numbers["agreement"] = agreement
        page.text(f"attribution vs exact: pearson {agreement['pearson']:.3f}, top-{agreement['k']} agreement "
                  f"{agreement['top_k']:.2f}")
    (out / "patch.json").write_text(json.dumps(numbers, indent=1, default=str))
    index = page.save(out / "index.html")
    print(f"wrote {index}")
    return index


def circuits(args) -> Path:
    if args.model is None:  # the attention-only models: the full framework study
        from analyses.framework import framework_study

        load = loader(args)
        result = framework_study(load(args.one_layer), load(args.two_layer))
        print(result.to_frame().to_string(index=False))
        index = result.save(args.out)
    else:
        from analyses.circuits_summary import circuit_summary

        summary = circuit_summary(loader(args)(args.model))
        print(summary.to_frame().sort_values("ov_positivity", ascending=False).head(10).to_string(index=False))
        index = summary.save(args.out)
    print(f"wrote {index}")
    return index


def cache(args) -> Path:
    """Run prompts through the model, keep the activations whose hook names match, save them."""
    import fnmatch

    import torch

    prompts = prompts_of(args)
    if not prompts:
        raise ValueError("give --prompt (repeatable) or --prompts-file")
    model = loader(args)(args.model)
    patterns = args.names or ["*"]
    names = [n for n in model.hook_dict if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        from interp.names import closest_names

        close = closest_names(patterns[0], list(model.hook_dict))
        raise ValueError(f"no hook name matches {patterns}; close: {', '.join(close) or 'none'} "
                         "(globs such as 'blocks.*.hook_resid_post')")
    tokens = model.to_tokens(prompts)
    with torch.no_grad():
        logits, acts = model.run_with_cache(tokens, names_filter=names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {name: acts[name].cpu() for name in names}
    torch.save({"activations": data, "tokens": tokens.cpu(), "prompts": prompts, "model": args.model,
                "str_tokens": [model.to_str_tokens(t) for t in tokens]}, out)
    for name in names[:20]:
        print(f"{name:<40} {tuple(data[name].shape)}")
    if len(names) > 20:
        print(f"... and {len(names) - 20} more")
    size = sum(t.numel() * t.element_size() for t in data.values())
    print(f"wrote {out}: {len(names)} activations, {size / 2 ** 20:.1f} MiB (torch.load(path) to read)")
    return out


def collect(args) -> Path:
    """Activations of --hooks over --corpus, written as shards + manifest.json (interp.collect)."""
    from interp.collect import collect_activations

    if args.corpus != "wiki" and not Path(args.corpus).exists():
        raise FileNotFoundError(f"--corpus {args.corpus} does not exist: give 'wiki', a text file, a folder or a "
                                "token file (.npy, .safetensors)")
    model = loader(args)(args.model)
    ds = collect_activations(
        model, args.corpus, args.hooks, args.out, seq_len=args.seq_len, positions=args.positions,
        dtype=args.store_dtype, batch_size=args.batch_size, shard_bytes=int(args.shard_mb * 2**20),
        max_sequences=args.max_sequences, max_tokens=args.max_tokens, prepend_bos=False if args.no_bos else None,
    )
    for hook in ds.hooks:
        print(f"{hook:<40} {list(ds.shape(hook))} {ds.manifest['hooks'][hook]['dtype']}")
    print(f"wrote {ds.path}: {ds.n_sequences} sequences x {len(ds.positions)} positions in {len(ds.shards)} shards "
          "(interp.collect.ActivationDataset(path) to read)")
    return ds.path
