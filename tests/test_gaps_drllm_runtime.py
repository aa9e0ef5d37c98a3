"""Dr.LLM runtime behaviour the older tests could not see (issue 15, mutations 6, 7 and 8).

* ``stats()`` counts the block passes that really ran (a repeat is two), checked against hooks that count the
  attention calls of every layer.
* Routers pool over the real tokens only: with routers that provably react to padding, a left-padded row gets
  the decisions of the same row unpadded, and its pooled features are those of the row alone.
* Every ``generate()`` (a new KV cache object) is a new request: the plan is decided again, also when nothing
  else (no plain ``model()`` call) happens in between.
"""

import pytest
import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.methods.drllm.router import RouterBank
from retrofit.testing import tiny_model

PASSES = {"skip": 0, "execute": 1, "repeat": 2}


def _count_attention_calls(model):
    """Forward hooks on each layer's self-attention: one call per block pass that runs."""
    counts = [0] * len(get_adapter(model).layers(model))
    hooks = []
    for i, layer in enumerate(get_adapter(model).layers(model)):
        def hook(m, a, o, i=i):
            counts[i] += 1
        hooks.append(layer.self_attn.register_forward_hook(hook))
    return counts, hooks


def test_stats_count_a_repeat_as_two_block_passes():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    plans = [["repeat", "skip", "repeat", "execute"], ["execute", "repeat", "skip", "skip"]]
    h.set_plan(plans)
    counts, hooks = _count_attention_calls(model)
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 9)))
    for x in hooks:
        x.remove()
    s = h.stats()
    # one call per block pass that any row runs (on the rows that run it): layer 0 twice, 1 twice, 2 twice, 3 once
    assert counts == [2, 2, 2, 1]
    per_row = [sum(PASSES[a] for a in p) for p in plans]  # 5 and 3 passes
    assert s["sequences"] == 2
    assert s["mean_layers_executed"] == sum(per_row) / 2 == 4.0
    assert s["layer_fraction"] == 1.0
    assert s["action_counts"] == [[0, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 0]]
    # one row alone: the counted passes equal what its stats say
    h.reset_stats()
    h.set_plan(plans[0])
    counts, hooks = _count_attention_calls(model)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 9)))
    for x in hooks:
        x.remove()
    assert h.stats()["mean_layers_executed"] == sum(counts) == 5.0
    assert h.stats()["layer_fraction"] == 1.25  # 5 block passes of 4 layers
    h.reset_stats()
    h.set_plan(plans[1])
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 9)))
    assert h.stats()["mean_layers_executed"] == 3.0 and h.stats()["layer_fraction"] == 0.75


def _pad_sensitive_routers(model, num_windows):
    """Routers that execute every layer on real tokens and skip as soon as a pad token enters a window mean.

    The pad embedding (id 0) is made a large vector ``10 u`` with ``u`` orthogonal to every real token's
    embedding; layer 0's router reads the window means along ``u`` (exactly 0 for real tokens, > 0 for any
    window holding a pad) and its skip logit is ``10 * gelu(.)`` against an execute bias 0.1. Every later
    router reads the same direction in its input hidden state. Returns the bank."""
    emb = model.get_input_embeddings().weight
    d = emb.shape[1]
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    with torch.no_grad():
        emb -= (emb @ u).unsqueeze(1) * u  # every token embedding orthogonal to u ...
        emb[0] = 10 * u  # ... except the pad token's
    bank = RouterBank(len(get_adapter(model).layers(model)), d, bottleneck=4)
    with torch.no_grad():
        for r in bank.router:
            r.fc1.weight.zero_()
            r.fc1.bias.zero_()
            r.fc2.weight.zero_()
            r.fc2.bias.copy_(torch.tensor([0.0, 0.1, -10.0]))
        r0 = bank.router[0]
        r0.fc1.weight[0] = u
        r0.fc2.weight[0, 0] = 10.0  # skip logit = 10 * gelu(means . u)
    return bank


