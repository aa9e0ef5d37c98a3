"""Dr.LLM per-layer sub-batches (issue 16): a block pass runs only on the rows that need it.

Tiny random models of every supported family. Each test would fail with the feature broken:
* the rows a layer sees are counted (a hook on each layer's input norm): the sub-batch has exactly the rows
  that run the pass (or that many padded to an even count), a layer no row runs is never called, and each
  pass's cache slot holds just its rows;
* sub-batched logits equal the all-rows path (``handle.sub_batch = False``, the runtime before issue 16) with
  left padding, mixed skip / execute / repeat rows;
* cached greedy decoding equals step-by-step recomputation, and every row equals the row run alone.
"""

import pytest
import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.testing import ALL_FAMILIES, DSA_FAMILIES, tiny_model

# 4 rows x 4 layers: layer 0 runs rows {0, 2, 3} then row 3 again; layer 1 rows {1, 2} then row 1; layer 2 every
# row, then rows {0, 1}; layer 3 no row.
PLANS = [
    ["execute", "skip", "repeat", "skip"],
    ["skip", "repeat", "repeat", "skip"],
    ["execute", "execute", "execute", "skip"],
    ["repeat", "skip", "execute", "skip"],
]
# rows per block pass, by layer, and rows each cache slot holds (slots in execution order), for sub-batches
# of exactly the rows that run a pass (multiple 1) and padded to an even number of rows (multiple 2, the default:
# 3 of 4 rows -> the whole batch, 1 row -> 2)
ROWS_PER_PASS = {1: [[3, 1], [2, 1], [4, 2], []], 2: [[4, 2], [2, 2], [4, 2], []]}
SLOT_ROWS = {1: [3, 1, 2, 1, 4, 2], 2: [4, 2, 2, 2, 4, 2]}
LENGTHS = [9, 6, 9, 4]  # real tokens per row, left padded to 9


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = []
    for r, n in enumerate(LENGTHS):
        row = torch.randint(3, 128, (n,), generator=g)
        ids[r, T - n:] = row
        mask[r, T - n:] = 1
        rows.append(row.unsqueeze(0))
    return ids, mask, rows


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _count_rows(model):
    """Batch size of every call of each layer's input norm (one call per block pass that runs)."""
    seen = [[] for _ in get_adapter(model).layers(model)]
    hooks = []
    for i, layer in enumerate(get_adapter(model).layers(model)):
        hooks.append(layer.input_layernorm.register_forward_hook(
            lambda m, a, o, i=i: seen[i].append(a[0].shape[0])))
    return seen, hooks


