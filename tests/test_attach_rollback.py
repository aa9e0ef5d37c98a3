"""attach is all or nothing: a failed attach of any method (bad artifact, bad config, wrong model, or a fault
injected half-way through installing its hooks) leaves the model's parameters, requires_grad flags, forwards,
module hooks and attributes exactly as they were, and the model still computes the base logits."""

from __future__ import annotations

import pytest
import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.artifacts import ArtifactError
from retrofit.methods import Method, build_config, get_method, register_method
from retrofit.testing import tiny_model


def model_state(model) -> dict:
    """Everything an attach may touch, compared by value (parameters) or identity (forwards, attributes)."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "forwards": {n: m.__dict__.get("forward") for n, m in model.named_modules()},
        "attrs": {n: {k: id(v) for k, v in m.__dict__.items() if not k.startswith("_forward")}
                  for n, m in model.named_modules()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "layer_idx": {n: m.layer_idx for n, m in model.named_modules() if hasattr(m, "layer_idx")},
    }


def assert_same(before: dict, after: dict):
    assert after["grad"] == before["grad"]
    assert after["forwards"] == before["forwards"]
    assert after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"]
    assert after["layer_idx"] == before["layer_idx"]
    assert before["params"].keys() == after["params"].keys()
    assert all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])


def fresh(family: str, **kw):
    model = tiny_model(family, **kw)
    model.requires_grad_(True)  # mixed flags, so that a rollback must restore each one
    get_adapter(model).layers(model)[0].requires_grad_(False)
    return model


IDS = torch.tensor([[5, 9, 17, 33, 2, 64, 7, 11]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def direct_attach(model, method: str, tensors=None, **cfg):
    cls = get_method(method)
    return cls(model, build_config(cls.config_cls, cfg), get_adapter(model)).attach(tensors, {})


def check_rollback(model, attempt, error=Exception, match=None):
    base = logits(model)
    before = model_state(model)
    with pytest.raises(error, match=match):
        attempt()
    assert_same(before, model_state(model))
    assert torch.equal(logits(model), base)
    assert not getattr(model, "_retrofit_handles", [])


# --------------------------------------------------------------------------------------------------- drllm
def test_drllm_bad_artifact_config_and_plan():
    model = fresh("llama")
    bad = {"routers.0.w1.weight": torch.zeros(3, 3)}
    check_rollback(model, lambda: direct_attach(model, "drllm", tensors=bad), ArtifactError, "do not match")
    check_rollback(model, lambda: retrofit.attach(model, "drllm", num_windows=0), ValueError, "num_windows")
    check_rollback(model, lambda: retrofit.attach(model, "drllm", plan=["execute"] * 3), ValueError, "decoder layers")


def test_drllm_fault_half_way(monkeypatch):
    model = fresh("llama")
    adapter = get_adapter(model)
    calls = []
    orig = type(adapter).cache_slot_modules

    def flaky(self, layer):  # fails on the third layer: two layers are patched and the hooks registered
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return orig(self, layer)

    monkeypatch.setattr(type(adapter), "cache_slot_modules", flaky)
    check_rollback(model, lambda: retrofit.attach(model, "drllm"), RuntimeError, "injected fault")
    monkeypatch.undo()
    h = retrofit.attach(model, "drllm")  # and a later attach works
    assert torch.equal(logits(model), logits(tiny_model("llama")))
    h.detach()


def test_drllm_artifact_of_another_model(tmp_path):
    h = retrofit.attach(tiny_model("llama", seed=3), "drllm")
    h.init_routers(seed=0)
    h.save(tmp_path / "r")
    model = fresh("llama")
    check_rollback(model, lambda: retrofit.attach(model, "drllm", routers=tmp_path / "r"), ArtifactError)


# --------------------------------------------------------------------------------------------------- reroute
def test_reroute_wrong_model_bad_layers_and_fault(monkeypatch):
    dense = fresh("llama")
    check_rollback(dense, lambda: retrofit.attach(dense, "reroute"), ValueError, "no MoE gates")
    model = fresh("olmoe")
    check_rollback(model, lambda: retrofit.attach(model, "reroute", layers=[99]), ValueError, "not MoE layers")
    check_rollback(model, lambda: retrofit.attach(model, "reroute", lr=-1.0), ValueError, "lr")
    orig = type(model).register_forward_hook

    def flaky(self, *a, **k):  # the pre-hook is registered, the gates are wrapped: then the post-hook fails
        raise RuntimeError("injected fault")

    monkeypatch.setattr(type(model), "register_forward_hook", flaky)
    check_rollback(model, lambda: retrofit.attach(model, "reroute"), RuntimeError, "injected fault")
    monkeypatch.setattr(type(model), "register_forward_hook", orig)


def test_reroute_failure_keeps_another_method_attached():
    model = fresh("olmoe")
    steer = retrofit.attach(model, "steer", experts={1: [0, 1]}, lam=1.0)
    steered = logits(model)
    before = model_state(model)
    with pytest.raises(ValueError):
        retrofit.attach(model, "reroute", layers=[99])
    assert_same(before, model_state(model))
    assert torch.equal(logits(model), steered)
    assert model._retrofit_gate_hook._owners == 1
    steer.detach()
    assert not hasattr(model, "_retrofit_gate_hook")


# --------------------------------------------------------------------------------------------------- roma
def test_roma_bad_artifact_and_fault(monkeypatch):
    model = fresh("olmoe")
    check_rollback(model, lambda: direct_attach(model, "roma", tensors={"delta.3": torch.zeros(2, 2)}, num_layers=1),
                   ValueError, "shape")
    check_rollback(model, lambda: retrofit.attach(model, "roma", num_layers=99), ValueError, "num_layers")
    dense = fresh("llama")
    check_rollback(dense, lambda: retrofit.attach(dense, "roma"), ValueError, "no MoE gates")
    gates = get_adapter(model).moe_gates(model)
    last = gates[max(gates)]

    def flaky(*a, **k):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(last, "register_forward_pre_hook", flaky)  # the other gates' pre-hooks are in already
    check_rollback(model, lambda: retrofit.attach(model, "roma", num_layers=2), RuntimeError, "injected fault")


# --------------------------------------------------------------------------------------------------- steer
def test_steer_bad_artifact_config_and_model():
    model = fresh("olmoe")
    check_rollback(model, lambda: direct_attach(model, "steer", tensors={"mask.1": torch.ones(3, dtype=torch.uint8)}),
                   ArtifactError, "shape")
    check_rollback(model, lambda: retrofit.attach(model, "steer", experts={1: [999]}), ValueError, "experts")
    check_rollback(model, lambda: retrofit.attach(model, "steer", experts={99: [0]}), ValueError, "not an MoE layer")
    dense = fresh("llama")
    check_rollback(dense, lambda: retrofit.attach(dense, "steer", experts={1: [0]}), ValueError, "no MoE gates")


# --------------------------------------------------------------------------------------------------- misa
def test_misa_wrong_model_bad_config_and_fault(monkeypatch):
    dense = fresh("llama")
    check_rollback(dense, lambda: retrofit.attach(dense, "misa"), ValueError, "Sparse-Attention")
    model = fresh("deepseek_v32")
    check_rollback(model, lambda: retrofit.attach(model, "misa", active_heads=0), ValueError)
    check_rollback(model, lambda: retrofit.attach(model, "misa", hierarchical=True, candidates=1), ValueError,
                   "candidates")
    import retrofit.methods.misa.runtime as misa_mod

    real = misa_mod.patch_forward
    n = []

    def flaky(*a, **k):  # the first indexer is patched, the second fails
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("injected fault")
        return real(*a, **k)

    monkeypatch.setattr(misa_mod, "patch_forward", flaky)
    check_rollback(model, lambda: retrofit.attach(model, "misa"), RuntimeError, "injected fault")


# --------------------------------------------------------------------------------------------------- registry
def test_register_method_refuses_a_duplicate_key_and_checks_the_contract():
    with pytest.raises(ValueError, match="already registered"):
        @register_method("drllm")
        class Other(Method):
            config_cls = get_method("drllm").config_cls
            prompt_policy = "prompt"

            def _attach(self, tensors, meta):
                pass

            def _detach(self):
                pass
    with pytest.raises(ValueError, match="prompt_policy"):
        @register_method("test_bad_policy")
        class Bad(Method):
            config_cls = get_method("drllm").config_cls
            prompt_policy = "everything"

            def _attach(self, tensors, meta):
                pass

            def _detach(self):
                pass
    with pytest.raises(TypeError, match="abstract"):
        Method(None, None, None)
    assert get_method("drllm").prompt_policy == "prompt"
    assert get_method("reroute").prompt_policy == "context"
    assert {get_method(k).prompt_policy for k in ("roma", "steer", "misa")} == {"continuation"}