def test_routers_ignore_left_padding_even_when_they_react_to_pads():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    bank = _pad_sensitive_routers(model, num_windows=4)
    h = retrofit.attach(model, "drllm", num_windows=4, bottleneck=4)
    h.routers = bank
    g = torch.Generator().manual_seed(2)
    short, long = torch.randint(3, 128, (1, 5), generator=g), torch.randint(3, 128, (1, 9), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        # the routers do react to pads: pooling row 0 over all 9 positions (no mask) skips layer 0
        model(ids[:1])
        assert h.last_plans[0][0] == "skip"
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        plans = h.last_plans
        alone = [model.generate(x, max_new_tokens=4, do_sample=False) for x in (short, long)]
        model(short)
        plan_short = h.last_plans[0]
    assert plan_short == ["execute"] * 4
    assert plans == [plan_short, ["execute"] * 4]
    assert torch.equal(batch[0, 4:], alone[0][0]) and torch.equal(batch[1], alone[1][0])
    # the pooled features of the padded row are those of the row alone (layer 0 reads embeddings: exact)
    f_pad, v_pad = h.collect_features(ids, attention_mask=mask)
    f_alone, v_alone = h.collect_features(short)
    assert torch.equal(v_pad[0], v_alone[0])
    torch.testing.assert_close(f_pad[0, 0], f_alone[0, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(f_pad[0], f_alone[0], rtol=1e-4, atol=1e-4)


def _greedy_nocache(model, ids, n):
    for _ in range(n):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_each_generate_call_is_a_new_request():
    """Back-to-back generate() calls (each makes a new cache; no model() call in between) each take the plan
    that holds when they start, and each counts its sequences once."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm")
    ids = torch.randint(3, 128, (2, 8))
    plan_a = ["execute", "skip", "repeat", "execute"]
    plan_b = [["skip", "repeat", "repeat", "skip"], ["execute"] * 4]
    with torch.no_grad():
        h.set_plan(plan_a)
        ref_a = _greedy_nocache(model, ids, 5)
        h.set_plan(plan_b)
        ref_b = _greedy_nocache(model, ids, 5)
        h.reset_stats()
        h.set_plan(plan_a)
        out_a = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert h.last_plans == [plan_a, plan_a]
        h.set_plan(plan_b)
        out_b = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert h.last_plans == plan_b
        h.set_plan(plan_a)
        out_a2 = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out_a, ref_a) and torch.equal(out_b, ref_b) and torch.equal(out_a2, ref_a)
    assert h.stats()["sequences"] == 6
    # routers: a second prompt of the same batch size is decided from its own tokens
    h.set_plan(None)
    h.init_routers(seed=3)
    other = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(other)
        want = h.last_plans
        model(ids)
        first = h.last_plans
        model.generate(ids, max_new_tokens=3, do_sample=False)
        model.generate(other, max_new_tokens=3, do_sample=False)
    assert want != first  # the two prompts get different plans from these routers
    assert h.last_plans == want


def test_sub_batch_pass_rows_by_hand():
    from retrofit.methods.drllm.runtime import _Pass

    real = torch.tensor([False, True, False, True, True, False])
    p = _Pass(real, (1, 3, 4), 6, (2, 4, 6))  # 3 rows run: padded to 4 with the first row that does not
    assert p.key == (1, 3, 4) and not p.full
    assert p.rows.tolist() == [0, 1, 3, 4] and p.kept.tolist() == [1, 3, 4]
    assert p.kept_mask.tolist() == [False, True, True, True] and p.sel.tolist() == [1, 2, 3]
    assert p.keep.shape == (6, 1, 1) and p.keep.flatten().tolist() == real.tolist()
    p = _Pass(real, (1, 3, 4), 6, (1, 2, 3, 4, 5, 6))  # exactly the rows
    assert p.rows.tolist() == [1, 3, 4] and p.sel is None and not p.full
    p = _Pass(torch.tensor([True, True, True, False]), (0, 1, 2), 4, (2, 4))  # padding reaches the whole batch
    assert p.full and p.rows.tolist() == [0, 1, 2, 3] and p.sel.tolist() == [0, 1, 2]
    p = _Pass(torch.tensor([True, False, True, True, True]), (0, 2, 3, 4), 5, (2, 4))
    assert not p.full and p.rows.tolist() == [0, 2, 3, 4] and p.sel is None


def test_config_changes_while_attached_are_checked_against_the_model():
    model = tiny_model("llama")
    L = model.config.num_hidden_layers
    h = retrofit.attach(model, "drllm", plan=["execute"] * L)
    with pytest.raises(ValueError, match=f"the plan has {L + 1} entries but the model has {L} decoder layers"):
        h.config.plan = ["execute"] * (L + 1)
    with pytest.raises(ValueError, match="plan entry 0 is 'repeat' but allow_repeat=False"):
        h.config.allow_repeat = False
        h.config.plan = ["repeat"] + ["execute"] * (L - 1)
    assert list(h.config.plan) == ["execute"] * L  # a refused change leaves the config as it was
    h.detach()
    h = retrofit.attach(model, "drllm", bottleneck=16)
    h.init_routers(seed=0)
    with pytest.raises(ValueError) as e:
        h.config.bottleneck = 8
    assert str(e.value) == "bottleneck is 16, fixed by the attached routers; attach routers of another width instead"
    h.config.skip_bias = 0.25  # a change that fits is applied
    assert h.config.skip_bias == 0.25 and h.config.bottleneck == 16
    s = h.stats()  # nothing run yet: every layer counted, nothing else
    assert s == {"num_layers": L, "sequences": 0, "mean_layers_executed": float(L), "layer_fraction": 1.0,
                 "action_counts": [[0, 0, 0]] * L}
    h.detach()


def test_router_decisions_are_the_same_with_autograd_on_and_never_build_a_graph():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    h = retrofit.attach(model, "drllm")
    h.init_routers(seed=2)
    h.config.skip_bias = 0.0  # these routers then skip, execute and repeat
    with torch.no_grad():
        ref = model(ids).logits
    counts_ref = h.stats()["action_counts"]
    out = model(ids).logits  # autograd on (as in a training loop around the frozen model)
    assert torch.equal(out, ref) and not out.requires_grad
    assert [[2 * x for x in row] for row in counts_ref] == h.stats()["action_counts"]
    assert len({a for row in counts_ref for a, n in enumerate(row) if n}) == 3  # the plans really mix actions
    h.detach()


def test_non_finite_hidden_states_name_the_rows_and_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[7] = float("nan")
    ids = torch.full((3, 5), 4)
    ids[1, 2] = 7  # only row 1 holds the poisoned token
    h = retrofit.attach(model, "drllm")
    h.init_routers(seed=0)
    with pytest.raises(FloatingPointError) as e, torch.no_grad():
        model(ids)
    assert str(e.value).startswith("Dr.LLM: the hidden states entering decoder layer 0 hold NaN or inf (batch rows "
                                   "[1]), so its router cannot decide; the base model overflowed")
    h.detach()


def test_per_row_plans_must_match_the_batch():
    model = tiny_model("llama")
    L = model.config.num_hidden_layers
    h = retrofit.attach(model, "drllm")
    h.set_plan([["execute"] * L, ["skip"] + ["execute"] * (L - 1)])
    with pytest.raises(ValueError) as e, torch.no_grad():
        model(torch.randint(3, 100, (3, 4)))
    assert str(e.value) == "set_plan() got 2 per-row plans but the batch has 3 rows"
    with torch.no_grad():  # the same plans on a batch of two run
        model(torch.randint(3, 100, (2, 4)))
    assert h.stats()["action_counts"][0] == [1, 1, 0]
    h.detach()


def test_plans_apply_to_positional_ids_and_to_inputs_embeds():
    model = tiny_model("qwen2")
    L = model.config.num_hidden_layers
    h = retrofit.attach(model, "drllm")
    plans = [["execute", "skip"] + ["execute"] * (L - 2), ["repeat"] + ["skip"] * (L - 1)]
    h.set_plan(plans)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        emb = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        inner = model.model(ids).last_hidden_state  # the decoder called with its ids positionally
        inner_kw = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb, ref)
    assert torch.equal(inner, inner_kw)
    h.set_plan(None)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, ref)  # the plans really changed the output
    # layer 0 over the five calls: row 0 executes in all, row 1 repeats in the four planned ones
    assert h.stats()["action_counts"][0] == [0, 6, 4]
    h.detach()


def test_batch_shaped_arguments_and_sub_batch_caches_by_hand():
    from transformers import DynamicCache, StaticCache

    from retrofit.methods.drllm.runtime import _batch_shaped, _sub_batch_cache

    t = torch.zeros(3, 5)
    assert _batch_shaped(t, 3) and _batch_shaped(torch.zeros(3), 3) and not _batch_shaped(t, 5)
    assert not _batch_shaped(torch.tensor(3.0), 3)  # a scalar has no batch axis
    assert _batch_shaped((None, [torch.zeros(2), t]), 3) and not _batch_shaped((torch.zeros(2),), 3)
    assert not _batch_shaped(3, 3) and not _batch_shaped(None, 3) and not _batch_shaped([], 3)
    model = tiny_model("llama")
    assert _sub_batch_cache(None) and not _sub_batch_cache(object())  # no cache; something without layers
    fresh = DynamicCache(config=model.config)
    assert _sub_batch_cache(fresh)  # empty dynamic layers fill themselves from their first keys
    with torch.no_grad():
        used = model(torch.randint(3, 100, (2, 4)), use_cache=True).past_key_values
    assert not _sub_batch_cache(used)  # already holds every row
    assert not _sub_batch_cache(StaticCache(config=model.config, max_cache_len=8))  # preallocated rows