def _greedy_nocache(model, ids, mask, n):
    for _ in range(n):
        logits = model(ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def _generate(model, ids, mask, n):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("multiple", [1, 2])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sub_batches_run_only_their_rows_and_match_the_all_rows_path(family, multiple):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    ids, mask, _ = _batch()
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = multiple
    h.set_plan(PLANS)
    seen, hooks = _count_rows(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
        for hk in hooks:
            hk.remove()
        assert seen == ROWS_PER_PASS[multiple]  # only a pass's (padded) rows go through it; layer 3 never runs
        cache = out.past_key_values
        assert [cache.layers[s].keys.shape[0] for s in range(len(SLOT_ROWS[multiple]))] == SLOT_ROWS[multiple]
        h.sub_batch = False  # the all-rows path (torch.where): same logits at every real token
        seen_all, hooks = _count_rows(model)
        ref = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        for hk in hooks:
            hk.remove()
        assert seen_all == [[4] * len(x) for x in ROWS_PER_PASS[1]]
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-5, atol=1e-5)
        h.sub_batch = True
        # cached decoding on the sub-batch caches equals recomputation without a cache
        seen, hooks = _count_rows(model)
        gen = _generate(model, ids, mask, 5)
        for hk in hooks:
            hk.remove()
        assert seen == [x * 5 for x in ROWS_PER_PASS[multiple]]  # prefill + 4 decode steps, same rows each step
        assert torch.equal(gen, _greedy_nocache(model, ids, mask, 5))
        h.sub_batch = False
        assert torch.equal(_generate(model, ids, mask, 5), gen)
    assert h.last_plans == PLANS


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sub_batched_rows_equal_each_row_alone(family):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    # DSA indexers keep the top-k key positions, pads included, so padding changes a row there: no padding
    lengths = [9] * 4 if family in DSA_FAMILIES else LENGTHS
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 128, (1, n), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.cat([torch.cat([torch.zeros(1, T - x.shape[1], dtype=torch.long), x], 1) for x in rows])
    mask = (torch.arange(T).unsqueeze(0) >= torch.tensor([T - n for n in lengths]).unsqueeze(1)).long()
    h = retrofit.attach(model, "drllm")
    with torch.no_grad():
        h.set_plan(PLANS)
        batch_logits = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        batch_gen = _generate(model, ids, mask, 5)
        for r, (plan, x) in enumerate(zip(PLANS, rows)):
            h.set_plan(plan)
            n = x.shape[1]
            torch.testing.assert_close(batch_logits[r, T - n:], model(x).logits[0], rtol=1e-4, atol=1e-4)
            assert torch.equal(batch_gen[r, T - n:], _generate(model, x, torch.ones_like(x), 5)[0]), r


def test_router_decisions_route_the_sub_batches():
    """Routers decide per row at prefill; each layer then runs on the rows its router sent through it."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm", bottleneck=8)
    h.sub_batch_multiple = 1  # exactly the rows each router sends through its layer
    h.init_routers(seed=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in h.routers.router:  # strong random routers: rows of one batch get different plans
            r.fc1.weight.normal_(0, 3.0, generator=g)
            r.fc2.weight.normal_(0, 3.0, generator=g)
    ids = torch.randint(3, 128, (6, 10), generator=g)
    seen, hooks = _count_rows(model)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    for hk in hooks:
        hk.remove()
    plans = h.last_plans
    passes = {"skip": 0, "execute": 1, "repeat": 2}
    want = [[n for n in (sum(passes[p[i]] > k for p in plans) for k in (0, 1)) if n] for i in range(4)]
    assert len({tuple(p) for p in plans}) > 1 and any(0 < x[0] < 6 for x in want)  # mixed rows really occur
    assert seen == [x * 3 for x in want]
    with torch.no_grad():
        for r in range(6):
            h.set_plan(plans[r])
            assert torch.equal(gen[r:r + 1], model.generate(ids[r:r + 1], max_new_tokens=3, do_sample=False))


def test_a_cache_with_preallocated_rows_takes_the_all_rows_path():
    """A static cache holds every row in every layer: the runtime runs the whole batch there (and stays right)."""
    from transformers import StaticCache

    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask, _ = _batch()
    h = retrofit.attach(model, "drllm")
    # mixed rows, at most one pass per layer: a static cache has no room for extra slots
    plans = [["execute", "skip", "execute", "execute"], ["skip", "execute", "execute", "execute"],
             ["execute", "execute", "skip", "execute"], ["execute", "skip", "skip", "execute"]]
    h.set_plan(plans)
    seen, hooks = _count_rows(model)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=16)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, past_key_values=cache)
    for hk in hooks:
        hk.remove()
    assert all(n == 4 for x in seen for n in x)
    with torch.no_grad():
        assert torch.equal(gen, _greedy_nocache(model, ids, mask, 4))


def test_beam_search_follows_the_sub_batch_caches():
    """Beam search reorders the cache rows at every step; each sub-batch slot maps the reorder onto its rows."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm", bottleneck=8)
    h.init_routers(seed=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in h.routers.router:
            r.fc1.weight.normal_(0, 3.0, generator=g)
            r.fc2.weight.normal_(0, 3.0, generator=g)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    seen, hooks = _count_rows(model)
    with torch.no_grad():
        beams = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False)
        for hk in hooks:
            hk.remove()
        plans = h.last_plans
        assert len({tuple(p) for p in plans}) > 1 and any(0 < x[0] < 9 for x in seen)  # real sub-batches
        h.sub_batch = False
        assert torch.equal(model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False), beams)
        h.sub_batch = True
        cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(RuntimeError, match="sub_batch = False"):  # other decoding modes' batch edits: refused
        cache.batch_select_indices(torch.tensor([0]))


