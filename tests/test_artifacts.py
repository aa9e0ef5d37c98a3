import json

import pytest
import torch

import retrofit
from retrofit.artifacts import CONFIG_NAME, TENSORS_NAME, ArtifactError, fingerprint, load_artifact
from retrofit.methods.drllm import window_means
from retrofit.testing import tiny_model


def test_save_load_round_trip_reproduces_routers_and_decisions(tmp_path):
    model = tiny_model("qwen2")
    h = retrofit.attach(model, "drllm", num_windows=4, bottleneck=16, skip_bias=0.25)
    h.init_routers(seed=5)
    ids = torch.randint(3, 128, (3, 13))
    with torch.no_grad():
        logits = model(ids).logits
    plans = h.last_plans
    h.save(tmp_path / "r")
    saved = {k: v.clone() for k, v in h.routers.state_dict().items()}
    h.detach()
    meta = json.loads((tmp_path / "r" / CONFIG_NAME).read_text())
    assert meta["method"] == "drllm" and meta["config"]["num_windows"] == 4 and meta["base_model"] == fingerprint(model)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "r").iterdir())

    h2 = retrofit.load(model, tmp_path / "r")
    assert h2.config.skip_bias == 0.25 and h2.config.bottleneck == 16
    loaded = h2.routers.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert h2.last_plans == plans
    # config overrides at load time are validated and win over the saved config
    h2.detach()
    assert retrofit.load(model, tmp_path / "r", skip_bias=1.0).config.skip_bias == 1.0


