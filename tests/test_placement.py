"""A model over several devices (models.placement, issue 17).

This machine has one real device. The meta device stands in for a second one: a block on it holds
meta weights and computes shapes only, and any operation that mixes a CPU tensor with a meta one
raises, as CUDA does with CPU tensors, so a forward that forgot to move the stream fails here. The
values of a split run are checked against the one-device run on a GPU (benchmarks/split_devices.py).
"""

from __future__ import annotations

import pytest
import torch

import models
from conftest import PROMPTS
from models.placement import DeviceMapError, resolve_device_map, units
from models.weight_views import SplitModelError

SPLIT = ["cpu", "meta"]


@pytest.fixture(scope="module")
def split(llama_dir):
    return models.load(llama_dir, device_map=SPLIT)


def test_each_block_lives_on_its_device(split):
    n = split.cfg.n_layers
    for layer, block in enumerate(split.blocks):
        want = "cpu" if layer < n // 2 else "meta"
        assert {p.device.type for p in block.parameters()} == {want}
    assert split.embed.W_E.device.type == "cpu" and split.unembed.W_U.device.type == "meta"
    assert split.device_map == {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "meta", "head": "meta"}
    assert split.device.type == "cpu"  # inputs go where the embedding is


def test_a_dict_names_each_block_and_the_rest_follows(llama_dir):
    model = models.load(llama_dir, device_map={0: "meta", 1: "cpu"})
    assert model.device_map == {"embed": "meta", "blocks.0": "meta", "blocks.1": "cpu", "head": "cpu"}
    model = models.load(llama_dir, device_map={0: "cpu", 1: "meta", "head": "cpu"})
    assert model.ln_final.w.device.type == "cpu" and model.unembed.W_U.device.type == "cpu"


def test_the_forward_moves_the_stream_and_hooks_see_their_blocks_device(split):
    tokens = split.to_tokens(PROMPTS[:2], padding_side="left")
    mask = (tokens != split.tokenizer.pad_token_id).long()
    logits, cache = split.run_with_cache(tokens, attention_mask=mask)
    assert logits.device.type == "meta" and logits.shape == (2, tokens.shape[1], split.cfg.d_vocab)
    assert cache["resid_pre", 0].device.type == "cpu" and cache["pattern", 0].device.type == "cpu"
    assert cache["resid_post", 1].device.type == "meta" and cache["pattern", 1].device.type == "meta"
    # TransformerLens' stacks gather where the last layer ran, beside the unembedding.
    assert split.run_with_cache(tokens)[1].accumulated_resid().device.type == "meta"
    # a resumed forward, and a KV-cached step, cross the devices the same way
    resid = torch.zeros(2, tokens.shape[1], split.cfg.d_model)
    assert split(resid, start_at_layer=0).device.type == "meta"
    kv = split.new_kv_cache()
    split(tokens[:, :-1], past_kv=kv)
    assert split(tokens[:, -1:], past_kv=kv).shape[1] == 1


def test_stacked_views_refuse_unless_gathered(split):
    with pytest.raises(SplitModelError, match=r"blocks live on cpu, meta.*gathered_on"):
        split.W_Q
    with split.gathered_on("meta"):
        assert split.W_Q.device.type == "meta" and split.W_Q.shape[0] == split.cfg.n_layers
        assert split.QK.A.device.type == "meta"
    with pytest.raises(SplitModelError):
        split.OV


def test_moving_a_split_model_to_one_device_joins_it(llama_dir):
    model = models.load(llama_dir, device_map=SPLIT)
    model.to("meta")
    assert model.device_map is None and all(b.placed_on is None for b in model.blocks)
    assert model.W_Q.device.type == "meta"


def test_an_encoder_decoder_splits_across_its_stacks(tmp_path, smollm2_tokenizer):
    from family_specs import saved_seq2seq

    _, whole = saved_seq2seq("t5", tmp_path / "t5", smollm2_tokenizer)
    names = units(whole)
    assert names[0] == "embed" and names[-1] == "head" and names[1].startswith("encoder.blocks.")
    # Encoder: its first block here, the rest on the stand-in, the final norm with its last block.
    placement = {name: "meta" for name in names[1:-1]}
    placement.update({"encoder.blocks.0": "cpu", "decoder.blocks.0": "cpu", "embed": "cpu", "head": "cpu"})
    model = models.load(tmp_path / "t5", device_map=placement)
    assert model.encoder.ln_final.w.device.type == "meta" and model.encoder.blocks[0].attn.W_Q.device.type == "cpu"
    ids = torch.tensor([[5, 6, 7, 8]])
    memory = model.encode(ids)
    assert memory.device.type == "meta" and memory.shape == whole.encode(ids).shape
    # Decoder: the encoder's output is read on the CPU by block 0 and on the stand-in by the rest. (The tied
    # head computes beside the embedding, which no meta tensor can reach back to; stop before it.)
    placement = {name: "cpu" for name in names}
    placement.update({name: "meta" for name in names if name.startswith("decoder.blocks.")})
    placement["decoder.blocks.0"] = "cpu"
    model = models.load(tmp_path / "t5", device_map=placement)
    seen = {}

    def stop(tensor, hook):
        seen[hook.name] = tensor.device.type
        if hook.name.startswith(f"decoder.blocks.{len(model.decoder.blocks) - 1}"):
            raise StopIteration

    hooks = [(f"decoder.blocks.{l}.hook_cross_attn_out", stop) for l in range(len(model.decoder.blocks))]
    with pytest.raises(StopIteration), model.hooks(hooks):
        model(ids, torch.tensor([[0, 5, 6]]))
    assert seen["decoder.blocks.0.hook_cross_attn_out"] == "cpu"
    assert seen[f"decoder.blocks.{len(model.decoder.blocks) - 1}.hook_cross_attn_out"] == "meta"


def test_auto_on_a_machine_with_one_device_keeps_one(llama_dir, llama):
    model = models.load(llama_dir, device_map="auto")
    assert model.device_map is None
    tokens = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(model(tokens), llama(tokens))
    even = models.load(llama_dir, device_map=["cpu", "cpu"])
    assert torch.equal(even(tokens), llama(tokens))


def test_weights_from_a_live_module_are_copied(llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    model = models.load(hf, tokenizer=None)
    before = hf.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(1.0)
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.weight, before)


@pytest.mark.parametrize("device_map, message", [
    (["cuda:7"], r"names cuda:7 but this machine has \d+ CUDA device"),
    ({0: "cpu"}, r"leaves out blocks\.1"),
    ({"lm_head": "cpu", 0: "cpu", 1: "cpu"}, r"key 'lm_head' is not a unit"),
    ("cpu:x", r"'cpu:x' is not a device"),
    ([], "empty list"),
    ("disk", "on disk"),
    (["cpu", "cpu", "cpu"], "3 devices for 2 blocks"),
    (3.5, "device_map must be"),
])
def test_bad_device_maps_are_named(llama_dir, device_map, message):
    if isinstance(device_map, list) and device_map and device_map[0].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    with pytest.raises(DeviceMapError, match=message):
        models.load(llama_dir, device_map=device_map)


def test_max_memory_goes_with_a_planner_and_one_placement_argument(llama_dir, llama):
    with pytest.raises(DeviceMapError, match="max_memory sizes accelerate's planner"):
        resolve_device_map(llama, ["cpu"], max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="not both"):
        models.load(llama_dir, device="meta", device_map=["cpu"])
