import pytest
import torch

import retrofit
from retrofit.methods.reroute import RerouteConfig, router_confidence, select_layers
from retrofit.testing import MOE_FAMILIES, tiny_model


def _ids(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (B, T), generator=g)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same_params(model, ref):
    return all(torch.equal(p, ref[n]) for n, p in model.named_parameters())


def _row_loss(model, ids):
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="none").view(ids.shape[0], -1).mean(1)


def test_config_validation():
    with pytest.raises(ValueError):
        RerouteConfig(steps=-1)
    with pytest.raises(ValueError):
        RerouteConfig(layer_order="middle")
    with pytest.raises(ValueError):
        RerouteConfig(kv_cache="drop")
    with pytest.raises(ValueError):
        RerouteConfig(lr=0)
    with pytest.raises(TypeError):
        retrofit.attach(tiny_model("olmoe"), "reroute", stepz=3)
    with pytest.raises(ValueError, match="not MoE layers"):
        retrofit.attach(tiny_model("deepseek_v3"), "reroute", layers=[0])  # layer 0 is dense there


def test_confidence_and_selection_by_hand():
    # two tokens of one sequence, 3 experts, top-1
    scores = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    idx = torch.tensor([[0], [1]])
    c = router_confidence(scores, idx, torch.ones(1, 2, dtype=torch.bool), "softmax")
    torch.testing.assert_close(c, torch.tensor([(-torch.tensor(0.5).log() - torch.tensor(0.8).log()) / 2]))
    # padding masked
    c2 = router_confidence(scores, idx, torch.tensor([[False, True]]), "softmax")
    torch.testing.assert_close(c2, -torch.tensor([0.8]).log())
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 0.0]])
    assert select_layers(conf, 2, "least_confident").tolist() == [[0, 1, 1, 0], [1, 0, 1, 0]]
    assert select_layers(conf, 2, "most_confident").tolist() == [[1, 0, 0, 1], [0, 1, 0, 1]]
    assert select_layers(conf, None, "most_confident").sum() == 8


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_steps0_identity_and_detach_exact(family):
    model = tiny_model(family)
    ids = _ids()
    ref = _params(model)
    with torch.no_grad():
        base = model(ids).logits
    h = retrofit.attach(model, "reroute", steps=0)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.equal(out, base)
    h.detach()
    h = retrofit.attach(model, "reroute", steps=3, num_layers=2)
    with torch.no_grad():
        adapted = model(ids).logits
    assert not torch.equal(adapted, base)
    assert all(p.grad is None for p in model.parameters())
    h.detach()
    assert not hasattr(model, "_retrofit_gate_hook")
    assert _same_params(model, ref)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_adaptation_lowers_prompt_loss(family):
    model = tiny_model(family)
    ids = _ids(B=2, T=16, seed=3)
    base = _row_loss(model, ids)
    h = retrofit.attach(model, "reroute", steps=10, lr=0.05)
    h.adapt(ids)
    with h.frozen():
        after = _row_loss(model, ids)
    assert (after < base).all(), (base, after)
    st = h.stats()
    assert st["adaptations"] == 1 and st["steps"] == 10 and st["time_s"] > 0
    assert len(st["last"]["step_losses"]) == 2 and len(st["last"]["step_losses"][0]) == 10
    assert all(len(r) == len(h.moe_layers) for r in st["last"]["chosen_layers"])
    h.detach()


def _left_padded(a, b):
    """A batch of the one-row prompts a and b (b shorter), b left-padded; and its attention mask."""
    T = a.shape[1]
    batch = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, T - b.shape[1]:], mask[1, T - b.shape[1]:] = b[0], 1
    return batch, mask


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("order", ["least_confident", "most_confident"])
def test_batch_rows_adapt_independently(family, order):
    model = tiny_model(family)
    a, b = _ids(B=1, T=10, seed=5), _ids(B=1, T=7, seed=6)
    batch, mask = _left_padded(a, b)
    h = retrofit.attach(model, "reroute", steps=4, num_layers=2, layer_order=order)
    h.adapt(batch, mask)
    d_batch, m_batch = h.delta.clone(), h.layer_mask.clone()
    sel_batch = h.stats()["last"]["chosen_layers"]
    alone = []
    for x in (a, b):
        h.adapt(x)
        alone.append((h.delta.clone(), h.layer_mask.clone(), h.stats()["last"]["chosen_layers"][0]))
    for r in range(2):
        assert sel_batch[r] == alone[r][2]
        assert torch.equal(m_batch[r], alone[r][1][0])
        torch.testing.assert_close(d_batch[r], alone[r][0][0], atol=2e-3, rtol=0)
    h.detach()


