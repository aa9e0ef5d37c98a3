"""The vLLM plugin's serve config and request arguments, and the model-side refusals (no engine started)."""

import json
from types import SimpleNamespace

import pytest

from retrofit.serve.config import (ENV, ServeConfigError, find_serve_config, parse_plan, parse_request_args,
                                   parse_serve_config)


def test_plan_strings_and_lists():
    assert parse_plan("ese") == ["execute", "skip", "execute"]
    assert parse_plan(["skip", 1, "execute"]) == ["skip", "execute", "execute"]
    with pytest.raises(ServeConfigError, match="letters"):
        parse_plan("exq")
    with pytest.raises(ServeConfigError, match="3 entries but the model has 4"):
        parse_plan("eee", 4)


def test_serve_config_validation(tmp_path):
    cfg = parse_serve_config({"artifacts": {"a": str(tmp_path), "b": {"path": str(tmp_path), "skip_bias": 0.5}},
                              "default": "a"})
    assert not cfg.static and cfg.default == "a" and cfg.artifacts["b"].overrides == {"skip_bias": 0.5}
    assert parse_serve_config({"plan": "ees"}).static
    assert parse_serve_config({"plan": "ees"}).plan == ["execute", "execute", "skip"]
    with pytest.raises(ServeConfigError, match="unknown keys"):
        parse_serve_config({"plans": []})
    with pytest.raises(ServeConfigError, match="default 'x'"):
        parse_serve_config({"artifacts": {"a": "p"}, "default": "x"})
    with pytest.raises(ServeConfigError, match="reserved"):
        parse_serve_config({"artifacts": {"none": "p"}})
    with pytest.raises(ServeConfigError, match="either"):
        parse_serve_config({"artifacts": {"a": "p"}, "plan": "e"})
    with pytest.raises(ServeConfigError, match="not valid JSON"):
        parse_serve_config("{oops")
    f = tmp_path / "serve.json"
    f.write_text(json.dumps({"plan": "se"}))
    assert parse_serve_config(str(f)).plan == ["skip", "execute"]


def test_find_serve_config_prefers_hf_overrides(monkeypatch):
    monkeypatch.setenv(ENV, json.dumps({"plan": "ss"}))
    assert find_serve_config(SimpleNamespace(retrofit={"plan": "ee"})).plan == ["execute", "execute"]
    assert find_serve_config(SimpleNamespace()).plan == ["skip", "skip"]
    monkeypatch.delenv(ENV)
    assert find_serve_config(SimpleNamespace()) is None


def test_request_args():
    cfg = parse_serve_config({"artifacts": {"a": "p"}, "allow_request_plans": True})
    assert parse_request_args({}, cfg).kind == "default"
    assert parse_request_args({"retrofit": "none"}, cfg).kind == "none"
    assert parse_request_args({"retrofit": "a"}, cfg).name == "a"
    assert parse_request_args({"retrofit_plan": "se"}, cfg, 2).plan == ("skip", "execute")
    with pytest.raises(ServeConfigError, match="unknown retrofit artifact 'b'"):
        parse_request_args({"retrofit": "b"}, cfg)
    with pytest.raises(ServeConfigError, match="repeat"):
        parse_request_args({"retrofit_plan": "re"}, cfg, 2)
    with pytest.raises(ServeConfigError, match="either"):
        parse_request_args({"retrofit": "a", "retrofit_plan": "e"}, cfg)
    with pytest.raises(ServeConfigError, match="allow_request_plans"):
        parse_request_args({"retrofit_plan": "e"}, parse_serve_config({"artifacts": {"a": "p"}}))


def _vllm_config(retrofit, mode=0, prefix=False, chunked=False):
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(retrofit=retrofit)),
        compilation_config=SimpleNamespace(mode=mode),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked))


def _artifacts(tmp_path):
    """A routers artifact (repeat allowed, as `retrofit train` writes them) and a static-plan artifact."""
    import retrofit
    from retrofit.testing import tiny_model

    model = tiny_model("llama", num_hidden_layers=4)
    h = retrofit.attach(model, "drllm")
    h.init_routers(seed=0)
    h.save(tmp_path / "routers")
    h.detach()
    h = retrofit.attach(model, "drllm", plan=["execute", "skip", "execute", "execute"])
    h.save(tmp_path / "plan")
    h.detach()
    return model


