import pytest
import torch

from retrofit.arch import get_adapter
from retrofit.arch.gates import GateHook
from retrofit.testing import DSA_FAMILIES, MOE_FAMILIES, tiny_model

FAMILIES = MOE_FAMILIES + DSA_FAMILIES


def _ids(B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (B, T), generator=g)


# every family as built, plus the branches their tiny configs leave off: renormalised top-k weights on a softmax
# gate (Qwen2-MoE with norm_topk_prob), and a bfloat16 model (the softmax runs in float32, weights come back in bf16)
_VARIANTS = [(f, {}) for f in FAMILIES] + [("qwen2_moe", {"norm_topk_prob": True}),
                                           ("olmoe", {"dtype": torch.bfloat16}), ("mixtral", {"dtype": torch.bfloat16})]


@pytest.mark.parametrize("family, kw", _VARIANTS, ids=[f + "".join(f"-{k}" for k in kw) for f, kw in _VARIANTS])
def test_zero_offset_bit_identical_and_removal(family, kw):
    model = tiny_model(family, **kw)
    ids = _ids()
    gates = get_adapter(model).moe_gates(model)
    g = torch.Generator().manual_seed(0)
    for gate in gates.values():  # DeepSeek-style load-balancing biases are zero at init: make them matter
        if getattr(gate, "e_score_correction_bias", None) is not None:
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g))
    x = torch.randn(14, model.config.hidden_size, dtype=model.dtype)
    with torch.no_grad():
        ref = model(ids).logits
        ref_gate = [g(x) for g in gates.values()]
    hook = GateHook.install(model)
    assert all("forward" in g.__dict__ for g in gates.values())
    with torch.no_grad():
        out_none = model(ids).logits
        for l in hook.layers:
            hook.set_offset(l, torch.zeros(hook.num_experts(l)))
        out_zero = model(ids).logits
        hook.clear()
        for l in hook.layers:
            hook.set_offset(l, torch.zeros(2, hook.num_experts(l)))
        out_zero_b = model(ids).logits
        hook.clear()
        gate_hooked = [g(x) for g in gates.values()]
    assert torch.equal(out_none, ref) and torch.equal(out_zero, ref) and torch.equal(out_zero_b, ref)
    for a, b in zip(ref_gate, gate_hooked):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb) and ta.dtype == tb.dtype
    hook.release()
    assert not any("forward" in g.__dict__ or "_retrofit_gate" in g.__dict__ for g in gates.values())
    assert not hasattr(model, "_retrofit_gate_hook")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_offset_changes_selection_and_recording(family):
    model = tiny_model(family)
    hook = GateHook.install(model)
    E, k = hook.num_experts(), hook.top_k()
    ids = _ids(B=1, T=6)
    with torch.no_grad(), hook.recording() as rec:
        base = model(ids).logits
    layer = hook.layers[-1]
    assert rec.indices[layer][0].shape == (6, k)
    assert rec.scores[layer][0].shape == (6, E)
    # force experts {E-1, E-2, ...}: a huge offset on the last k experts must put exactly them in the top-k
    off = torch.zeros(E)
    forced = list(range(E - k, E))
    off[forced] = 1e4 if hook.scoring != "sigmoid_grouped" else 50.0
    if hook.scoring == "sigmoid_grouped":
        # grouped top-k: forced experts must sit in the selected group(s); last group holds the last E/n_group
        assert k <= E // model.config.n_group
    hook.set_offset(layer, off)
    with torch.no_grad(), hook.recording() as rec2:
        steered = model(ids).logits
    sel = rec2.indices[layer][0].sort(-1).values
    assert (sel == torch.tensor(forced)).all()
    assert not torch.equal(steered, base)
    # callable offset: identity callable gives identical output; another layer's record is unchanged
    hook.set_offset(layer, lambda z: z)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    hook.release()


def test_per_sequence_offset_only_touches_its_row():
    model = tiny_model("olmoe")
    hook = GateHook.install(model)
    ids = _ids(B=2, T=5)
    with torch.no_grad():
        base = model(ids).logits
        off = torch.zeros(2, hook.num_experts())
        off[1] = torch.randn(hook.num_experts()) * 5
        for l in hook.layers:
            hook.set_offset(l, off)
        out = model(ids).logits
    # row 0 is unchanged up to float summation order (its tokens share expert matmuls with row 1's)
    torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-5)
    assert (out[1] - base[1]).abs().max() > 1e-2
    hook.release()


