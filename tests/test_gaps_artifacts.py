"""Artifact gaps from the mutation run (retrofit/artifacts.py).

* the format-1 fingerprint is frozen (golden values on deterministic weights, a dense and an MoE model), agrees
  for float64 / bfloat16 loads of the same (bfloat16-exact) weights, and upgrading a hand-written format-1
  artifact rewrites it as a loadable format-2 one;
* the errors a user sees (an old artifact, another base model, a wrong model at upgrade, a non-JSON type given
  to ``validate_meta``) are pinned word for word, with the artifact's path;
* which checkpoint names the fingerprint skips (rotary buffers only);
* ``retrofit.json`` is written indented (two spaces, sorted keys) by save and upgrade alike.
"""

import copy
import json

import pytest
import torch

from retrofit.artifacts import (CONFIG_NAME, TENSORS_NAME, ArtifactError, _fingerprint_v1, fingerprint,
                                fingerprint_of, fingerprinted, load_artifact, save_artifact, tensor_digest,
                                upgrade_artifact, validate_meta)
from retrofit.testing import tiny_model

# format-1 fingerprints of tiny_model(family) with the weights of _deterministic(): never change these
V1_GOLDEN = {
    "llama": {"architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": 4, "hidden_size": 64,
              "vocab_size": 128, "weights_sha256": "023624c72b8f41ca999331c28d2ecc76"},
    "olmoe": {"architecture": "OlmoeForCausalLM", "model_type": "olmoe", "num_layers": 4, "hidden_size": 64,
              "vocab_size": 128, "weights_sha256": "23a04b6ed8a6a8004009e1ec68b01baa"},
}


def _deterministic(family):
    """tiny_model(family) with every parameter set from a fixed formula (no RNG): values k/64 with |k| <= 30,
    exact in bfloat16, and different in every tensor (the offset depends on the parameter's index)."""
    model = tiny_model(family)
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            k = (torch.arange(p.numel(), dtype=torch.int64) * 7 + 13 * i) % 61 - 30
            p.copy_((k.to(torch.float32) / 64).view_as(p))
    return model


@pytest.fixture(scope="module")
def models():
    return {family: _deterministic(family) for family in V1_GOLDEN}


def _old_error(path):
    return (f"router artifact {path} was saved by an older retrofit (fingerprint format 1, which told bfloat16 "
            "loads apart and missed changed middle layers), so it cannot be checked against this model. Re-save "
            "it once on the model it was made for (float32, as then): "
            f"`retrofit.artifacts.upgrade_artifact({str(path)!r}, model)` checks the old fingerprint and rewrites "
            "retrofit.json; or re-run `retrofit train`.")


