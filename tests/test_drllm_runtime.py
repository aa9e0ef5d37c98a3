"""Dr.LLM layer runtime invariants on tiny random models of every supported family."""

import pytest
import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.testing import ALL_FAMILIES, tiny_model

PASSES = {"skip": 0, "execute": 1, "repeat": 2}
PLAN_A = ["execute", "skip", "repeat", "execute"]
PLAN_B = ["skip", "repeat", "repeat", "skip"]


def reference_logits(model, ids, plan):
    """The plan's meaning, spelled out: run the blocks in plan order, no cache."""
    a = get_adapter(model)
    h, kw = a.prepare(model, ids)
    for layer, act in zip(a.layers(model), plan):
        for _ in range(PASSES[act]):
            h = a.call_layer(layer, h, kw)
    return a.head(model, h)


def greedy_nocache(model, ids, n):
    for _ in range(n):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def greedy_cached(model, ids, n):
    model.generation_config.eos_token_id = None  # compare full length, no early stop
    return model.generate(ids, max_new_tokens=n, do_sample=False)


def params_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_execute_everywhere_is_identity_and_detach_restores(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 11))
    before = params_snapshot(model)
    with torch.no_grad():
        base = model(ids).logits
        h = retrofit.attach(model, "drllm")
        assert torch.equal(model(ids).logits, base)  # untrained: execute everywhere, max abs diff 0
        h.set_plan(["execute"] * 4)
        assert torch.equal(model(ids).logits, base)
        h.set_plan(PLAN_A)
        assert not torch.allclose(model(ids).logits, base)  # the plan really changes the computation
        h.detach()
        assert torch.equal(model(ids).logits, base)
    after = params_snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(l).forward is l.forward.__func__ for l in get_adapter(model).layers(model))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_plan_matches_reference_and_cache_equals_recompute(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 10))
    h = retrofit.attach(model, "drllm")
    with torch.no_grad():
        for plan in (PLAN_A, PLAN_B):
            h.set_plan(plan)
            torch.testing.assert_close(model(ids).logits, reference_logits(model, ids, plan), rtol=1e-5, atol=1e-5)
            assert torch.equal(greedy_cached(model, ids, 6), greedy_nocache(model, ids, 6)), plan


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3", "glm_moe_dsa"])
def test_repeat_has_its_own_cache_slot_and_skip_writes_none(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (1, 7))
    h = retrofit.attach(model, "drllm")
    h.set_plan(["repeat", "skip", "repeat", "repeat"])  # 6 passes > 4 layers: the cache grows extra slots
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
    assert lengths[:6] == [7] * 6 and all(x == 0 for x in lengths[6:])
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), greedy_nocache(model, ids, 5))


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmoe", "mixtral", "deepseek_v3"])
def test_batch_with_different_plans_equals_each_alone(family):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, 128, (3, 9))
    plans = [PLAN_A, PLAN_B, ["execute"] * 4]
    h = retrofit.attach(model, "drllm")
    with torch.no_grad():
        h.set_plan(plans)
        batch_logits = model(ids).logits
        batch_gen = model.generate(ids, max_new_tokens=5, do_sample=False)
        for r, plan in enumerate(plans):
            h.set_plan(plan)
            torch.testing.assert_close(batch_logits[r:r + 1], model(ids[r:r + 1]).logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(batch_gen[r:r + 1], model.generate(ids[r:r + 1], max_new_tokens=5, do_sample=False))
    assert h.last_plans == [["execute"] * 4]


def test_left_padded_batch_matches_unpadded_rows():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm")
    torch.manual_seed(1)
    h.init_routers()  # random routers: decisions depend on the (unpadded) prompt only
    short, long = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 9))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (ids != 0).long()
    mask[1] = 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        plans = h.last_plans
        alone = [model.generate(x, max_new_tokens=4, do_sample=False) for x in (short, long)]
        alone_plans = [model.generate(x, max_new_tokens=1) is not None and h.last_plans[0] for x in (short, long)]
    assert plans == alone_plans
    assert torch.equal(batch[0, 4:], alone[0][0]) and torch.equal(batch[1], alone[1][0])


def test_routers_decide_at_prefill_and_keep_plan_while_decoding():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm")
    h.init_routers(seed=3)
    ids = torch.randint(3, 128, (2, 12))
    seen = []
    hook = model.register_forward_hook(lambda m, a, o: seen.append(h._plans.clone()))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
    hook.remove()
    assert len(seen) == 4 and all(torch.equal(s, seen[0]) for s in seen)  # one plan per sequence, all steps
    assert (seen[0] != 1).any()  # the random routers really decided something
    s = h.stats()
    assert s["sequences"] == 2 and sum(map(sum, s["action_counts"])) == 2 * 4
    # The skip bias is the budget knob: a large one skips every layer the routers decide.
    h.config.skip_bias = 1e4
    with torch.no_grad():
        model(ids)
    assert h.last_plans == [["skip"] * 4] * 2


def test_bad_plans_are_rejected_clearly():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    with pytest.raises(ValueError, match="4 decoder layers"):
        h.set_plan(["execute"] * 3)
    with pytest.raises(ValueError, match="must be one of"):
        h.set_plan(["execute", "jump", "skip", "skip"])
    with pytest.raises(TypeError, match="unknown option"):
        retrofit.attach(tiny_model("llama"), "drllm", windows=3)
    with pytest.raises(ValueError, match="num_windows"):
        retrofit.attach(tiny_model("llama"), "drllm", num_windows=0)
    with pytest.raises(RuntimeError, match="already attached"):
        retrofit.attach(model, "drllm")
