"""A warm load of a registered model reads the converted copy in our own format: no `transformers`,
no converter, the same model bit for bit (docs/design.md, "Loading")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from conftest import PROMPTS
from models.registry import CONVERTED, conversion_key, load_path, resolve
from models.tokenizer import LIGHT_SPEC, LightTokenizer

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import models
model = models.load("smollm2-135m")
text = "The Eiffel Tower is located in the city of"
tokens = model.to_tokens(text)
model.to_str_tokens(text)
model.to_string(tokens)
model.tokenize([text, "a mole"], padding_side="left")
model.generate(text, max_new_tokens=2)
print(json.dumps({
    "tokenizer": type(model.tokenizer).__name__,
    "source": model.source,
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] == "transformers" or m.startswith("models.convert")),
}))
"""


def test_the_conversion_key_names_the_format():
    assert conversion_key().startswith("f2-")
    assert load_path("minilm-l6") == resolve("minilm-l6")  # no converted copy: the directory itself


@pytest.mark.slow
def test_warm_load_imports_neither_transformers_nor_the_converters():
    converted = load_path("smollm2-135m")  # converts here if the cache is cold, so the child's load is warm
    assert converted.parent == resolve("smollm2-135m") and converted.name == f"{CONVERTED}-{conversion_key()}"
    assert (converted / LIGHT_SPEC).exists()
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], report["heavy"]
    assert report["tokenizer"] == "LightTokenizer"
    assert report["source"] == str(converted)


@pytest.mark.slow
def test_warm_load_equals_loading_the_hugging_face_directory(smollm2):
    """The copy in our own format gives what converting the HF directory gives: config, every tensor
    (with its memory layout), tokens and logits."""
    reference = models.load(resolve("smollm2-135m"), name="smollm2-135m")
    assert isinstance(smollm2.tokenizer, LightTokenizer) and not isinstance(reference.tokenizer, LightTokenizer)
    assert smollm2.cfg == reference.cfg
    ours, theirs = smollm2.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]) and ours[key].stride() == theirs[key].stride(), key
    batch = smollm2.tokenize(PROMPTS, padding_side="left")
    again = reference.tokenize(PROMPTS, padding_side="left")
    assert torch.equal(batch.tokens, again.tokens) and batch.offsets == again.offsets
    with torch.no_grad():
        assert torch.equal(smollm2(batch.tokens, attention_mask=batch.attention_mask),
                           reference(again.tokens, attention_mask=again.attention_mask))
    assert smollm2.to_str_tokens(PROMPTS[0]) == reference.to_str_tokens(PROMPTS[0])
    assert smollm2.to_string(batch.tokens) == reference.to_string(again.tokens)