def _format1(path, family, routers):
    """A format-1 artifact as an old retrofit wrote it: no tensor manifest, no 'extra', the old fingerprint."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file(routers, str(path / TENSORS_NAME), metadata={"method": "drllm"})
    meta = {"format_version": 1, "method": "drllm", "config": {"num_windows": 4}, "base_model": V1_GOLDEN[family]}
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    return path


# ---------------------------------------------------------------------------------------------- format-1 fingerprint
@pytest.mark.parametrize("family", list(V1_GOLDEN))
def test_format1_fingerprint_is_frozen_and_the_same_for_float64_and_bfloat16_loads(models, family):
    model = models[family]
    assert _fingerprint_v1(model) == V1_GOLDEN[family]
    # the old fingerprint hashes float32 bytes whatever the load's dtype: the same (bfloat16-exact) weights
    # loaded in float64 or bfloat16 give the same value
    assert _fingerprint_v1(copy.deepcopy(model).double()) == V1_GOLDEN[family]
    assert _fingerprint_v1(copy.deepcopy(model).bfloat16()) == V1_GOLDEN[family]


def test_format1_artifact_upgrades_to_a_loadable_current_one(models, tmp_path):
    model = models["olmoe"]
    routers = {"routers.0.fc1.weight": torch.arange(6, dtype=torch.float32).view(2, 3) / 4,
               "routers.0.fc1.bias": torch.tensor([0.5, -1.0])}
    path = _format1(tmp_path / "old", "olmoe", routers)
    tensor_bytes = (path / TENSORS_NAME).read_bytes()
    with pytest.raises(ArtifactError) as e:  # before the upgrade: refused, naming the upgrade and this path
        load_artifact(path)
    assert str(e.value) == _old_error(path)
    with pytest.raises(ArtifactError) as e:
        load_artifact(path, model, method="drllm")
    assert str(e.value) == _old_error(path)

    assert upgrade_artifact(path, model) == path
    text = (path / CONFIG_NAME).read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, sort_keys=True)  # written readable, as save_artifact writes it
    assert meta == {"format_version": 2, "method": "drllm", "config": {"num_windows": 4}, "extra": {},
                    "base_model": fingerprint(model),
                    "tensors": {"routers.0.fc1.bias": {"shape": [2], "dtype": "float32"},
                                "routers.0.fc1.weight": {"shape": [2, 3], "dtype": "float32"}}}
    assert (path / TENSORS_NAME).read_bytes() == tensor_bytes  # routers are not touched
    got_meta, tensors = load_artifact(path, model, method="drllm")
    assert got_meta == meta and tensors.keys() == routers.keys()
    assert all(torch.equal(tensors[k], routers[k]) for k in routers)
    # a current artifact is left as it is (not checked against the old fingerprint, not rewritten)
    assert upgrade_artifact(path, model) == path and (path / CONFIG_NAME).read_text() == text


def test_format1_upgrade_on_another_model_says_which_fields_differ(models, tmp_path):
    path = _format1(tmp_path / "old", "llama", {"t": torch.ones(2)})
    text = (path / CONFIG_NAME).read_text()
    with pytest.raises(ArtifactError) as e:
        upgrade_artifact(path, models["olmoe"])
    assert str(e.value) == (f"{path} was made for another base model (format-1 fingerprint differs in "
                            "['architecture', 'model_type', 'weights_sha256']); upgrade it on the model it was "
                            "trained for, loaded in float32.")
    other = copy.deepcopy(models["llama"])
    with torch.no_grad():
        other.model.layers[-1].self_attn.q_proj.weight[0, 0] += 1  # the last layer's first tensor is hashed
    with pytest.raises(ArtifactError) as e:
        upgrade_artifact(path, other)
    assert str(e.value) == (f"{path} was made for another base model (format-1 fingerprint differs in "
                            "['weights_sha256']); upgrade it on the model it was trained for, loaded in float32.")
    assert (path / CONFIG_NAME).read_text() == text  # nothing written


# ---------------------------------------------------------------------------------------------- current format
def test_saved_meta_is_indented_and_another_model_is_named_with_the_path(models, tmp_path):
    model = models["llama"]
    path = save_artifact(tmp_path / "r", "drllm", {"x": 1}, {"t": torch.ones(2)}, model, extra={"note": "a"})
    text = (path / CONFIG_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) and '\n  "base_model": {\n' in text
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(2)
    with pytest.raises(ArtifactError) as e:
        load_artifact(path, other)
    assert str(e.value) == (f"router artifact {path} was made for another base model (weights_sha256: the weights "
                            "differ in decoder layer 1). Load it onto the model it was trained for, or re-run "
                            "`retrofit train` for this one.")
    meta, tensors = load_artifact(path, model)
    assert meta["extra"] == {"note": "a"} and torch.equal(tensors["t"], torch.ones(2))


def test_only_rotary_buffers_are_left_out_of_the_fingerprint(models):
    for name in ("model.rotary_emb.inv_freq", "model.layers.0.self_attn.rotary_emb.inv_freq",
                 "model.rotary_emb.cos_cached", "model.layers.2.self_attn.inv_freq"):
        assert not fingerprinted(name), name
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.1.self_attn.rotary.weight", "model.inv_freq_scale"):
        assert fingerprinted(name), name
    model = models["llama"]
    digests = {n: tensor_digest(t) for n, t in model.state_dict().items()}
    noise = {"model.rotary_emb.cos_cached": "a", "model.layers.2.self_attn.inv_freq": "b",
             "model.layers.0.self_attn.rotary_emb.sin_cached": "c"}
    assert fingerprint_of("LlamaForCausalLM", model.config, 4, {**digests, **noise}) == fingerprint(model)


def test_validate_meta_names_a_python_type_that_json_has_no_name_for():
    meta = {"format_version": 1, "method": "drllm", "config": ("num_windows", 4), "base_model": {}}
    with pytest.raises(ArtifactError) as e:
        validate_meta(meta, "m/retrofit.json")
    assert str(e.value) == ("m/retrofit.json: config must be an object of method options, not tuple; the artifact "
                            "is corrupt or from another tool: save it again.")


def test_tensor_digest_samples_on_the_tensors_own_device():
    """The sample index is made on the tensor's device: under another default device (a stand-in for weights on
    a GPU while the default is the CPU) the digest is the same."""
    from retrofit.artifacts import tensor_digest

    t = torch.arange(3000, dtype=torch.float32).reshape(30, 100) / 7
    want = tensor_digest(t)
    with torch.device("meta"):
        assert tensor_digest(t) == want
