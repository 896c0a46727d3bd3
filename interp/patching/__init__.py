"""Activation patching: exact and batched sweeps, path patching, attribution patching.

    from interp.patching import activation_patch, logit_diff
    result = activation_patch(model, clean, corrupted, kind="z", by="head_pos",
                              metric=logit_diff(correct, wrong, normalized=True))
"""

from interp.patching.attribution import attribution_patch, attribution_sweeps, compare, effects
from interp.patching.engine import PatchingRuns, activation_patch
from interp.patching.metrics import Metric, MetricContext, custom, kl_to_clean, log_prob, logit_diff, prob
from interp.patching.path import path_patch
from interp.patching.result import PatchResult
from interp.patching.runs import GaussianNoise, PromptLengthError
from interp.patching.seq2seq import SEQ2SEQ_KINDS, seq2seq_patch
from interp.patching.sites import KINDS, SAE_KINDS, Site, enumerate_sites

__all__ = [
    "activation_patch", "attribution_patch", "attribution_sweeps", "compare", "effects", "path_patch", "PatchingRuns", "Metric", "MetricContext", "custom", "kl_to_clean", "log_prob",
    "logit_diff", "prob", "PatchResult", "GaussianNoise", "PromptLengthError", "KINDS", "SAE_KINDS", "Site", "enumerate_sites",
    "seq2seq_patch", "SEQ2SEQ_KINDS",
]
