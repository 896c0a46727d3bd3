"""The tour: one command that shows a newcomer what the toolkit does, written as an offline report.

    interp tour [--model smollm2-135m] [--prompt ...] [--out reports/tour]

For now the tour loads the default model, shows its next-token predictions and every
head's attention on a prompt; later studies add their own sections.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import models
from analyses.next_token import next_token_predictions
from interp.report import Page

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"


def run_tour(model_name: str = "smollm2-135m", prompt: str = DEFAULT_PROMPT, out: str | Path = "reports/tour",
             top_k: int = 10, device: str = "cpu", dtype: str = "float32", log=print) -> Path:
    out = Path(out)
    timings = {}
    start = time.perf_counter()
    model = models.load(model_name, device=device, dtype=dtype)
    timings["load_s"] = round(time.perf_counter() - start, 2)
    log(f"loaded {model_name} ({model.n_params() / 1e6:.0f}M parameters) in {timings['load_s']} s from {model.source}")

    start = time.perf_counter()
    result = next_token_predictions(model, prompt, top_k=top_k)
    timings["next_token_s"] = round(time.perf_counter() - start, 2)
    log(f"prompt: {prompt!r}")
    for row in result.to_frame().itertuples():
        log(f"  {row.rank:2d}. {row.token!r:<16} p={row.prob:.3f}  logit={row.logit:.2f}")

    run = {"command": f"interp tour --model {model_name} --prompt {json.dumps(prompt)}", "model": model_name,
           "model source": model.source, "device": device, "dtype": dtype}
    page = Page(f"Tour of the toolkit on {model_name}", run)
    page.text(f"Model: {model.extra_repr()}.")
    result.add_to_page(page)
    index = page.save(out / "index.html")
    (out / "results.json").write_text(json.dumps({"next_token": result.to_dict(), "timings": timings}, indent=2))
    log(f"wrote {index}")
    return index
