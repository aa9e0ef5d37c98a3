"""Dr.LLM layer wrapper, sub-batch gathering and cache slots: behaviour the older tests could not see.

* Extra cache slots for repeats: a lazily grown ``DynamicCache()`` (no config), a one-layer cache, and a cache of
  sliding-window layers (whose class needs arguments) all get working slots; decoding equals recomputation.
* The gathered layer arguments of a sub-batch follow each layer's own mask (hybrid sliding / full attention) and
  are made once per step for each set of rows and source.
* The wrapper keeps a forward already set on the layer instance, drops the extra value of a layer that returns
  ``(hidden, extra)`` without a passthrough, passes positional layer arguments on, runs the whole batch when a layer
  argument it cannot gather is batch-shaped, restores every attention module's ``layer_idx``, and names the layer
  reached before its route was known.
* GLM-MoE-DSA: rows that never ran a full indexer layer hand on -1 (no valid index) to the next layer.
"""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import retrofit
from retrofit.arch import get_adapter
from retrofit.testing import tiny_model


def _greedy_nocache(model, ids, n, mask=None):
    for _ in range(n):
        pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def _count_rows(model):
    """Batch size of every call of each layer's input norm (one call per block pass that runs)."""
    seen = [[] for _ in get_adapter(model).layers(model)]
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: seen[i].append(a[0].shape[0]))
             for i, layer in enumerate(get_adapter(model).layers(model))]
    return seen, hooks


