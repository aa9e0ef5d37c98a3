"""Dr.LLM router pieces and the core hooks: behaviour the older tests could not see (mutation gaps).

* ``window_matrix`` keeps its documented shape [B, W, T] when no row fills every window; ``window_means``,
  ``window_weights`` and ``Router.forward`` return float32 whatever float dtype the input comes in.
* ``Router.decide`` uses fc1's bias and the tanh GELU of the training forward (a near tie shows it), and
  ``Router`` / ``RouterBank`` default to the Dr.LLM bottleneck of 128.
* ``RequestTracker`` follows its start / finish protocol exactly (``new`` and ``finish()`` are booleans, only a new
  request adopts a cache, an output without a cache attribute is fine, also inside the Dr.LLM runtime).
* ``ForwardPatch`` defaults to an unbound forward and its ``restore`` is idempotent and tolerant.
* ``ModelSnapshot`` restores a module whose every entry was replaced and an attribute whose value was None, and
  ``changes()`` names a module that is no longer in the model "?".
"""

import types

import pytest
import torch
from torch import nn

import retrofit
from retrofit.arch import get_adapter
from retrofit.core import hooks as H
from retrofit.methods import Method
from retrofit.methods.drllm.router import Router, RouterBank, window_matrix, window_means, window_weights
from retrofit.testing import tiny_model


# --------------------------------------------------------------------------------------------------- router
def test_window_matrix_has_every_window_even_when_no_row_fills_them():
    """Two real tokens and four windows: the tokens land in windows 0 and 2, windows 1 and 3 are empty (invalid),
    and A still has all four window rows (the feature tensors of one training set are stacked over prompts)."""
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    A, valid = window_matrix(mask, 4)
    assert A.shape == (2, 4, 3) and A.dtype == torch.float32
    assert valid.tolist() == [[True, False, True, False]] * 2
    want = torch.zeros(2, 4, 3)
    want[0, 0, 0] = want[0, 2, 1] = want[1, 0, 1] = want[1, 2, 2] = 1.0
    assert torch.equal(A, want)
    w = window_weights(valid)
    assert w.shape == (2, 1, 4) and torch.equal(w, torch.tensor([[[0.5, 0.0, 0.5, 0.0]]] * 2))


