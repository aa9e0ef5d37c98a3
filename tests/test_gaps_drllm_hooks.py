"""Dr.LLM runtime hooks: what the older tests left unchecked (mutation gaps of the pre / post hooks, the request's
cache guard and the stats).

* ``stats()`` counts are plain integers (they go into JSON reports as such).
* A cache whose slots all hold every row is left alone: its batch edits work as in transformers; a cache with
  sub-batch slots is guarded also when the decoder returns a tuple (``return_dict=False``), and its beam reorder
  copes with caches that have more layer slots than the request uses.
* The same cache continued with another batch size is a new request.
* A prefill onto a cache that already holds a prefix (its mask covers prefix + new tokens) pools over the new
  tokens.
* The plans are made on the inputs' device, not on torch's default device.
"""

import json

import pytest
import torch
from transformers import DynamicCache

import retrofit
from retrofit.testing import tiny_model

REFUSED = ("Dr.LLM: this decoding mode edits the KV cache's batch, whose layers hold per-layer sub-batches here; "
           "set handle.sub_batch = False for it")


def _ids(shape, seed=0):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_stats_counts_are_plain_ints_in_json():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    assert json.dumps(h.stats()["action_counts"]) == "[[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]"
    h.set_plan([["repeat", "skip", "repeat", "execute"], ["execute", "repeat", "skip", "skip"]])
    with torch.no_grad():
        model(_ids((2, 6)))
    s = h.stats()
    assert json.dumps(s["action_counts"]) == "[[0, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 0]]"
    assert all(type(x) is int for row in s["action_counts"] for x in row)
    assert s["mean_layers_executed"] == 4.0
    h.reset_stats()
    assert json.dumps(h.stats()["action_counts"]) == "[[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]"
    with torch.no_grad():
        model(_ids((2, 6)))
    assert json.dumps(h.stats()["action_counts"]) == "[[0, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 0]]"
    h.detach()


