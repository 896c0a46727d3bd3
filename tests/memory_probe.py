"""Peak private (anonymous) host memory of one `models.load`, run as its own process.

    python tests/memory_probe.py <checkpoint dir> <dtype> <device or device_map JSON> [warm-up dir]

prints JSON: {"peak_anon": bytes above the baseline, "weight_bytes": bytes of the loaded weights}.
A thread samples RssAnon (/proc/self/status) every half millisecond; the
baseline is taken after a load of a tiny checkpoint of the same family (so every lazy import is done) (and CUDA is initialised, when the
target is a GPU), so only what the load itself holds is counted. File-backed pages (the memory-
mapped checkpoint) are not private memory and are not counted.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = rss_anon(), threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.0005)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_anon())
        return self.peak


def main(directory: str, dtype: str, where: str, warm_up: str | None = None) -> dict:
    import torch

    import models
    import accelerate  # everything a load imports, imported before the baseline
    import models.loading
    import transformers

    del accelerate, transformers

    if warm_up:
        models.load(warm_up, dtype=getattr(torch, dtype))
    placement = json.loads(where) if where.startswith(("[", "{")) else where
    if "cuda" in where:
        torch.zeros(1, device="cuda")  # the CUDA context's own host memory is not the load's
    import gc

    gc.collect()
    base = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    if isinstance(placement, str):
        model = models.load(directory, dtype=getattr(torch, dtype), device=placement)
    else:
        model = models.load(directory, dtype=getattr(torch, dtype), device_map=placement)
    peak = sampler.stop()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    devices = sorted({str(p.device) for p in model.parameters()})
    return {"peak_anon": peak - base, "weight_bytes": weight_bytes, "devices": devices}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