def test_window_means_and_weights_are_float32_for_float64_inputs():
    """A float64 model's hidden states (and a float64 validity mask, e.g. loaded from numpy) still give float32
    window means and weights, equal to those of the float32 inputs, and the router accepts them."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    want, want_valid = window_means(hidden, mask, 3)
    got, got_valid = window_means(hidden.double(), mask, 3)
    assert got.dtype == torch.float32 and torch.equal(got_valid, want_valid)
    torch.testing.assert_close(got, want)
    valid = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    w = window_weights(valid)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([[[1 / 3, 0.0, 1 / 3, 1 / 3]]]))
    r = Router(4, bottleneck=5)
    means = torch.randn(1, 4, 4, generator=gen)
    assert r.decide(means, w, torch.zeros(3)).shape == (1,)


def test_router_forward_is_in_the_router_dtype_for_a_float_validity_mask():
    gen = torch.Generator().manual_seed(4)
    r = Router(4, bottleneck=5)
    means = torch.randn(3, 4, 4, generator=gen)
    valid = torch.tensor([[True, False, True, True], [True, True, True, True], [False, True, False, False]])
    want = r(means, valid)
    got = r(means, valid.to(torch.float64))  # a 0/1 mask loaded from numpy
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    bank = RouterBank(2, 4, bottleneck=5)
    feats = torch.randn(3, 2, 4, 4, generator=gen)
    v2 = torch.stack([valid, valid.flip(0)], 1)
    out = bank(feats, v2.to(torch.float64))
    assert out.dtype == torch.float32 and out.shape == (3, 2, 3)
    torch.testing.assert_close(out, bank(feats, v2))


def test_router_and_bank_default_to_the_dr_llm_bottleneck():
    r = Router(6)
    assert r.fc1.weight.shape == (128, 6) and r.fc2.weight.shape == (3, 128)
    bank = RouterBank(3, 6)
    assert len(bank) == 3 and all(bank[i].fc1.out_features == 128 and bank[i].fc2.in_features == 128
                                  for i in range(3))
    assert bank.state_dict()["router.2.fc1.weight"].shape == (128, 6)


def test_decide_uses_the_fc1_bias_and_the_tanh_gelu():
    """One hidden unit h = gelu_tanh(x + 1): at x = 0 the tanh GELU gives 0.841192, the exact one 0.841345 and
    no fc1 bias 0. The budget bias sets the execute logit as a threshold between them."""
    r = Router(1, bottleneck=1)
    with torch.no_grad():
        r.fc1.weight.fill_(1.0)
        r.fc1.bias.fill_(1.0)
        r.fc2.weight.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
        r.fc2.bias.zero_()
    means = torch.zeros(1, 2, 1)
    w = window_weights(torch.ones(1, 2, dtype=torch.bool))
    h = float(nn.functional.gelu(torch.tensor(1.0), approximate="tanh"))
    assert abs(h - 0.841192) < 1e-6
    # threshold between the tanh (0.841192) and the exact (0.841345) GELU: tanh is below it -> execute (1)
    near = torch.tensor([0.0, 0.84127, -10.0])
    assert r.decide(means, w, near).tolist() == [1]
    assert (r(means, torch.ones(1, 2, dtype=torch.bool)) + near).argmax(-1).tolist() == [1]
    # threshold 0.5: the biased unit (0.84) is above it -> skip (0); without fc1's bias it would be 0 -> execute
    half = torch.tensor([0.0, 0.5, -10.0])
    assert r.decide(means, w, half).tolist() == [0]
    # and in general (random weights, nonzero fc1 biases) decide is the argmax of the training forward + bias
    gen = torch.Generator().manual_seed(5)
    r = Router(6, bottleneck=4)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    means = torch.randn(64, 3, 6, generator=gen)
    valid = torch.rand(64, 3, generator=gen) > 0.3
    valid[:, 0] = True
    bias = torch.randn(3, generator=gen)
    assert torch.equal(r.decide(means, window_weights(valid), bias), (r(means, valid) + bias).argmax(-1))


# --------------------------------------------------------------------------------------------------- tracker
class _Cache:
    pass


class _Out:
    def __init__(self, pkv):
        self.past_key_values = pkv


def test_request_tracker_protocol_states_are_booleans():
    t = H.RequestTracker()
    c = _Cache()
    assert t.new is False
    assert t.finish(_Out(c)) is False  # no forward started: nothing ended, nothing adopted
    assert t.start(c) is True and t.new is True
    assert t.finish(_Out(c)) is True and t.new is False
    assert t.finish(_Out(c)) is False  # a second finish: the forward that started the request is over
    assert t.start(c) is False and t.finish(_Out(c)) is False  # a decode step
    t.reset()
    assert t.new is False
    assert t.finish(_Out(c)) is False  # after reset no forward is in progress: nothing is adopted ...
    assert t.start(c) is True  # ... so the same cache starts a new request


def test_request_tracker_adopts_only_for_a_new_request_without_a_cache():
    t = H.RequestTracker()
    c1, c2, c3 = _Cache(), _Cache(), _Cache()
    assert t.start(c1)
    assert t.finish(_Out(c2)) is True  # the request's cache is c1, whatever the output carries
    assert t.start(c1) is False
    assert t.start(c2) is True
    t.finish(None)
    assert t.start(None) is True
    assert t.finish(None) is True  # an output that is not a model output (no past_key_values attribute)
    assert t.start(None) is True
    assert t.finish((torch.zeros(1),)) is True  # a tuple output (return_dict=False)
    assert t.start(None) is True
    assert t.finish(_Out(c3)) is True  # made inside the forward: adopted
    assert t.start(c3) is False


def test_drllm_runtime_accepts_a_tuple_output_of_the_decoder():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    h.set_plan(["execute", "skip", "execute", "execute"])
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        out = model.model(ids, use_cache=False, return_dict=False)
        again = model.model(ids, use_cache=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], again.last_hidden_state)
    s = h.stats()
    assert s["sequences"] == 2 and s["mean_layers_executed"] == 3.0
    assert s["action_counts"] == [[0, 2, 0], [2, 0, 0], [0, 2, 0], [0, 2, 0]]
    h.detach()


# --------------------------------------------------------------------------------------------------- patches
def test_forward_patch_defaults_to_an_unbound_forward():
    m = nn.Linear(2, 2)

    def double(x):
        return 2 * x

    p = H.ForwardPatch(m, double)
    assert m.forward is double and p.active is True
    assert torch.equal(m(torch.ones(1, 2)), torch.full((1, 2), 2.0))
    p.restore()
    assert "forward" not in m.__dict__ and p.active is False


def test_forward_patch_restore_is_idempotent_and_tolerates_a_removed_forward():
    m = nn.Linear(2, 2)
    f1, f2 = (lambda x: x + 1), (lambda x: x + 2)
    p1 = H.patch_forward(m, f1)
    p1.restore()
    assert p1.active is False
    p2 = H.patch_forward(m, f2)
    p1.restore()  # an old patch restored again leaves the newer one alone
    assert m.forward is f2 and p2.active is True
    # someone else (a model snapshot, del) already took the patched forward away: restore is a quiet no-op
    del m.forward
    p2.restore()
    assert "forward" not in m.__dict__ and p2.active is False
    snap = H.ModelSnapshot(m)
    p3 = H.patch_forward(m, f1)
    snap.restore()
    p3.restore()
    assert "forward" not in m.__dict__ and snap.changes() == []


# --------------------------------------------------------------------------------------------------- snapshot
class _WrapAndFail(Method):
    """A method whose attach changes the model in ways a rollback must undo completely, then fails."""

    key = "gap_wrap_and_fail"

    def _attach(self, tensors, meta):
        layers = self.adapter.layers(self.model)
        for i in range(len(layers)):  # every entry of the ModuleList replaced
            layers[i] = nn.Identity()
        norm = self.model.model.norm
        norm.weight = nn.Parameter(torch.zeros_like(norm.weight))  # the only parameter of the module replaced
        del self.model.model.scratch  # an attribute whose value was None removed
        raise RuntimeError("attach failed on purpose")

    def _detach(self):
        pass


def test_failed_attach_restores_replaced_entries_and_a_none_attribute():
    model = tiny_model("llama")
    model.model.scratch = None
    layers = list(get_adapter(model).layers(model))
    norm_w = model.model.norm.weight
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
    snap = H.ModelSnapshot(model)
    with pytest.raises(RuntimeError, match="on purpose"):
        _WrapAndFail(model, types.SimpleNamespace(), get_adapter(model)).attach()
    assert snap.changes() == []
    assert all(a is b for a, b in zip(get_adapter(model).layers(model), layers))
    assert model.model.norm.weight is norm_w
    assert "scratch" in model.model.__dict__ and model.model.scratch is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_changes_names_each_edit_and_a_module_no_longer_in_the_model():
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    m[1].note = None
    snap = H.ModelSnapshot(m)
    del m[1].note
    assert snap.changes() == ["1: added [], changed ['note'], hooks []"]
    snap.restore()
    assert snap.changes() == [] and m[1].note is None
    old = m[0]
    m[0] = nn.Linear(2, 2)  # replaced: the snapshot's module is not in the model now ...
    old.extra = 1  # ... and changed as well
    assert snap.changes() == ["<model>: modules changed", "?: added ['extra'], changed [], hooks []"]
    snap.restore()
    assert snap.changes() == [] and m[0] is old and not hasattr(old, "extra")
    # the only buffer of a module replaced by another with the same name
    b = nn.Module()
    b.register_buffer("scale", torch.ones(2))
    s = b.scale
    snap = H.ModelSnapshot(b)
    b.scale = torch.zeros(2)
    assert snap.changes() == ["<model>: buffers changed"]
    snap.restore()
    assert b.scale is s and snap.changes() == []


def test_window_means_are_float32_whatever_the_default_dtype():
    """The window sums and counts are float32 also when torch's default dtype is float64, so the routers (float32
    weights) get the same features."""
    from retrofit.methods.drllm.router import window_means

    hidden = torch.randn(2, 7, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    want = window_means(hidden, mask, 4)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = window_means(hidden, mask, 4)
    finally:
        torch.set_default_dtype(old)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
