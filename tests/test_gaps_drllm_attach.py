"""Dr.LLM: attach, plans, router decisions and the runtime's small caches, as the older tests could not see them.

* attach checks the config plan against the model (a repeat is fine where repeats are allowed; a plan list edited in
  place after the config checked it is still refused), names the first three integer tensors of a corrupt artifact,
  refuses a tensor set that lacks a router tensor, and puts the routers on the model's device (the meta device
  stands in for an accelerator here).
* Config changes while attached are checked against the routers also on a one-layer model.
* ``set_plan`` takes an empty plan (refused by length), one per-row plan, per-row plans (checked by length and
  allow_repeat), and a model without decoder layers runs its empty plan.
* The routers' GELU is the tanh approximation (as in :class:`Router`, which training uses); ``allow_repeat=False``
  is a -inf repeat logit; a non-finite input names the fix in full.
* The pooling matrices of a length are kept (at most 64 lengths), the layer biases are rebuilt only when the
  routers, their biases or the knob change, and both land on the device they are asked for.
"""

import math

import pytest
import torch
from torch import nn

import retrofit
from retrofit.arch import get_adapter
from retrofit.artifacts import ArtifactError
from retrofit.core.plans import ACTIONS
from retrofit.methods.drllm.config import DrLLMConfig
from retrofit.methods.drllm.router import RouterBank, window_matrix, window_weights
from retrofit.methods.drllm.runtime import DrLLM
from retrofit.testing import tiny_model

IDS = torch.tensor([[5, 9, 17, 33, 2, 64, 7, 11], [40, 41, 42, 43, 44, 45, 46, 47]])
META = torch.device("meta")


def _handle(model, cfg: DrLLMConfig) -> DrLLM:
    return DrLLM(model, cfg, get_adapter(model))