@pytest.mark.parametrize("per_row", [False, True])
def test_a_cache_without_sub_batch_slots_keeps_its_batch_edits(per_row):
    """Every slot holding every row (one plan for all rows, or sub_batch off): transformers' own batch edits
    work on the cache, and decoding on the edited cache is right."""
    model = tiny_model("llama")
    plan = ["execute", "skip", "repeat", "execute"]
    h = retrofit.attach(model, "drllm")
    if per_row:  # rows with different plans, but the whole-batch path: nothing to guard
        h.sub_batch = False
        h.set_plan([plan, ["skip", "repeat", "execute", "execute"], plan])
    else:
        h.set_plan(plan)
    ids = _ids((3, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        keys = [layer.keys.clone() for layer in cache.layers if layer.is_initialized]
        cache.batch_select_indices(torch.tensor([2, 0]))
        assert all(torch.equal(layer.keys, k[[2, 0]]) for layer, k in zip(cache.layers, keys))
        cache.batch_repeat_interleave(2)
        assert cache.layers[0].keys.shape[0] == 4
        cache.reorder_cache(torch.tensor([1, 0, 3, 2]))
        assert torch.equal(cache.layers[0].keys[0], keys[0][2]) and torch.equal(cache.layers[0].keys[2], keys[0][0])
    h.detach()


def test_the_same_cache_with_another_batch_size_is_a_new_request():
    """After batch_select_indices on a cache, the next forward on it has fewer rows: a new request (its plans and
    its sequence counted), and its logits are those of recomputing the kept row."""
    model = tiny_model("llama")
    plan = ["execute", "skip", "repeat", "execute"]
    h = retrofit.attach(model, "drllm")
    h.set_plan(plan)
    ids = _ids((2, 6))
    nxt = _ids((2, 1), seed=1)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        assert h.stats()["sequences"] == 2 and h.last_plans == [plan, plan]
        cache.batch_select_indices(torch.tensor([1]))
        out = model(nxt[1:], past_key_values=cache).logits
        assert h.last_plans == [plan]  # the request of this one row
        assert h.stats()["sequences"] == 3
        assert h.stats()["action_counts"][2] == [0, 0, 3]
        ref = model(torch.cat([ids[1:], nxt[1:]], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(out[:, -1], ref, rtol=1e-5, atol=1e-5)
    h.detach()


def test_a_passed_cache_is_guarded_when_the_decoder_returns_a_tuple():
    """The decoder called with return_dict=False (tracing, export) returns a tuple: the cache that was passed in
    still gets the sub-batch guard."""
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([["execute"] * 4, ["execute", "skip", "execute", "execute"], ["execute"] * 4])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.model(_ids((3, 5)), past_key_values=cache, return_dict=False)
    assert isinstance(out, tuple) and out[1] is cache
    assert [layer.keys.shape[0] for layer in cache.layers] == [3, 2, 3, 3]  # slot 1: rows 0 and 2
    keys = [layer.keys.clone() for layer in cache.layers]
    cache.reorder_cache(torch.tensor([2, 0, 0]))  # row 1 takes row 0's history; it never ran layer 1
    assert torch.equal(cache.layers[1].keys, keys[1][[1, 0]])  # slot 1's rows: 0 <- row 2, 1 <- row 0
    assert torch.equal(cache.layers[0].keys, keys[0][[2, 0, 0]])
    with pytest.raises(RuntimeError) as e:
        cache.batch_select_indices(torch.tensor([0]))
    assert str(e.value) == REFUSED
    with pytest.raises(RuntimeError) as e:
        cache.batch_repeat_interleave(2)
    assert str(e.value) == REFUSED
    h.detach()


def test_reorder_of_a_cache_with_more_layer_slots_than_the_request_uses():
    """Layers 2 and 3 run no row: the request uses two of the cache's four slots. The reorder maps the
    sub-batch slot, reorders the full one and leaves the unused ones alone; beam search equals the all-rows path."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([["execute", "execute", "skip", "skip"], ["execute", "skip", "skip", "skip"],
                ["execute", "execute", "skip", "skip"]])
    with torch.no_grad():
        cache = model(_ids((3, 5)), use_cache=True).past_key_values
    assert len(cache.layers) == 4
    assert [layer.keys.shape[0] if layer.is_initialized else None for layer in cache.layers] == [3, 2, None, None]
    keys = [cache.layers[s].keys.clone() for s in (0, 1)]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.layers[0].keys, keys[0][[2, 0, 0]])
    assert torch.equal(cache.layers[1].keys, keys[1][[1, 0]])
    assert not cache.layers[2].is_initialized and not cache.layers[3].is_initialized
    # beam search: 2 prompts x 2 beams, the beams of a prompt share its plan
    a, b = ["execute", "execute", "skip", "skip"], ["execute", "skip", "skip", "skip"]
    h.set_plan([a, a, b, b])
    ids = _ids((2, 6), seed=3)
    with torch.no_grad():
        beams = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
        h.sub_batch = False
        ref = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(beams, ref)
    h.detach()


def test_a_prefill_onto_a_cache_holding_a_prefix_pools_over_the_new_tokens():
    """A new cache object that already holds 5 tokens, a mask over prefix + new tokens: the routers pool over the
    4 new tokens (layer 0 reads embeddings, so its decisions are those of the new tokens alone)."""
    plain = tiny_model("llama")
    model = tiny_model("llama")
    ids, new = _ids((3, 5)), _ids((3, 4), seed=1)
    with torch.no_grad():
        prefix = plain(ids, use_cache=True).past_key_values  # made without Dr.LLM: new to the tracker
    h = retrofit.attach(model, "drllm", allow_repeat=False)  # no repeats: the prefix's slots suffice
    h.init_routers(seed=0)
    with torch.no_grad():
        model(new)
        alone = h.last_plans
        mask = torch.ones(3, 9, dtype=torch.long)
        out = model(new, attention_mask=mask, past_key_values=prefix).logits
        plans = h.last_plans
    assert len({p[0] for p in alone}) > 1  # the rows really get different layer-0 decisions
    assert [p[0] for p in plans] == [p[0] for p in alone]
    assert prefix.get_seq_length() == 9 and torch.isfinite(out).all()
    h.detach()


def test_plans_live_on_the_inputs_device_not_the_default_device():
    """torch's default device set elsewhere (here meta; cuda for a user with a CPU model): the runtime still
    makes its plans on the device of the inputs, with routers and without."""
    model = tiny_model("llama")
    ids = _ids((3, 5))
    with torch.no_grad():
        base = model(ids).logits
    h = retrofit.attach(model, "drllm")
    with torch.no_grad(), torch.device("meta"):
        out = model(ids).logits
    assert out.device.type == "cpu" and torch.equal(out, base)
    assert h.last_plans == [["execute"] * 4] * 3
    h.init_routers(seed=0)
    with torch.no_grad():
        ref = model(ids).logits
        want = h.last_plans
        with torch.device("meta"):
            out = model(ids).logits
    assert h.last_plans == want and torch.equal(out, ref)
    assert h.stats()["sequences"] == 9
    h.detach()