# ---------------------------------------------------------------- extra cache slots (_ensure_slot)
def test_repeats_get_extra_slots_in_lazy_one_layer_and_sliding_window_caches():
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    # a lazily grown cache (DynamicCache() without a config: no layers yet, the cache appends them itself)
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    plans = [["repeat", "execute", "repeat", "skip"], ["execute", "repeat", "repeat", "execute"]]
    h.set_plan(plans)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        cache = DynamicCache()
        assert cache.layers == [] and cache.layer_class_to_replicate is DynamicLayer
        out = model(ids, past_key_values=cache, use_cache=True)
        assert torch.equal(out.logits, ref)
        assert len(cache.layers) == 7  # one slot per block pass that any row runs
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        full = model(torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    h.detach()
    # a one-layer model repeating its only layer: generate()'s cache has one layer, the second pass gets a new one
    model = tiny_model("llama", num_hidden_layers=1)
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm", plan=["repeat"])
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        assert len(cache.layers) == 1
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
        assert [type(x) for x in cache.layers] == [DynamicLayer, DynamicLayer]
        assert torch.equal(gen, _greedy_nocache(model, ids, 4))
        h.set_plan(["execute"])
        assert not torch.equal(gen, model.generate(ids, max_new_tokens=4, do_sample=False))  # the repeat matters
    h.detach()
    # sliding-window layers need an argument to be built: the extra slots are plain dynamic layers
    model = tiny_model("mistral", sliding_window=16)
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm")
    h.set_plan([["repeat", "skip", "repeat", "execute"], ["repeat", "execute", "execute", "repeat"]])
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
        assert [type(x) for x in cache.layers] == [DynamicSlidingWindowLayer] * 4 + [DynamicLayer] * 3
        assert torch.equal(gen, _greedy_nocache(model, ids, 4))
    h.detach()



# ---------------------------------------------------------------- sub-batch layer arguments (_gather)
def test_sub_batch_arguments_follow_each_layers_mask_and_are_gathered_once_per_step():
    """Qwen2 with sliding-window layers 2 and 3 (window 3) and full attention in layers 0 and 1: rows 0 and 1 run
    every layer, row 2 none, so every pass is the sub-batch (0, 1). Layers of one mask share one gathered copy of
    it (and of the positions and rotary embeddings); the sliding layers get their own, and the logits equal the
    all-rows path."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=2)
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([["execute"] * 4, ["execute"] * 4, ["skip"] * 4])
    ids = torch.randint(3, 128, (3, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, k: got.append(k), with_kwargs=True)
             for layer in model.model.layers]
    with torch.no_grad():
        sub = model(ids, attention_mask=mask, position_ids=pos).logits
        for hk in hooks:
            hk.remove()
        h.sub_batch = False
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        h.sub_batch = True
        wide = tiny_model("qwen2")  # the same weights without a sliding window: the window really matters here
        wide.load_state_dict(model.state_dict())
        no_window = wide(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(sub[real], ref[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref[:2][real[:2]], no_window[:2][real[:2]], atol=1e-3)
    assert len(got) == 4
    masks = [k["attention_mask"] for k in got]
    assert all(x.shape[0] == 2 for x in masks)
    assert masks[0] is masks[1] and masks[2] is masks[3]  # one gathered copy per mask in a step
    assert not torch.equal(masks[0], masks[2])  # ... and each layer gets the rows of its own mask
    for a, b in ((0, 1), (2, 3)):
        assert got[a]["position_embeddings"] is got[b]["position_embeddings"]
        assert got[a]["position_ids"] is got[b]["position_ids"]
    assert got[0]["position_embeddings"][0].shape[0] == 2 and got[0]["position_ids"].shape[0] == 2
    h.detach()


def test_take_rows_gathers_every_batch_shaped_tensor_and_passes_the_rest():
    from retrofit.methods.drllm.runtime import _take_rows

    rows = torch.tensor([0, 2])
    vec = torch.tensor([5, 6, 7])
    assert _take_rows(vec, rows, 3).tolist() == [5, 7]  # a 1-D tensor with the batch first: gathered
    scalar = torch.tensor(4.0)
    assert _take_rows(scalar, rows, 3) is scalar  # a scalar has no batch axis
    one = torch.zeros(1, 4)
    assert _take_rows(one, rows, 3) is one  # broadcast over the batch
    cos, sin = torch.arange(12.0).view(3, 4), torch.arange(3.0)
    got = _take_rows((cos, sin, None), rows, 3)
    assert isinstance(got, tuple) and got[2] is None
    assert torch.equal(got[0], cos[[0, 2]]) and got[1].tolist() == [0.0, 2.0]
    assert _take_rows(None, rows, 3) is None and _take_rows([vec], rows, 3)[0] is vec


# ---------------------------------------------------------------- the layer wrapper (_make_forward)
def test_a_forward_already_set_on_the_layer_instance_is_wrapped_not_bypassed():
    model = tiny_model("llama")
    layer = model.model.layers[1]
    base = type(layer).forward.__get__(layer)
    calls = []

    def shifted(hidden_states, *args, **kwargs):  # e.g. another tool's patch: shifts layer 1's output
        calls.append(hidden_states.shape[0])
        return base(hidden_states, *args, **kwargs) + 0.25

    layer.forward = shifted
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        h = retrofit.attach(model, "drllm", plan=["execute"] * 4)
        calls.clear()
        assert torch.equal(model(ids).logits, ref)
        assert calls == [2]
        h.set_plan([["execute", "repeat", "execute", "execute"], ["execute", "skip", "execute", "execute"]])
        h.sub_batch_multiple = 1
        calls.clear()
        model(ids)
        assert calls == [1, 1]  # both passes of row 0 through the instance's forward
    h.detach()
    assert layer.forward is shifted


def test_a_layer_returning_hidden_and_extra_without_passthrough_drops_the_extra():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(2))
    # layer 0: pass 0 on rows {0, 1}, pass 1 on row 0 (sub-batches); the others mixed too
    plans = [["repeat", "execute", "skip", "repeat"], ["execute", "skip", "repeat", "execute"],
             ["skip", "repeat", "execute", "skip"], ["skip", "execute", "execute", "repeat"]]
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan(plans)
    with torch.no_grad():
        ref = model(ids).logits
    h.detach()
    for layer in model.model.layers:
        base = type(layer).forward.__get__(layer)
        layer.forward = lambda x, *a, base=base, **k: (base(x, *a, **k), x[:, 0, 0] * 0 + 7)
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan(plans)
    seen, hooks = _count_rows(model)
    with torch.no_grad():
        out = model(ids).logits
    for hk in hooks:
        hk.remove()
    assert seen[0] == [2, 1]  # real sub-batches
    assert torch.equal(out, ref)
    h.detach()


class _Positional(torch.nn.Module):
    """Calls a Llama decoder layer with its arguments by position (as some decoders do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        return self.inner(hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                          position_embeddings, **kwargs)


def test_positional_layer_arguments_reach_the_block_and_run_the_whole_batch():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([["execute", "repeat", "skip", "execute"], ["execute", "skip", "repeat", "execute"],
                ["execute", "execute", "skip", "repeat"]])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        seen, hooks = _count_rows(model)
        layers = list(model.model.layers)
        for j, layer in enumerate(layers):
            model.model.layers[j] = _Positional(layer)
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        for hk in hooks:
            hk.remove()
        for j, layer in enumerate(layers):
            model.model.layers[j] = layer
    # layer 0: all rows; the others: every pass runs the whole batch (rows that skip it keep their input)
    assert seen == [[3], [3, 3], [3, 3], [3, 3]]
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    h.detach()


def test_an_unknown_batch_shaped_layer_argument_makes_every_pass_run_the_whole_batch():
    """A layer argument the runtime does not know how to gather (here ``row_tag``, handed through the model's
    kwargs to every layer) keeps the batch whole where it is batch-shaped: the block sees it aligned with its rows."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(6))
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([["execute", "repeat", "skip", "execute"], ["skip", "execute", "skip", "execute"],
                ["execute", "skip", "repeat", "skip"], ["execute", "execute", "execute", "execute"]])
    got = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, k: got.append((k["hidden_states"].shape[0], k["row_tag"].shape[0])), with_kwargs=True)
        for layer in model.model.layers]
    with torch.no_grad():
        ref = model(ids, row_tag=torch.zeros(5)).logits  # not batch-shaped: sub-batches as usual
        assert [r for r, _ in got] == [3, 3, 1, 2, 1, 3] and all(t == 5 for _, t in got)
        got.clear()
        out = model(ids, row_tag=torch.arange(4)).logits
    for hk in hooks:
        hk.remove()
    assert got == [(4, 4)] * 6
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    h.detach()


def test_layer_indices_are_restored_and_plain_calls_outside_the_decoder_work():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", plan=["repeat", "execute", "repeat", "skip"])
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        assert len(cache.layers) == 5
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
        # a plain block call outside the decoder (as the search does), arguments by position, with a cache
        layer = model.model.layers[2]
        x = torch.randn(2, 5, model.config.hidden_size)
        p = torch.arange(5).unsqueeze(0)
        emb = model.model.rotary_emb(x, p)
        mine, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
        got = layer(x, None, p, mine, True, emb)
        want = type(layer).forward(layer, x, None, p, theirs, True, emb)
    assert torch.equal(got, want)
    assert torch.equal(mine.layers[2].keys, theirs.layers[2].keys) and not mine.layers[0].is_initialized
    h.detach()


def test_a_layer_reached_before_its_route_is_known_is_named():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", plan=["execute"] * 4)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        h._request.routes[2] = None  # as if the decoder had run layer 2 outside the request's prefill
        with pytest.raises(RuntimeError) as e:
            model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert str(e.value) == ("Dr.LLM: decoder layer 2 was reached before its actions were known (the decoder did not "
                            "run its layers in order through their forwards)")
    h.detach()


# ---------------------------------------------------------------- GLM-MoE-DSA passthrough
def test_rows_that_never_ran_a_full_indexer_layer_hand_on_minus_one():
    """Row 1 skips full layer 0 (run by row 0 alone): layer 1 gets row 0's picks of layer 0 and -1 (no valid index)
    for row 1; a shared layer that reads such a row fails instead of using made-up picks."""
    model = tiny_model("glm_moe_dsa", indexer_types=["full", "full", "full", "shared"])
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([["execute"] * 4, ["skip", "execute", "execute", "execute"]])
    picks, handed = [], []
    hooks = [model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: picks.append(o[2])),
             model.model.layers[1].self_attn.register_forward_pre_hook(
                 lambda m, a, k: handed.append(k["prev_topk_indices"]), with_kwargs=True)]
    with torch.no_grad():
        model(ids)
    for hk in hooks:
        hk.remove()
    assert picks[0].shape[0] == 1 and handed[0].shape[0] == 2
    assert torch.equal(handed[0][0], picks[0][0])
    assert bool((handed[0][1] == -1).all())
    h.detach()
    model = tiny_model("glm_moe_dsa", indexer_types=["full", "shared", "full", "full"])
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([["execute"] * 4, ["skip", "execute", "execute", "execute"]])
    with pytest.raises(RuntimeError, match="index -1 is out of bounds"), torch.no_grad():
        model(ids)
    h.detach()