def _run(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _constant_routers(h, fc1_bias: float, fc2_weight, fc2_bias):
    """Routers whose decision does not depend on the input: fc1 maps everything to ``fc1_bias`` in every unit, so
    every window's hidden units are ``gelu(fc1_bias)``; fc2 has the rows ``fc2_weight`` (per action, the same
    weight on every unit) and the bias ``fc2_bias``."""
    h.init_routers(seed=0)
    with torch.no_grad():
        for r in h.routers.router:
            r.fc1.weight.zero_()
            r.fc1.bias.fill_(fc1_bias)
            r.fc2.weight.copy_(torch.tensor(fc2_weight).unsqueeze(1).expand_as(r.fc2.weight))
            r.fc2.bias.copy_(torch.tensor(fc2_bias))


# ------------------------------------------------------------------------------------------------- attach
def test_attach_checks_the_config_plan_against_the_model_and_its_allow_repeat():
    model = tiny_model("llama")
    base = _run(model)
    plan = ["repeat", "execute", "skip", "execute"]
    h = retrofit.attach(model, "drllm", plan=plan)  # repeats are allowed by default
    out = _run(model)
    assert h.last_plans == [plan, plan]
    assert h.stats()["action_counts"] == [[0, 0, 2], [0, 2, 0], [2, 0, 0], [0, 2, 0]]
    assert not torch.equal(out, base)
    h.config.plan = ["repeat"] * 4  # a change to another plan with repeats is applied
    assert h.config.plan == ["repeat"] * 4
    h.detach()
    # the config checked its plan when it was made; a plan list edited in place afterwards is checked at attach
    cfg = DrLLMConfig(allow_repeat=False, plan=["execute"] * 4)
    cfg.plan[2] = "repeat"
    with pytest.raises(ValueError) as e:
        _handle(model, cfg).attach()
    assert str(e.value) == "plan entry 2 is 'repeat' but allow_repeat=False"
    assert not getattr(model, "_retrofit_handles", [])
    assert torch.equal(_run(model), base)


def test_attach_names_the_first_three_integer_router_tensors():
    model = tiny_model("llama")
    tensors = dict(RouterBank(4, 64, 4).state_dict())
    names = list(tensors)[:5]
    for k in names:
        tensors[k] = tensors[k].round().to(torch.int64)
    with pytest.raises(ArtifactError) as e:
        _handle(model, DrLLMConfig(bottleneck=4)).attach(tensors)
    assert str(e.value) == (
        "router tensors must be floating point, but router.0.fc1.weight (torch.int64), router.0.fc1.bias "
        "(torch.int64), router.0.fc2.weight (torch.int64) are not: the artifact is corrupt; retrain or save it again")
    assert names[:3] == ["router.0.fc1.weight", "router.0.fc1.bias", "router.0.fc2.weight"]


def test_attach_refuses_router_tensors_with_a_missing_or_extra_key():
    model = tiny_model("llama")
    good = dict(RouterBank(4, 64, 4).state_dict())
    missing = {k: v for k, v in good.items() if k != "router.3.fc2.bias"}
    with pytest.raises(ArtifactError) as e:
        _handle(model, DrLLMConfig(bottleneck=4)).attach(missing)
    assert str(e.value).startswith("router tensors do not match this model/config: Error(s) in loading state_dict")
    assert 'Missing key(s) in state_dict: "router.3.fc2.bias"' in str(e.value)
    extra = {**good, "router.4.fc1.bias": torch.zeros(4)}
    with pytest.raises(ArtifactError, match=r'Unexpected key\(s\) in state_dict: "router.4.fc1.bias"'):
        _handle(model, DrLLMConfig(bottleneck=4)).attach(extra)
    assert not getattr(model, "_retrofit_handles", [])
    h = _handle(model, DrLLMConfig(bottleneck=4)).attach(good)  # the whole set loads, value for value
    assert all(torch.equal(h.routers.state_dict()[k], v) for k, v in good.items())
    h.detach()


def test_routers_are_put_on_the_models_device():
    model = tiny_model("llama").to(META)  # the meta device stands in for an accelerator
    tensors = dict(RouterBank(4, 64, 4).state_dict())  # loaded on the CPU
    h = _handle(model, DrLLMConfig(bottleneck=4)).attach(tensors)
    assert {p.device for p in h.routers.parameters()} == {META}
    assert not h.routers.training
    h.detach()
    h = retrofit.attach(model, "drllm", bottleneck=4)
    bank = h.init_routers(seed=0)
    assert bank is h.routers and {p.device for p in bank.parameters()} == {META}
    h.detach()


def test_config_changes_on_a_one_layer_model_with_routers():
    model = tiny_model("llama", num_hidden_layers=1)
    h = retrofit.attach(model, "drllm", bottleneck=4)
    h.init_routers(seed=0)
    h.config.skip_bias = 0.5  # fits: applied
    assert h.config.skip_bias == 0.5
    with pytest.raises(ValueError) as e:
        h.config.bottleneck = 8
    assert str(e.value) == "bottleneck is 4, fixed by the attached routers; attach routers of another width instead"
    assert h.config.bottleneck == 4
    h.detach()


# -------------------------------------------------------------------------------------------------- plans
def test_set_plan_forms_and_checks():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    with pytest.raises(ValueError) as e:
        h.set_plan([])
    assert str(e.value) == ("the plan has 0 entries but the model has 4 decoder layers (one action per decoder "
                            "layer)")
    row = ["skip", "execute", "repeat", "execute"]
    h.set_plan([row])  # one per-row plan: every row of the batch
    assert h._explicit_plan.tolist() == [[0, 1, 2, 1]]
    _run(model)
    assert h.last_plans == [row, row]
    with pytest.raises(ValueError) as e:
        h.set_plan([["execute"] * 3, ["skip"] * 3])
    assert str(e.value) == ("the plan has 3 entries but the model has 4 decoder layers (one action per decoder "
                            "layer)")
    h.set_plan(None)
    h.detach()
    h = retrofit.attach(model, "drllm", allow_repeat=False)
    with pytest.raises(ValueError) as e:
        h.set_plan([["execute"] * 4, ["execute", "repeat", "execute", "execute"]])
    assert str(e.value) == "plan entry 1 is 'repeat' but allow_repeat=False"
    with pytest.raises(ValueError) as e:
        h.set_plan(["execute", "execute", "execute", "repeat"])
    assert str(e.value) == "plan entry 3 is 'repeat' but allow_repeat=False"
    assert h._explicit_plan is None  # nothing was set
    h.detach()


def test_a_model_without_decoder_layers_runs_its_empty_plan():
    model = tiny_model("llama", num_hidden_layers=0)
    ids = IDS[:1]
    base = _run(model, ids)
    h = retrofit.attach(model, "drllm")
    h.set_plan([])
    assert torch.equal(_run(model, ids), base)
    assert h.last_plans == [[]]
    h.detach()
    h = retrofit.attach(model, "drllm", plan=[])
    assert torch.equal(_run(model, ids), base)
    assert h.last_plans == [[]]
    st = h.stats()  # nothing to skip: every (no) layer runs
    assert st["mean_layers_executed"] == 0.0 and st["layer_fraction"] == 1.0 and st["sequences"] == 1
    h.detach()


def test_initial_actions_are_on_the_device_asked_for():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", plan=["execute", "skip", "execute", "repeat"])
    acts, deciding = h._initial_actions(3, META)  # the config plan
    assert acts.device == META and acts.dtype == torch.long and acts.shape == (3, 4) and deciding is False
    h.set_plan(["skip"] * 4)  # an explicit plan
    acts, deciding = h._initial_actions(2, META)
    assert acts.device == META and acts.shape == (2, 4) and deciding is False
    acts, _ = h._initial_actions(2, torch.device("cpu"))
    assert acts.tolist() == [[0] * 4] * 2
    h.detach()


# -------------------------------------------------------------------------------------------- decisions
def test_router_gelu_is_the_tanh_approximation():
    """fc1 gives every hidden unit 1.0: gelu_tanh(1) = 0.841192 and the exact gelu(1) = 0.841345 on either side of
    the execute logit 0.84127, against a skip logit equal to the mean hidden unit."""
    tanh1 = float(nn.functional.gelu(torch.tensor(1.0), approximate="tanh"))
    exact1 = float(nn.functional.gelu(torch.tensor(1.0)))
    assert tanh1 < 0.84127 < exact1
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", bottleneck=4, num_windows=4)
    _constant_routers(h, 1.0, [0.25, 0.0, 0.0], [0.0, 0.84127, -10.0])
    _run(model)
    assert h.last_plans == [["execute"] * 4] * 2
    # the training path (Router.forward on the collected features) agrees
    feats, valid = h.collect_features(IDS)
    logits = h.routers(feats, valid)
    assert logits.argmax(-1).tolist() == [[1] * 4] * 2
    assert torch.allclose(logits[..., 0], torch.full((2, 4), tanh1), atol=1e-6)
    with torch.no_grad():  # a lower execute logit: every layer skips
        for r in h.routers.router:
            r.fc2.bias[1] = 0.8411
    _run(model)
    assert h.last_plans == [["skip"] * 4] * 2
    h.detach()


def test_allow_repeat_false_is_a_minus_infinite_repeat_logit():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", bottleneck=4)
    _constant_routers(h, 0.0, [0.0, 0.0, 0.0], [0.0, 1.0, 5.0])  # logits = fc2 bias: repeat wins
    _run(model)
    assert h.last_plans == [["repeat"] * 4] * 2
    h.config.allow_repeat = False
    bias = h._decision_bias(torch.device("cpu"))
    assert bias.tolist() == [0.0, 0.0, -math.inf]
    _run(model)
    assert h.last_plans == [["execute"] * 4] * 2
    h.config.skip_bias = 2.0
    assert h._decision_bias(torch.device("cpu")).tolist() == [2.0, 0.0, -math.inf]
    h.reset_stats()
    _run(model)
    assert h.last_plans == [["skip"] * 4] * 2
    assert h.stats()["action_counts"] == [[2, 0, 0]] * 4
    h.detach()


def test_non_finite_hidden_states_error_names_the_fix_in_full():
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[7] = float("inf")
    ids = torch.full((2, 5), 4)
    ids[0, 3] = 7
    h = retrofit.attach(model, "drllm")
    h.init_routers(seed=0)
    with pytest.raises(FloatingPointError) as e, torch.no_grad():
        model(ids)
    assert str(e.value) == (
        "Dr.LLM: the hidden states entering decoder layer 0 hold NaN or inf (batch rows [0]), so its router cannot "
        "decide; the base model overflowed or its weights / inputs are corrupt (float16 overflows easily: load the "
        "model in bfloat16 or float32)")
    h.detach()


# ----------------------------------------------------------------------------------------------- caches
def test_pooling_matrices_are_kept_per_length_for_at_most_64_lengths():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", num_windows=4)
    hidden = torch.zeros(3, 10, 64)
    A, valid, w, uniform = h._pooling(None, hidden)
    assert uniform is True  # 10 tokens fill all 4 windows
    assert h._pooling(None, torch.zeros(1, 3, 64))[3] is False  # 3 tokens leave a window empty
    assert h._pooling(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), torch.zeros(2, 5, 64))[3] is True
    assert h._pooling(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), torch.zeros(2, 5, 64))[3] is False
    h._pool_cache.clear()
    A_ref, valid_ref = window_matrix(torch.ones(1, 10, dtype=torch.long), 4)
    assert A.shape == (3, 4, 10) and torch.equal(A, A_ref.expand(3, 4, 10))
    assert torch.equal(valid, valid_ref.expand(3, 4)) and torch.equal(w, window_weights(valid_ref).expand(3, 1, 4))
    A, valid, w, _ = h._pooling(None, hidden)
    A2, valid2, w2, _ = h._pooling(None, torch.zeros(1, 10, 64))  # the next prefill of that length: the same matrices
    assert A2.data_ptr() == A.data_ptr() and valid2.data_ptr() == valid.data_ptr() and w2.data_ptr() == w.data_ptr()
    h._pool_cache.clear()
    for T in range(1, 65):
        h._pooling(None, torch.zeros(1, T, 64))
    assert len(h._pool_cache) == 64
    h._pooling(None, torch.zeros(1, 65, 64))  # the 65th length starts the cache afresh
    assert [k[0] for k in h._pool_cache] == [65]
    h.detach()


