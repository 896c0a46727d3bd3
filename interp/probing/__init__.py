"""Attention-pattern probing: head detectors, attention-flow probes, linear probes, in-context learning.

Everything is re-exported here, so `from interp.probing import detect_heads` works.
"""

from interp.probing.detectors import (
    Detector,
    HeadScores,
    default_detectors,
    detect_heads,
    duplicate_token_mask,
    entropy,
    induction_mask,
    layer_patterns,
    local_mask,
    mask_score,
    prefix_matching_scores,
    previous_token_mask,
    previous_token_scores,
    random_tokens,
    repeated_random_tokens,
    special_token_ids,
    bos_mask,
)
from interp.probing.flow import FlowScores, attention_flow, flow_on
from interp.probing.icl import ICLResult, in_context_learning, is_language_model
from interp.probing.linear import (
    LinearProbeResult,
    LogisticRegression,
    collect_features,
    fit_logistic_regression,
    linear_probe,
    stratified_split,
)

__all__ = [
    "Detector", "HeadScores", "default_detectors", "detect_heads", "duplicate_token_mask", "entropy",
    "induction_mask", "layer_patterns", "local_mask", "mask_score", "prefix_matching_scores",
    "previous_token_mask", "previous_token_scores", "random_tokens", "repeated_random_tokens",
    "special_token_ids", "bos_mask", "ICLResult", "in_context_learning", "is_language_model", "FlowScores", "attention_flow",
    "flow_on", "LinearProbeResult", "LogisticRegression", "collect_features", "fit_logistic_regression",
    "linear_probe", "stratified_split",
]