def test_wrong_model_corrupt_and_bad_values_are_rejected(tmp_path):
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    h.init_routers(seed=0)
    h.save(tmp_path / "r")
    h.detach()
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(ArtifactError, match="another base model.*weights_sha256"):
        retrofit.load(other, tmp_path / "r")
    with pytest.raises(ArtifactError, match="another base model.*num_layers"):
        retrofit.load(tiny_model("llama", num_hidden_layers=3), tmp_path / "r")
    with pytest.raises(ArtifactError, match="'drllm' artifact, not 'roma'"):
        load_artifact(tmp_path / "r", model, method="roma")
    with pytest.raises(ArtifactError, match="is not a retrofit artifact"):
        retrofit.load(model, tmp_path)
    (tmp_path / "r" / TENSORS_NAME).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="corrupt"):
        retrofit.load(model, tmp_path / "r")
    (tmp_path / "r" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        retrofit.load(model, tmp_path / "r")


def test_nan_routers_are_rejected(tmp_path):
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    h.init_routers(seed=0)
    with torch.no_grad():
        h.routers[1].fc1.weight[0, 0] = float("nan")
    h.save(tmp_path / "r")
    h.detach()
    with pytest.raises(ArtifactError, match="NaN"):
        retrofit.load(model, tmp_path / "r")


def test_window_means_spread_remainder_and_ignore_padding():
    # 10 real tokens, 3 windows: sizes 4/3/3 by floor(r*3/10) -> ranks 0-3, 4-6, 7-9; the remainder is kept.
    h = torch.arange(12, dtype=torch.float32).view(1, 12, 1)
    mask = torch.tensor([[0, 0] + [1] * 10])
    means, valid = window_means(h, mask, 3)
    assert valid.all()
    torch.testing.assert_close(means.view(-1), torch.tensor([3.5, 7.0, 10.0]))
    # fewer tokens than windows: empty windows are marked invalid, not averaged as zeros
    means, valid = window_means(h[:, :2], None, 4)
    assert valid.tolist() == [[True, False, True, False]]
    torch.testing.assert_close(means[0, valid[0], 0], torch.tensor([0.0, 1.0]))


def test_fingerprint_of_checkpoint_names_sorts_layers_and_names_what_is_missing():
    from retrofit.artifacts import fingerprint_of, tensor_digest

    model = tiny_model("llama")
    L, arch = model.config.num_hidden_layers, type(model).__name__
    sd = {n: tensor_digest(t) for n, t in model.state_dict().items()}
    # buffers a checkpoint may carry are left out wherever they come, also before the weights
    noise = {"model.rotary_emb.inv_freq": "x", "model.layers.1.self_attn.rotary_emb.inv_freq": "y"}
    assert fingerprint_of(arch, model.config, L, {**noise, **sd}) == fingerprint(model)
    # a tensor of a layer past the decoder's (e.g. a multi-token-prediction layer) is not a decoder layer
    extra = fingerprint_of(arch, model.config, L, {**sd, f"model.layers.{L}.mlp.weight": "z"})
    assert extra["layers_sha256"] == fingerprint(model)["layers_sha256"]
    assert extra["other_sha256"] != fingerprint(model)["other_sha256"]
    no_layer1 = {n: d for n, d in sd.items() if ".layers.1." not in n}
    with pytest.raises(ArtifactError, match=r"^the loaded weights lack decoder layers \[1\]$"):
        fingerprint_of(arch, model.config, L, no_layer1)
    only_layers = {n: d for n, d in sd.items() if ".layers." in n}
    with pytest.raises(ArtifactError, match=r"^the loaded weights lack the embedding / LM head$"):
        fingerprint_of(arch, model.config, L, only_layers)


@pytest.mark.parametrize("value, named", [(None, "null"), ([], "a list"), ("x", "a string"), (True, "a boolean"),
                                          (3, "an integer"), (1.5, "a number"), ({}, "an object")])
def test_schema_errors_name_the_json_type_found(value, named):
    from retrofit.artifacts import validate_meta

    with pytest.raises(ArtifactError) as e:  # the method's name must be a string
        validate_meta({"format_version": 1, "method": value, "config": {}, "base_model": {}}, "x/retrofit.json")
    if named != "a string":
        assert str(e.value).startswith(f"x/retrofit.json: method must be a method name such as 'drllm', not {named} ")
    if named != "an object":  # and the config an object
        with pytest.raises(ArtifactError) as e:
            validate_meta({"format_version": 1, "method": "drllm", "config": value, "base_model": {}},
                          "x/retrofit.json")
        assert str(e.value).startswith(f"x/retrofit.json: config must be an object of method options, not {named};")


def _fp(layers, other="o", **kw):
    from retrofit.artifacts import FINGERPRINT_VERSION

    fp = {"fingerprint_version": FINGERPRINT_VERSION, "architecture": "LlamaForCausalLM", "model_type": "llama",
          "num_layers": len(layers), "hidden_size": 8, "vocab_size": 10, "layers_sha256": list(layers),
          "other_sha256": other, "weights_sha256": "".join(layers) + other}
    fp.update(kw)
    return fp


@pytest.mark.parametrize("changed, other, said", [
    ([3], False, "the weights differ in decoder layer 3)"),
    ([1, 4], True, "the weights differ in decoder layers 1, 4 and the embedding / final norm / LM head)"),
    (list(range(10)), False, "decoder layers 0, 1, 2, 3, 4, 5, 6, 7 and 2 more)"),
    (list(range(9)), False, "decoder layers 0, 1, 2, 3, 4, 5, 6, 7 and 1 more)"),
    (list(range(8)), False, "decoder layers 0, 1, 2, 3, 4, 5, 6, 7)"),
    (list(range(11)), False, "the weights differ in every decoder layer)"),
    ([], True, "the weights differ in the embedding / final norm / LM head)"),
    (list(range(11)), True, "every decoder layer and the embedding / final norm / LM head (every tensor differs: "
                            "another model, or these weights in another precision than float32 / bfloat16, e.g. "
                            "float16 or quantised))"),
])
def test_fingerprint_mismatch_says_where_the_weights_differ(changed, other, said):
    from retrofit.artifacts import compare_fingerprint

    base = [f"l{i}" for i in range(11)]
    model = _fp([f"x{i}" if i in changed else h for i, h in enumerate(base)], other="p" if other else "o")
    with pytest.raises(ArtifactError) as e:
        compare_fingerprint(_fp(base), model, "runs/r")
    msg = str(e.value)
    assert msg.startswith("router artifact runs/r was made for another base model (weights_sha256: ") and said in msg
    assert msg.endswith(". Load it onto the model it was trained for, or re-run `retrofit train` for this one.")
    compare_fingerprint(_fp(base), _fp(base), "runs/r")  # the same model passes
    with pytest.raises(ArtifactError, match=r"^router artifact runs/r was saved by an older retrofit .*"
                                            r"upgrade_artifact\('runs/r', model\)"):
        compare_fingerprint({**_fp(base), "fingerprint_version": 1}, _fp(base), "runs/r")
    with pytest.raises(ArtifactError, match=r"\(num_layers: artifact 11 vs model 3; hidden_size: artifact 8 vs "
                                            r"model 16\)"):
        compare_fingerprint(_fp(base), _fp(base[:3], hidden_size=16), "runs/r")


def _good_meta():
    fp = _fp([f"l{i}" for i in range(3)])
    return {"format_version": 2, "method": "drllm", "config": {}, "extra": {}, "base_model": fp,
            "tensors": {"routers.0.fc1.weight": {"shape": [4, 8], "dtype": "float32"}}}


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.pop("config"), "lacks the key 'config'"),
    (lambda m: m.update(format_version=3), "has format_version 3, newer than this retrofit (2): upgrade retrofit."),
    (lambda m: m.update(format_version=0), "format_version must be a positive integer, not 0"),
    (lambda m: m.update(extra=[1]), "extra must be an object, not a list"),
    (lambda m: m.update(base_model="abc"), "base_model must be the base model's fingerprint (an object), not a string"),
    (lambda m: m["base_model"].update(num_layers="3"), "base_model.num_layers must be an integer, not a string"),
    (lambda m: m["base_model"].update(num_layers=True), "base_model.num_layers must be an integer, not a boolean"),
    (lambda m: m["base_model"].pop("vocab_size"), "base_model.vocab_size must be an integer, not null"),
    (lambda m: m["base_model"].update(fingerprint_version=1), "base_model.fingerprint_version must be 2"),
    (lambda m: m["base_model"].update(layers_sha256=["a", "b"]),
     "base_model.layers_sha256 must be a list of 3 strings"),
    (lambda m: m["base_model"].update(layers_sha256="abc"), "base_model.layers_sha256 must be a list of 3 strings"),
    (lambda m: m["base_model"].update(layers_sha256=["a", 2, "c"]),
     "base_model.layers_sha256 must be a list of 3 strings"),
    (lambda m: m["base_model"].update(other_sha256=None), "base_model.other_sha256 must be a string"),
    (lambda m: m.update(tensors=[]), "tensors must be an object {name: {shape, dtype}}, not a list"),
    (lambda m: m["tensors"].update(x={"shape": [2, -1], "dtype": "float32"}), "tensors['x'] must be"),
    (lambda m: m["tensors"].update(x={"shape": [2, True], "dtype": "float32"}), "tensors['x'] must be"),
    (lambda m: m["tensors"].update(x={"shape": "2", "dtype": "float32"}), "tensors['x'] must be"),
    (lambda m: m["tensors"].update(x={"shape": [2], "dtype": 32}), "tensors['x'] must be"),
    (lambda m: m["tensors"].update(x=[2]), "tensors['x'] must be"),
])
def test_schema_names_each_broken_key(edit, said):
    from retrofit.artifacts import validate_meta

    assert validate_meta(_good_meta(), "a/retrofit.json")["method"] == "drllm"
    ok = _good_meta()
    ok["tensors"]["empty"] = {"shape": [0], "dtype": "float32"}  # a zero-size tensor is a valid shape
    validate_meta(ok, "a/retrofit.json")
    meta = _good_meta()
    edit(meta)
    with pytest.raises(ArtifactError) as e:
        validate_meta(meta, "a/retrofit.json")
    assert str(e.value).startswith(f"a/retrofit.json{' ' if 'newer' in said else ': '}{said}"), str(e.value)


