"""Factual recall on SmolLM2: where "The Eiffel Tower is located in the city of" finds Paris.

    python -m analyses.factual [--model smollm2-135m] [--out reports/factual]

Pairs: the Eiffel Tower prompt against landmarks in other cities (and back), all of the
same token length, with each city's first token as the answer. A second corruption
follows Meng et al. (2022) and Zhang & Nanda (2023): Gaussian noise (3 x the embedding
std) on the subject's tokens, and the residual stream restored layer by layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from analyses.patching_study import PairSet, PatchingStudy, answer_ids, run_study, write_study
from interp.patching import GaussianNoise, PatchResult, activation_patch, log_prob
from interp.positions import word

TEMPLATE = "The {} is located in the city of"
EIFFEL = ("Eiffel Tower", " Paris")
# Same token count as "Eiffel Tower" for SmolLM2 (3 tokens), and the model knows each city.
OTHERS = [("Colosseum", " Rome"), ("Brandenburg Gate", " Berlin"), ("Prado Museum", " Madrid"),
          ("Sydney Opera House", " Sydney")]


def factual_pairs(n_landmarks: int | None = None) -> PairSet:
    """Eiffel Tower against each other landmark, both ways (8 pairs; 2 per landmark)."""
    clean, corrupted, answer, other = [], [], [], []
    for landmark, city in OTHERS[:n_landmarks]:
        for (a, a_city), (b, b_city) in ((EIFFEL, (landmark, city)), ((landmark, city), EIFFEL)):
            clean.append(TEMPLATE.format(a))
            corrupted.append(TEMPLATE.format(b))
            answer.append(a_city)
            other.append(b_city)
    return PairSet("landmark -> city", clean, corrupted, answer, other, "the landmark replaced by another")


@dataclass
class FactualStudy:
    study: PatchingStudy
    noise_trace: PatchResult  # log p(Paris), clean subject states restored into the noised run

    def save(self, directory) -> Path:
        return write_factual(self, Path(directory))


def factual_study(model, progress: bool = True, log=print, n_landmarks: int | None = None) -> FactualStudy:
    study = run_study(model, factual_pairs(n_landmarks), progress=progress, log=log)
    prompt = TEMPLATE.format(EIFFEL[0])
    paris = int(answer_ids(model, [EIFFEL[1]])[0])
    trace = activation_patch(model, [prompt], kind="resid_pre", by="layer_pos", metric=log_prob(paris),
                             noise=GaussianNoise(word(EIFFEL[0]), scale=3.0, seed=0), progress=progress)
    return FactualStudy(study, trace)


INTRO = ("Factual recall: 'The Eiffel Tower is located in the city of' -> ' Paris'. Patching between landmarks "
         "shows where the subject's tokens carry the city and where it moves to the last position.")


def write_factual(result: FactualStudy, out: Path) -> Path:
    from interp.report import Page

    index = write_study(result.study, out, f"Factual recall on {result.study.model_name}", INTRO)
    trace = result.noise_trace
    page = Page("Causal trace with Gaussian noise on the subject", {"model": result.study.model_name})
    page.text(f"log p(' Paris'): clean {float(trace.clean_metric[0]):.2f}, subject noised "
              f"{float(trace.corrupted_metric[0]):.2f}. Each cell restores one clean residual-stream vector "
              "into the noised run.")
    page.figure(trace.plot())
    page.save(out / "noise_trace.html")
    return index


def main(argv=None) -> int:
    """`python -m analyses.factual` is `interp factual`."""
    from analyses.cli import main as cli_main

    return cli_main(["factual", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
