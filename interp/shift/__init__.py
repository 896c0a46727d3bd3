"""Contextual-embedding shift: follow a word through every layer across contexts.

    from interp.shift import shift_study
    result = shift_study(model, "mole", contexts, labels)   # one call for everything below
    result.to_frame(); result.save("reports/mole")

Pieces: `trace_word` (the word's vector per layer and context), `geometry` (shift from the
static vector, Ethayarajh's self-similarity / intra-sentence similarity / MEV with their
anisotropy baselines), `senses` (within/between similarity, nearest-centroid accuracy,
probes), `decompose` and `shift_attribution` (which components carry a shift), `lens`
(logit lens, nearest embeddings) and `tuned_lens`.
"""

from interp.shift.attribution import ShiftAttribution, shift_attribution
from interp.shift.decompose import Decomposition, decompose, head_attention_from
from interp.shift.geometry import Geometry, geometry
from interp.shift.lens import LensReadout, logit_lens, nearest_tokens, read_lens
from interp.shift.senses import centroid_accuracy, probe_accuracy, sense_similarity, trajectories
from interp.shift.study import ShiftResult, shift_study
from interp.shift.trace import WordNotFound, WordTrace, trace_word

__all__ = ["Decomposition", "Geometry", "LensReadout", "ShiftAttribution", "ShiftResult", "WordNotFound", "WordTrace",
           "centroid_accuracy", "decompose", "geometry", "head_attention_from", "logit_lens", "nearest_tokens",
           "probe_accuracy", "read_lens", "sense_similarity", "shift_attribution", "shift_study", "trace_word",
           "trajectories"]