def test_decision_tables_are_kept_until_the_routers_or_the_knob_change():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", bottleneck=4, skip_bias=0.5, repeat_bias=-0.25)
    h.init_routers(seed=0)
    with torch.no_grad():
        for i, r in enumerate(h.routers.router):
            r.fc2.bias.copy_(torch.tensor([0.1 * i, 0.2, 0.3]))
    cpu = torch.device("cpu")
    t = h._tables(cpu)[0]
    w1, b1, tiled, fc2t, b = (torch.stack(x) for x in t)
    assert torch.equal(w1, torch.stack([r.fc1.weight for r in h.routers.router]))
    assert torch.equal(b1, torch.stack([r.fc1.bias for r in h.routers.router]))
    assert torch.isneginf(b[:, 0]).all()  # the finiteness column
    assert torch.allclose(b[:, 1:], torch.tensor([[0.1 * i + 0.5, 0.2, 0.05] for i in range(4)]))
    W = h.config.num_windows
    for i, r in enumerate(h.routers.router):  # fc2 transposed after a zero column, and tiled over the windows / W
        assert torch.equal(fc2t[i, :, 0], torch.zeros(4)) and torch.equal(fc2t[i, :, 1:], r.fc2.weight.t())
        assert tiled.shape == (4, W * 4, 4)
        assert torch.allclose(tiled[i], torch.cat([fc2t[i] / W] * W, 0))
    assert h._tables(cpu)[0] is t  # kept
    kern = h._tables(cpu)[1]
    if kern is not None:  # the CPU kernel's copy: the same biases, masked / knob folded in
        assert torch.allclose(torch.stack([x[3] for x in kern.tensors]), b[:, 1:])
    h.config.skip_bias = 0.0
    kern2 = h._tables(cpu)[1]
    if kern2 is not None:
        assert kern2 is not kern and torch.allclose(torch.stack([x[3] for x in kern2.tensors])[:, 0],
                                                    torch.tensor([0.0, 0.1, 0.2, 0.3]))
    t2 = h._tables(cpu)[0]
    assert t2 is not t and torch.allclose(torch.stack(t2[4])[:, 1], torch.tensor([0.0, 0.1, 0.2, 0.3]))
    # another bank whose fc2 biases sit where the old ones are, at the same version counts, with other values
    old = h.routers
    new = RouterBank(4, 64, 4)
    for ro, rn in zip(old.router, new.router):
        rn.fc2.bias = nn.Parameter(ro.fc2.bias.data)
        with torch.no_grad():
            rn.fc2.bias.fill_(-1.0)
            while rn.fc2.bias._version < ro.fc2.bias._version:
                rn.fc2.bias.add_(0.0)
        assert rn.fc2.bias._version == ro.fc2.bias._version and rn.fc2.bias.data_ptr() == ro.fc2.bias.data_ptr()
    h.routers = new
    assert torch.allclose(torch.stack(h._tables(cpu)[0][4])[:, 1:], torch.tensor([[-1.0, -1.0, -1.25]] * 4))
    # weights trained in place are seen too
    with torch.no_grad():
        new.router[2].fc2.weight.mul_(2.0)
        new.router[1].fc1.weight.mul_(3.0)
    t3 = h._tables(cpu)[0]
    assert torch.equal(t3[3][2][:, 1:], new.router[2].fc2.weight.t())
    assert torch.equal(t3[0][1], new.router[1].fc1.weight)
    # asked for another device (the hidden states of a layer on another accelerator): built there
    m, m_kernel = h._tables(META)
    assert all(x.device == META for xs in m for x in xs) and torch.stack(m[4]).shape == (4, 4)
    assert m_kernel is None  # the C kernel is for CPU tensors only
    h.detach()