def test_state_does_not_leak_between_calls():
    model = tiny_model("olmoe")
    a, b = _ids(B=1, T=12, seed=7), _ids(B=1, T=12, seed=8)
    h = retrofit.attach(model, "reroute", steps=3)
    with torch.no_grad():
        out_b_fresh = model(b).logits  # b adapted from zero
        model(a)  # another request in between
        out_b_again = model(b).logits
    assert torch.equal(out_b_fresh, out_b_again)
    # two generate calls on the same prompt give the same result (deltas restart at zero)
    g1 = model.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=0)
    g2 = model.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)
    assert h.stats()["requests"] == 5
    h.reset()
    assert h.delta is None and not h.hook._offsets.get("reroute")
    h.detach()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_generate_readapts_at_interval(family):
    model = tiny_model(family)
    ids = _ids(B=2, T=8, seed=9)
    ref = _params(model)
    h = retrofit.attach(model, "reroute", steps=2, interval=4)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 18)
    st = h.stats()
    # prefill + re-adaptations when 4 and 8 new tokens have been fed back
    assert st["adaptations"] == 3 and st["requests"] == 1
    assert st["last"]["tokens"] == 8 + 9
    assert _same_params(model, ref) and all(p.grad is None for p in model.parameters())
    h.detach()
    h = retrofit.attach(model, "reroute", steps=2, interval=0)
    model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert h.stats()["adaptations"] == 1
    h.detach()


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
def test_kv_cache_recompute_matches_uncached(family):
    """After the last re-adaptation, 'recompute' makes the cached logits equal a fresh forward with the final
    deltas; 'keep' does not (old entries were written under the old routing)."""
    model = tiny_model(family)
    ids = _ids(B=1, T=8, seed=11)
    res = {}
    for kv in ("recompute", "keep"):
        h = retrofit.attach(model, "reroute", steps=3, lr=0.5, interval=3, kv_cache=kv)
        g = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
        # the last adaptation ran on the forward fed with new token 3; the step fed with new token 4 made logits[-1]
        full = g.sequences[:, :-1]
        with h.frozen(), torch.no_grad():
            ref = model(full, use_cache=False).logits[:, -1]
        res[kv] = (g.logits[-1] - ref).abs().max().item()
        assert h.stats()["cache_recomputations"] == (1 if kv == "recompute" else 0)
        h.detach()
    assert res["recompute"] < 1e-4
    assert res["keep"] > 1e-4


def test_explicit_layers():
    model = tiny_model("qwen3_moe")
    h = retrofit.attach(model, "reroute", steps=2, layers=[1, 3])
    h.adapt(_ids(B=2))
    assert h.stats()["last"]["chosen_layers"] == [[1, 3], [1, 3]]
    assert set(h.hook._offsets["reroute"]) == {1, 3}
    h.detach()


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_generate_left_padded_batch_equals_rows_alone(family):
    model = tiny_model(family)
    a, b = _ids(B=1, T=9, seed=12), _ids(B=1, T=6, seed=13)
    batch, mask = _left_padded(a, b)
    h = retrofit.attach(model, "reroute", steps=3, interval=3, num_layers=2)
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    g = model.generate(batch, attention_mask=mask, **kw)
    d_batch = h.delta.clone()
    assert h.stats()["adaptations"] == 3
    for r, x in enumerate((a, b)):
        g1 = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        assert torch.equal(g[r, -7:], g1[0, -7:])
        torch.testing.assert_close(d_batch[r], h.delta[0], atol=2e-3, rtol=0)
    h.detach()