def test_fingerprint_format_is_frozen():
    """Artifacts on disk carry fingerprint version 2: the digests of fixed tensors must never change (a change
    would refuse every saved artifact), and they depend on the shape and a bfloat16 sample of the values."""
    from types import SimpleNamespace

    from retrofit.artifacts import SAMPLE, fingerprint_of, tensor_digest

    a = torch.arange(15, dtype=torch.float32).reshape(3, 5) / 7
    b = torch.linspace(-2, 2, 3 * SAMPLE + 1)  # longer than the sample: evenly spaced entries are digested
    assert tensor_digest(a) == "784f7b03b565a4ef" == tensor_digest(a.bfloat16())
    assert tensor_digest(a.reshape(5, 3)) == "75f48706bb17216f"  # same values, another shape
    assert tensor_digest(b) == "7d63dfae62a9bdea"
    cfg = SimpleNamespace(model_type="llama", hidden_size=8, vocab_size=10)
    digests = {"model.embed_tokens.weight": tensor_digest(a), "model.layers.0.mlp.weight": tensor_digest(b),
               "model.layers.1.mlp.weight": tensor_digest(a * 2), "model.norm.weight": tensor_digest(b * 3)}
    assert fingerprint_of("LlamaForCausalLM", cfg, 2, digests) == {
        "architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": 2, "hidden_size": 8,
        "vocab_size": 10, "fingerprint_version": 2, "weights_sha256": "1e5fecc973d4e4b6db4a0833c6858b95",
        "layers_sha256": ["24982b88cc269ed7", "03234ac50582e4de"], "other_sha256": "1bb03a8892a7bc32"}