def test_controller_refusals(tmp_path):
    pytest.importorskip("vllm")
    from retrofit.serve.vllm_model import RetrofitController

    model = _artifacts(tmp_path)
    L, d = 4, model.config.hidden_size
    routers = str(tmp_path / "routers")
    with pytest.raises(ServeConfigError, match="allow_repeat': false"):
        RetrofitController(_vllm_config({"artifacts": {"r": routers}}), L, d)
    ok = {"artifacts": {"r": {"path": routers, "allow_repeat": False}, "p": str(tmp_path / "plan")}}
    ctl = RetrofitController(_vllm_config(ok), L, d)
    assert ctl.dynamic and ctl.served["p"].plan.tolist() == [1, 0, 1, 1]
    assert ctl.served["r"].bias.tolist()[2] == float("-inf")  # repeat never chosen
    with pytest.raises(ServeConfigError, match="enforce_eager"):
        RetrofitController(_vllm_config(ok, mode=3), L, d)
    with pytest.raises(ServeConfigError, match="prefix caching"):
        RetrofitController(_vllm_config(ok, prefix=True), L, d)
    with pytest.raises(ServeConfigError, match="chunked"):
        RetrofitController(_vllm_config(ok, chunked=True), L, d)
    with pytest.raises(ServeConfigError, match="repeat"):
        RetrofitController(_vllm_config({"plan": "eree"}), L, d)
    static = RetrofitController(_vllm_config({"plan": "esee"}, mode=3, prefix=True, chunked=True), L, d)
    assert not static.dynamic and static.static_skip == [False, True, False, False]
    with pytest.raises(ServeConfigError, match="needs a retrofit serve config"):
        RetrofitController(_vllm_config(None), L, d)


def test_served_weights_fingerprint_is_checked(tmp_path):
    """The plugin digests every weight vLLM loads (HF checkpoint names) into the same fingerprint as
    retrofit.artifacts.fingerprint: the same weights (also in bfloat16, also with a tied LM head saved twice)
    pass; one changed middle tensor or a missing layer is refused."""
    pytest.importorskip("vllm")
    import torch

    from retrofit.artifacts import ArtifactError, tensor_digest
    from retrofit.serve.vllm_model import RetrofitController

    model = _artifacts(tmp_path)
    hf = model.config
    hf.retrofit = {"artifacts": {"p": str(tmp_path / "plan")}}
    vcfg = _vllm_config(None)
    vcfg.model_config.hf_config = hf
    sd = model.state_dict()
    ctl = RetrofitController(vcfg, 4, hf.hidden_size)
    ctl.fingerprint_digests = {n: tensor_digest(t) for n, t in sd.items()}
    ctl.check_fingerprints(hf, "LlamaForCausalLM")  # the same weights: accepted
    ctl.fingerprint_digests = {n: tensor_digest(t.to(torch.bfloat16)) for n, t in sd.items()}
    ctl.fingerprint_digests["model.layers.0.self_attn.rotary_emb.inv_freq"] = "x"  # a buffer: ignored
    ctl.check_fingerprints(hf, "LlamaForCausalLM")  # bfloat16 copies of them: accepted
    changed = dict(sd)
    changed["model.layers.2.mlp.down_proj.weight"] = sd["model.layers.2.mlp.down_proj.weight"] * 1.01
    ctl.fingerprint_digests = {n: tensor_digest(t) for n, t in changed.items()}
    with pytest.raises(ArtifactError, match="made for another base model.*decoder layer 2"):
        ctl.check_fingerprints(hf, "LlamaForCausalLM")
    ctl.fingerprint_digests = {n: tensor_digest(t) for n, t in sd.items() if ".layers.3." not in n}
    with pytest.raises(ArtifactError, match="cannot be checked"):
        ctl.check_fingerprints(hf, "LlamaForCausalLM")


