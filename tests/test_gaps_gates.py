"""Gate-hook gaps (retrofit/arch/gates.py): the install errors name the model, where it looked and what a gate lacks;
per-layer expert counts and top-k on a model whose MoE layers differ; offsets of several owners compose in order
and ``clear`` removes only its owner's; a tensor offset is added even when its type is callable; the hooked
softmax gate forward warns about nothing."""

import warnings

import pytest
import torch
from torch import nn

from retrofit.arch import get_adapter
from retrofit.arch.gates import GateHook
from retrofit.testing import tiny_model


def _unpatched(model):
    gates = get_adapter(model).moe_gates(model).values()
    return not hasattr(model, "_retrofit_gate_hook") and not any(
        "forward" in g.__dict__ or "_retrofit_gate" in g.__dict__ for g in gates)


@pytest.mark.parametrize("family, kw, name", [
    ("qwen2_moe", {"mlp_only_layers": [0, 1, 2, 3]}, "Qwen2MoeForCausalLM"),
    ("deepseek_v3", {"first_k_dense_replace": 4}, "DeepseekV3ForCausalLM"),
])
def test_moe_family_with_only_dense_layers_error_names_model_and_path(family, kw, name):
    """An MoE family whose every decoder layer is dense (Qwen2-MoE's ``mlp_only_layers``, DeepSeek's
    ``first_k_dense_replace``): the error names the model class and the attribute path searched."""
    model = tiny_model(family, **kw)
    with pytest.raises(ValueError) as e:
        GateHook.install(model)
    assert str(e.value) == f"{name}: no MoE gates found at layer.mlp.gate"
    assert not hasattr(model, "_retrofit_gate_hook")


def test_gate_of_another_transformers_version_is_refused_naming_what_it_lacks():
    """A gate that is not the router this retrofit re-implements (a plain ``nn.Linear``, as in transformers 4.x,
    or a router without one attribute) is refused before any gate is patched, naming the layer, the gate's class,
    the missing attributes and the scoring."""
    model = tiny_model("olmoe")
    model.model.layers[1].mlp.gate = nn.Linear(64, 8, bias=False)
    with pytest.raises(ValueError) as e:
        GateHook.install(model)
    assert str(e.value) == ("gate of layer 1 (Linear) lacks ['top_k', 'num_experts', 'norm_topk_prob', 'hidden_dim']: "
                            "its forward is not the 'softmax' router this retrofit knows; update the adapter for this "
                            "version.")
    assert _unpatched(model)

    model = tiny_model("mixtral")
    del model.model.layers[2].mlp.gate.hidden_dim
    with pytest.raises(ValueError) as e:
        GateHook.install(model)
    assert str(e.value) == ("gate of layer 2 (MixtralTopKRouter) lacks ['hidden_dim']: its forward is not the "
                            "'softmax_renorm' router this retrofit knows; update the adapter for this version.")
    assert _unpatched(model)


def test_per_layer_expert_count_and_top_k_on_a_heterogeneous_moe():
    """Qwen2-MoE whose first MoE layer has 4 experts / top-3 (the others 8 / top-2): ``num_experts`` and
    ``top_k`` answer per layer and default to the first MoE layer; offsets are checked against their own layer's
    expert count and steer that layer's choice."""
    model = tiny_model("qwen2_moe")
    model.model.layers[0].mlp = tiny_model("qwen2_moe", num_experts=4, num_experts_per_tok=3).model.layers[0].mlp
    hook = GateHook.install(model)
    try:
        assert hook.layers == [0, 1, 2, 3]
        assert (hook.num_experts(), hook.top_k()) == (4, 3)
        assert (hook.num_experts(0), hook.top_k(0)) == (4, 3)
        assert [(hook.num_experts(l), hook.top_k(l)) for l in (1, 2, 3)] == [(8, 2)] * 3
        with pytest.raises(ValueError) as e:
            hook.set_offset(2, torch.zeros(4))
        assert str(e.value) == "offset for layer 2 must have shape [8] or [batch, 8], got (4,)"
        with pytest.raises(ValueError) as e:
            hook.set_offset(0, torch.zeros(2, 8))
        assert str(e.value) == "offset for layer 0 must have shape [4] or [batch, 4], got (2, 8)"
        hook.set_offset(0, torch.tensor([1e4, 0.0, 1e4, 1e4]))
        hook.set_offset(2, torch.zeros(8).index_fill(0, torch.tensor([3, 5]), 1e4))
        hook.set_offset(3, torch.zeros(1, 8))
        ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), hook.recording() as rec:
            model(ids)
        assert rec.indices[0][0].shape == (10, 3) and rec.indices[1][0].shape == (10, 2)
        assert (rec.indices[0][0].sort(-1).values == torch.tensor([0, 2, 3])).all()
        assert (rec.indices[2][0].sort(-1).values == torch.tensor([3, 5])).all()
    finally:
        hook.release()
    assert _unpatched(model)