def test_save_makes_nested_folders_and_names_the_method_in_both_files(tmp_path):
    from safetensors import safe_open

    from retrofit.artifacts import read_meta, save_artifact

    model = tiny_model("llama")
    path = tmp_path / "a" / "b" / "routers"
    save_artifact(path, "drllm", {"x": 1}, {"t": torch.ones(2)}, model)
    meta = read_meta(path)
    assert meta["method"] == "drllm" and meta["extra"] == {} and meta["config"] == {"x": 1}
    with safe_open(str(path / TENSORS_NAME), "pt") as f:
        assert f.metadata() == {"method": "drllm"}
    (path / CONFIG_NAME).unlink()
    with pytest.raises(ArtifactError) as e:
        read_meta(path)
    assert str(e.value) == (f"{path} is not a retrofit artifact: {CONFIG_NAME} is missing (expected a folder "
                            "written by handle.save() or `retrofit train`).")
    (path / CONFIG_NAME).write_text("[]")
    with pytest.raises(ArtifactError, match=f"^{path / CONFIG_NAME}: must be a JSON object, not a list"):
        read_meta(path)


def test_tensor_file_mismatch_names_missing_unlisted_and_changed_tensors(tmp_path):
    from safetensors.torch import save_file

    from retrofit.artifacts import save_artifact

    model = tiny_model("llama")
    tensors = {f"t{i}": torch.zeros(2) for i in range(7)}
    save_artifact(tmp_path / "a", "drllm", {}, tensors, model)
    bad = {f"t{i}": torch.zeros(2) for i in range(1, 7)} | {"t6": torch.zeros(3), "u": torch.zeros(1)}
    save_file(bad, str(tmp_path / "a" / TENSORS_NAME))
    with pytest.raises(ArtifactError) as e:
        load_artifact(tmp_path / "a")
    assert str(e.value) == (f"{tmp_path / 'a' / TENSORS_NAME} does not hold the tensors {CONFIG_NAME} lists (missing "
                            "['t0']; not listed ['u']; with another shape/dtype ['t6']); the artifact is corrupt: "
                            "save it again.")
    save_file({f"x{i}": torch.zeros(1) for i in range(7)}, str(tmp_path / "a" / TENSORS_NAME))
    with pytest.raises(ArtifactError, match=r"missing \['t0', 't1', 't2', 't3', 't4'\]; not listed \['x0', 'x1', "
                                            r"'x2', 'x3', 'x4'\]\)"):  # at most five names each
        load_artifact(tmp_path / "a")
