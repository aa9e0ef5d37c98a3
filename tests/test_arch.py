import pytest
import torch

import retrofit
from retrofit.arch import UnsupportedModelError, get_adapter
from retrofit.testing import ALL_FAMILIES, DSA_FAMILIES, MOE_FAMILIES, tiny_model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_adapter_finds_layers_gates_indexers(family):
    model = tiny_model(family)
    a = get_adapter(model)
    assert a.num_layers(model) == model.config.num_hidden_layers == 4
    gates = a.moe_gates(model)
    if family in MOE_FAMILIES + DSA_FAMILIES:
        first_dense = getattr(model.config, "first_k_dense_replace", 0) or 0
        assert sorted(gates) == list(range(first_dense, 4))
        assert all("Router" in type(g).__name__ for g in gates.values())
    else:
        assert gates == {}
    idx = a.indexers(model)
    assert (sorted(idx) == [0, 1, 2, 3]) == (family in DSA_FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layer_by_layer_equals_forward(family):
    model = tiny_model(family)
    a = get_adapter(model)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        h, kw = a.prepare(model, ids)
        for layer in a.layers(model):
            h = a.call_layer(layer, h, kw)
        logits = a.head(model, h)
        ref = model(ids).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)


def test_unsupported_model_names_class_and_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*Supported families: .*llama.*olmoe"):
        retrofit.attach(m, "drllm")