def test_offsets_are_differentiable():
    model = tiny_model("mixtral")
    hook = GateHook.install(model)
    delta = torch.zeros(hook.num_experts(), requires_grad=True)
    hook.set_offset(hook.layers[1], delta)
    loss = model(_ids(), labels=_ids()).loss
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    hook.release()
    # It is the loss's gradient: central differences per expert agree, on a Mixtral that routes every expert
    # (top-k = E: the small steps flip no selection). Mixtral renormalises the softmax over the chosen experts,
    # so a shift of all offsets changes nothing: the gradient sums to 0.
    model = tiny_model("mixtral", num_experts_per_tok=8)
    hook = GateHook.install(model)
    layer, E = hook.layers[1], hook.num_experts()
    delta = torch.zeros(E, requires_grad=True)
    hook.set_offset(layer, delta)
    (grad,) = torch.autograd.grad(model(_ids(), labels=_ids()).loss, delta)
    fd = torch.zeros(E)
    with torch.no_grad():
        for e in range(E):
            losses = []
            for s in (0.05, -0.05):  # smooth in the offsets: central differences are O(step^2)
                hook.set_offset(layer, torch.zeros(E).index_fill(0, torch.tensor([e]), s))
                losses.append(model(_ids(), labels=_ids()).loss.item())
            fd[e] = (losses[0] - losses[1]) / 0.1
    hook.release()
    scale = float(grad.abs().max())  # measured 9.1e-4; central differences within 0.7 % of it
    assert scale > 1e-4
    torch.testing.assert_close(fd, grad, rtol=0, atol=0.03 * scale)
    assert abs(float(grad.sum())) < 1e-3 * scale


def test_shared_hook_reference_counted_and_owners():
    model = tiny_model("qwen2_moe")
    h1 = GateHook.install(model)
    h2 = GateHook.install(model)
    assert h1 is h2
    h1.set_offset(0, torch.ones(8), owner="a")
    h1.set_offset(0, lambda z: z * 2, owner="b")
    z = torch.zeros(3, 8)
    assert torch.equal(h1._offset(0, z), torch.full((3, 8), 2.0))
    h1.clear("a")
    assert torch.equal(h1._offset(0, z), z)
    h1.release()
    assert "forward" in h1.gates[0].__dict__
    h2.release()
    assert "forward" not in h1.gates[0].__dict__


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no MoE gates"):
        GateHook.install(tiny_model("llama"))
    model = tiny_model("olmoe")
    hook = GateHook.install(model)
    with pytest.raises(ValueError, match=r"shape \[8\] or \[batch, 8\]"):
        hook.set_offset(0, torch.zeros(7))
    with pytest.raises(KeyError, match="MoE layers"):
        hook.set_offset(99, torch.zeros(8))
    hook.set_offset(0, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        model(_ids(B=2, T=7))
    hook.release()


def test_recording_concatenates_each_layers_calls_along_tokens():
    model = tiny_model("qwen2_moe")
    hook = GateHook.install(model)
    E, k = hook.num_experts(), hook.top_k()
    with torch.no_grad(), hook.recording() as rec:
        model(_ids(B=1, T=4, seed=1))
        model(_ids(B=2, T=3, seed=2))
    assert sorted(rec.indices) == hook.layers
    for what, width in (("indices", k), ("weights", k), ("scores", E), ("logits", E)):
        cat = rec.cat(what)
        assert sorted(cat) == hook.layers
        for l, t in cat.items():
            parts = getattr(rec, what)[l]
            assert [p.shape[0] for p in parts] == [4, 6] and t.shape == (10, width)
            assert torch.equal(t, torch.cat(parts, 0)) and t.device.type == "cpu"
    assert torch.equal(rec.cat()[hook.layers[0]], rec.cat("indices")[hook.layers[0]])  # indices by default
    hook.release()


def test_gate_hook_errors_name_the_model_and_the_fix():
    dense = tiny_model("llama")
    with pytest.raises(ValueError) as e:
        GateHook.install(dense)
    assert str(e.value) == ("LlamaForCausalLM (llama) has no MoE gates; the gate hook needs an MoE model (e.g. "
                            "OLMoE, Qwen2-MoE, Mixtral, DeepSeek-V3, or `retrofit moefy`'s).")
    model = tiny_model("olmoe")
    hook = GateHook.install(model)
    with pytest.raises(TypeError) as e:
        hook.set_offset(hook.layers[0], "x")
    assert str(e.value) == "offset must be a tensor, a callable or None, not str"
    hook.set_offset(hook.layers[0], torch.zeros(3, hook.num_experts()))  # per sequence, for 3 sequences
    with pytest.raises(ValueError) as e, torch.no_grad():
        model(_ids(B=2, T=4))
    assert str(e.value) == ("per-sequence offset has batch 3 but the gate got 8 token rows (not a multiple): set the "
                            "offset for the batch being run")
    hook.release()