@pytest.mark.parametrize("lengths", [(9, 8, 12), (9, 2, 12)], ids=["every-window-filled", "a-short-row"])
def test_runtime_decisions_equal_the_routers_logits_plus_the_knob(lengths):
    """Every layer's decision for every row is argmax(router logits on the window means it read + the budget
    bias), on the fused path (every row fills its windows) and on the path with empty windows (a 2-token row)."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=6)
    h = retrofit.attach(model, "drllm", bottleneck=16, skip_bias=0.4, repeat_bias=-0.3)
    h.init_routers(seed=3)
    with torch.no_grad():
        for r in h.routers.router:
            r.fc2.weight.mul_(20.0)  # the window means and the biases both decide
            r.fc2.bias.copy_(torch.randn(3))
    T = max(lengths)
    ids = torch.randint(3, 128, (len(lengths), T))
    mask = torch.stack([torch.arange(T) >= T - n for n in lengths]).long()  # left padding
    assert h._pooling(mask, torch.zeros(len(lengths), T, 64))[3] is (min(lengths) >= h.config.num_windows)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
        plans = h.last_plans
        feats, valid = h.collect_features(ids, mask, plan=plans)
        want = (h.routers(feats, valid) + torch.tensor([0.4, 0.0, -0.3])).argmax(-1)
    got = torch.tensor([[ACTIONS.index(a) for a in p] for p in plans])
    assert torch.equal(got, want)
    assert len(got.unique()) == 3  # skips, executes and repeats all occur
    assert len({tuple(r) for r in got.tolist()}) == len(lengths)  # and the rows' plans differ
    h.detach()