class _CallableTensor(torch.Tensor):
    """A tensor type that also happens to be callable: an offset of it is still a tensor offset."""

    def __call__(self, z):
        return torch.zeros_like(z)


def test_offsets_of_owners_compose_in_order_and_clear_removes_only_its_owner():
    model = tiny_model("olmoe")
    gates = get_adapter(model).moe_gates(model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = {l: gates[l](x) for l in (0, 1)}  # the unhooked (logits, weights, indices)
    a = torch.linspace(-1.0, 1.0, 8)
    b = torch.zeros(8).index_fill(0, torch.tensor([6, 7]), 1e4)
    c = torch.arange(8.0)
    hook = GateHook.install(model)

    def logits(l):
        with torch.no_grad():
            return gates[l](x)[0].as_subclass(torch.Tensor)

    try:
        # the default owner: set_offset and clear() agree on it
        hook.set_offset(0, a)
        assert torch.equal(logits(0), ref[0][0] + a)
        hook.clear()
        assert torch.equal(logits(0), ref[0][0]) and torch.equal(logits(1), ref[1][0])
        hook.set_offset(0, a, owner="default")
        hook.set_offset(0, None)
        assert torch.equal(logits(0), ref[0][0])
        # owner "a" maps layer 0's logits, owner "b" then adds to layers 0 and 1 (layer 1 has nothing from "a")
        hook.set_offset(0, lambda z: z * 2, owner="a")
        hook.set_offset(0, b, owner="b")
        hook.set_offset(1, c, owner="b")
        assert torch.equal(logits(0), ref[0][0] * 2 + b)
        assert torch.equal(logits(1), ref[1][0] + c)
        with torch.no_grad():
            assert (gates[0](x)[2].sort(-1).values == torch.tensor([6, 7])).all()
        hook.clear("a")
        assert torch.equal(logits(0), ref[0][0] + b) and torch.equal(logits(1), ref[1][0] + c)
        hook.clear("nobody")
        assert torch.equal(logits(1), ref[1][0] + c)
        hook.clear(None)
        assert torch.equal(logits(0), ref[0][0]) and torch.equal(logits(1), ref[1][0])
        # a tensor offset is added, never called, even when its type is callable
        t = a.clone().as_subclass(_CallableTensor)
        assert callable(t)
        hook.set_offset(1, t)
        assert torch.equal(logits(1), ref[1][0] + a)
    finally:
        hook.release()
    assert _unpatched(model)


@pytest.mark.parametrize("family, kw", [("olmoe", {}), ("qwen2_moe", {"norm_topk_prob": True}), ("qwen3_moe", {})])
def test_hooked_softmax_gate_warns_about_nothing(family, kw):
    """The replaced softmax-gate forward runs without any warning (the original forward emits none), with and
    without an offset, and gives the original outputs."""
    model = tiny_model(family, **kw)
    gate = get_adapter(model).moe_gates(model)[1]
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = gate(x)
    hook = GateHook.install(model)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = gate(x)
            hook.set_offset(1, torch.zeros(8))
            out_zero = gate(x)
        assert [str(w.message) for w in caught] == []
        for o in (out, out_zero):
            assert all(torch.equal(p, q) for p, q in zip(o, ref))
    finally:
        hook.release()


def test_an_offset_follows_the_gate_logits_device():
    """An offset set on the CPU is moved to the device of the gate's logits (here the meta device stands in for a
    GPU: the hooked gate runs there and the CPU offset still applies)."""
    model = tiny_model("olmoe")
    hook = GateHook.install(model)
    try:
        gate = get_adapter(model).moe_gates(model)[0]
        E = hook.num_experts(0)
        off = torch.zeros(E)
        off[1] = 50.0  # expert 1 always chosen
        hook.set_offset(0, off, owner="t")
        x = torch.randn(5, model.config.hidden_size)
        cpu_out = gate(x)
        idx = next(o for o in cpu_out if torch.is_tensor(o) and not o.is_floating_point())
        assert (idx == 1).any(-1).all()  # the offset applies
        gate.to("meta")
        meta_out = gate(x.to("meta"))
        assert all(o.device.type == "meta" for o in meta_out if torch.is_tensor(o))
        assert [tuple(o.shape) for o in meta_out if torch.is_tensor(o)] == \
            [tuple(o.shape) for o in cpu_out if torch.is_tensor(o)]
    finally:
        hook.release()