def test_sub_batch_cache_edits_are_mapped_or_refused_by_name():
    """reorder_cache maps each slot's rows (a row may take the history of a row with the same passes) and
    refuses a move onto a row with another plan; the other batch edits and a bad multiple are refused."""
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    # layer 1: rows 0 and 2 only; every other layer: all rows
    h.set_plan([["execute"] * 4, ["execute", "skip", "execute", "execute"], ["execute"] * 4])
    h.sub_batch_multiple = 1
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    keys = [layer.keys.clone() for layer in cache.layers]
    assert [k.shape[0] for k in keys] == [3, 2, 3, 3]  # slot 1 holds rows 0 and 2 only
    cache.reorder_cache(torch.tensor([0, 0, 2]))  # row 1 takes row 0's history: it never ran layer 1
    assert torch.equal(cache.layers[0].keys[1], keys[0][0]) and torch.equal(cache.layers[1].keys, keys[1])
    with pytest.raises(RuntimeError) as e:
        cache.reorder_cache(torch.tensor([1, 1, 2]))  # row 0 would need row 1's layer-1 history: there is none
    assert str(e.value) == ("Dr.LLM: beam search moved a sequence onto a row with another plan; the per-layer "
                            "sub-batch cache cannot follow that (set handle.sub_batch = False)")
    for edit in (lambda: cache.batch_select_indices(torch.tensor([0])), lambda: cache.batch_repeat_interleave(2)):
        with pytest.raises(RuntimeError) as e:
            edit()
        assert str(e.value) == ("Dr.LLM: this decoding mode edits the KV cache's batch, whose layers hold per-layer "
                                "sub-batches here; set handle.sub_batch = False for it")
    with torch.no_grad():
        want = model(ids).logits
    for bad in (0, True, 1.5):
        h.sub_batch_multiple = bad
        with pytest.raises(ValueError) as e, torch.no_grad():
            model(ids)
        assert str(e.value) == f"sub_batch_multiple must be a positive integer, got {bad!r}"
        # the refused forward left no step behind: a layer called on its own (as the plan search does) is the
        # plain block, and the next good forward is a new request
        hid = torch.randn(1, 5, model.config.hidden_size)
        pos = torch.arange(5)[None]
        emb = model.model.rotary_emb(hid, pos)
        with torch.no_grad():
            assert torch.equal(model.model.layers[1](hid, position_embeddings=emb),
                               type(model.model.layers[1]).forward(model.model.layers[1], hid,
                                                                   position_embeddings=emb))
    h.sub_batch_multiple = 1
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    h.detach()


@pytest.mark.parametrize("multiple", [1, 2])
def test_shared_dsa_indexers_get_the_last_executed_full_layers_picks_per_row(multiple):
    """GLM-MoE-DSA's 'shared' layers reuse the previous full layer's top-k (handed on as prev_topk_indices): a row
    that skips a full layer hands on the picks of the last full layer it ran, in a sub-batch as when run alone."""
    model = tiny_model("glm_moe_dsa", indexer_types=["full", "shared", "full", "shared"])
    assert model.model.layers[1].self_attn.indexer is None  # really shared
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 128, (1, 9), generator=g) for _ in range(4)]
    ids = torch.cat(rows)
    # row 0 runs everything; row 1 skips full layer 2 (layer 3 reuses layer 0's picks); row 2 skips layers 0, 1;
    # row 3 repeats full layer 2 (its second pass re-picks)
    plans = [["execute"] * 4, ["execute", "execute", "skip", "execute"], ["skip", "skip", "execute", "execute"],
             ["execute", "execute", "repeat", "execute"]]
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = multiple  # 1: layer 1 runs rows {0, 1, 3} alone; 2: padded to the whole batch
    with torch.no_grad():
        h.set_plan(plans)
        sub = model(ids).logits
        h.sub_batch = False
        ref = model(ids).logits
        h.sub_batch = True
        torch.testing.assert_close(sub, ref, rtol=1e-5, atol=1e-5)
        for r, (plan, x) in enumerate(zip(plans, rows)):
            h.set_plan(plan)
            torch.testing.assert_close(sub[r], model(x).logits[0], rtol=1e-4, atol=1e-4)
    h.detach()


def test_sub_batch_sizes_pad_each_pass_to_the_smallest_allowed_size():
    """sub_batch_sizes (3,): a pass of 1 or 2 rows runs on 3 rows, of 3 on 3, of 4 on the whole batch; the logits
    at the real tokens equal the exact-rows path. Bad sizes are refused before any state is set."""
    model = tiny_model("llama")
    ids, mask, _ = _batch()
    h = retrofit.attach(model, "drllm")
    h.set_plan(PLANS)
    with torch.no_grad():
        h.sub_batch_multiple = 1
        ref = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        h.sub_batch_sizes = (3,)
        seen, hooks = _count_rows(model)
        got = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        for hk in hooks:
            hk.remove()
    assert seen == [[3, 3], [3, 3], [4, 3], []]  # ROWS_PER_PASS[1] = [[3, 1], [2, 1], [4, 2], []] padded to 3
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    for bad in ((3, 2), (0,), [4], (), (2.0,)):
        h.sub_batch_sizes = bad
        with pytest.raises(ValueError, match="sub_batch_sizes"):
            model(ids, attention_mask=mask)
    h.detach()


def test_calibrate_sub_batches_keeps_the_sizes_no_larger_size_undercuts():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    res = h.calibrate_sub_batches(6, context=8, calls=3)
    cost, sizes = res["cost_by_rows"], res["sizes"]
    assert sorted(cost) == [1, 2, 3, 4, 5, 6] and all(v > 0 for v in cost.values())
    assert h.sub_batch_sizes == sizes and sizes[-1] == 6  # the full batch is always a size
    for k in range(1, 7):  # kept <=> cheaper than every larger size
        assert (k in sizes) == all(cost[k] < cost[m] for m in range(k + 1, 7))
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        h.calibrate_sub_batches(0)
    h.detach()