class _FusedNorm:
    """vLLM's RMSNorm semantics: norm(x), or with a residual the fused add-norm that writes its inputs in place
    and returns (norm(x + residual), x + residual)."""

    def __init__(self, w):
        self.w = w

    def _n(self, x):
        import torch

        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w

    def __call__(self, x, residual=None):
        if residual is None:
            return self._n(x)
        residual.add_(x)
        x.copy_(self._n(residual))
        return x, residual


class _Layer:
    """A vLLM-shaped decoder layer whose attention mixes tokens (a causal running mean), to show it runs on all."""

    def __init__(self, d, seed):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.input_layernorm = _FusedNorm(torch.rand(d, generator=g) + 0.5)
        self.post_attention_layernorm = _FusedNorm(torch.rand(d, generator=g) + 0.5)
        wa, w1, w2 = (torch.randn(d, d, generator=g) / d ** 0.5 for _ in range(3))
        self.self_attn = lambda positions, hidden_states: (hidden_states.cumsum(0) / (positions[:, None] + 1)) @ wa
        self.mlp = lambda h: torch.relu(h @ w1) @ w2

    def forward(self, positions, hidden_states, residual):  # vLLM's LlamaDecoderLayer.forward
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def test_mlp_sub_batch_equals_the_whole_layer_for_running_tokens_and_keeps_the_rest(tmp_path):
    pytest.importorskip("vllm")
    import torch

    from retrofit.core.plans import EXECUTE, SKIP
    from retrofit.serve.vllm_model import RetrofitController, _mlp_sub_batch, _passthrough, _splittable, _Step

    T, d = 9, 16
    layer = _Layer(d, 0)
    assert _splittable(layer) and not _splittable(torch.nn.Linear(2, 2))
    positions = torch.arange(T)
    g = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    # three requests of 4, 3 and 2 tokens (qsl), the middle one skips the layer
    acts = torch.tensor([[EXECUTE] * 4, [EXECUTE, SKIP, EXECUTE, EXECUTE], [EXECUTE] * 4])
    splits = {}
    for m in (1, 4, 8, 16):
        ctl = RetrofitController(_vllm_config({"allow_request_plans": True, "sub_batch_multiple": m}), 4, d)
        assert ctl.sub_batch and ctl.sub_batch_multiple == m
        st = _Step(acts, [0, 4, 7, 9], [], [None] * 3)
        splits[m] = ctl._split(st, 1, T, hidden.device)
        assert ctl._split(st, 1, T, hidden.device) is splits[m]  # one split per pattern and step
    assert [x.tolist() for x in splits[1]] == [[0, 1, 2, 3, 7, 8], [4, 5, 6]]
    # padded with the first skipping tokens to a multiple; a sub-batch of every token is no split
    assert [x.tolist() for x in splits[4]] == [x.tolist() for x in splits[8]] == [[0, 1, 2, 3, 4, 5, 7, 8], [4, 5, 6]]
    assert splits[16] is None
    run, skip = splits[1]
    for res in (residual, None):  # before the first executed layer vLLM's residual is None
        full_h, full_r = layer.forward(positions, hidden.clone(), None if res is None else res.clone())
        keep_h, keep_r = _passthrough(hidden.clone(), None if res is None else res.clone())
        for run_idx, skip_idx in (splits[1], splits[8]):
            got_h, got_r = _mlp_sub_batch(layer, positions, hidden.clone(), None if res is None else res.clone(),
                                          run_idx, skip_idx)
            torch.testing.assert_close(got_h[run], full_h[run], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_r[run], full_r[run], rtol=1e-5, atol=1e-6)
            assert torch.equal(got_h[skip], keep_h[skip]) and torch.equal(got_r[skip], keep_r[skip])
    with pytest.raises(ServeConfigError, match="sub_batch must be true or false, got 'yes'"):
        parse_serve_config({"allow_request_plans": True, "sub_batch": "yes"})
    assert not parse_serve_config({"allow_request_plans": True, "sub_batch": False}).sub_batch
    for bad in (0, True, 2.0):
        with pytest.raises(ServeConfigError, match="sub_batch_multiple must be a positive integer"):
            parse_serve_config({"allow_request_plans": True, "sub_batch_multiple": bad})
