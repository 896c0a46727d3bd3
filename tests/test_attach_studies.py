"""The head census (analyses.heads) on an attached `transformers` model equals it on the converted model."""

from __future__ import annotations

import torch

from interp.attach import attach


def test_head_census_of_an_attached_model_equals_the_converted_model(llama, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from analyses.heads import head_census

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()
    hooked = attach(hf, tokenizer=AutoTokenizer.from_pretrained(llama_dir))
    assert hooked.is_language_model and hooked.cfg.n_ctx == 64
    ours, converted = head_census(hooked, n_random=4), head_census(llama, n_random=4)
    assert ours.scores.keys() == converted.scores.keys()
    for name in ours.scores:
        torch.testing.assert_close(ours.scores[name].per_prompt, converted.scores[name].per_prompt,
                                   atol=1e-5, rtol=1e-4)
    # In-context learning loss from the attached model's logits, against our model's own loss.
    torch.testing.assert_close(ours.icl.loss_per_position, converted.icl.loss_per_position, atol=1e-4, rtol=1e-4)
    assert ours.text_tokens == converted.text_tokens
    torch.testing.assert_close(ours.text_patterns, converted.text_patterns, atol=1e-5, rtol=1e-4)
    page = ours.save(tmp_path)
    assert page.exists() and "LlamaForCausalLM" in page.read_text()
    assert not attach(hf.model).is_language_model  # the bare LlamaModel has no LM head
