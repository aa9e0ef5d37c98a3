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


def _assert_stream_kept(got_h, got_r, hidden, residual, skip):
    """A skipping token leaves a split layer as (0, its stream): hidden + residual exactly as it came in."""
    import torch

    stream = hidden if residual is None else hidden + residual
    assert torch.equal(got_h[skip], torch.zeros_like(got_h[skip]))
    assert torch.equal(got_h[skip] + got_r[skip], stream[skip])


class _Proj:
    """A vLLM linear layer: forward(x) -> (x @ w, None); counts the tokens it was given."""

    def __init__(self, w):
        self.w, self.tokens = w, []

    def forward(self, x):
        self.tokens.append(x.shape[0])
        return x @ self.w, None

    def __call__(self, x):
        return self.forward(x)


class _Attention:
    """vLLM's LlamaAttention shape: qkv_proj, per-token work, an attention kernel over each request's own tokens
    (causal, per request, like paged attention), o_proj. Records the q/k/v the kernel was given."""

    def __init__(self, d, qsl, g):
        import torch

        self.d, self.qsl = d, qsl
        self.qkv_proj = _Proj(torch.randn(d, 3 * d, generator=g) / d ** 0.5)
        self.o_proj = _Proj(torch.randn(d, d, generator=g) / d ** 0.5)
        self.seen = []

    def __call__(self, positions, hidden_states):
        import torch

        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.d] * 3, dim=-1)
        q = q * torch.cos(positions[:, None].float())  # a per-token "rotary" step
        self.seen.append(qkv)
        out = torch.empty_like(q)
        for s, e in zip(self.qsl[:-1], self.qsl[1:]):
            a = (q[s:e] @ k[s:e].T).masked_fill(torch.ones(e - s, e - s).triu(1).bool(), float("-inf"))
            out[s:e] = a.softmax(-1) @ v[s:e]
        o, _ = self.o_proj(out)
        return o


class _ProjLayer(_Layer):
    def __init__(self, d, seed, qsl):
        import torch

        super().__init__(d, seed)
        self.self_attn = _Attention(d, qsl, torch.Generator().manual_seed(seed + 7))


def test_projection_sub_batch_runs_qkv_and_o_on_the_running_tokens_only():
    """With the projections installed, a split layer's q/k/v and o products see only the running tokens (the
    skipping ones enter the kernel as zeros), and the running tokens' outputs equal the whole layer's."""
    pytest.importorskip("vllm")
    import torch

    from retrofit.serve.vllm_model import _has_projections, _RowSubset, _sub_batch_layer, install_projection_sub_batches

    T, d, qsl = 9, 16, [0, 4, 7, 9]
    assert _has_projections(_ProjLayer(d, 0, qsl).self_attn) and not _has_projections(_Layer(d, 0).self_attn)
    positions = torch.cat([torch.arange(4), torch.arange(3), torch.arange(2)])
    g = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    run, skip = torch.tensor([0, 1, 2, 3, 7, 8]), torch.tensor([4, 5, 6])  # the middle request skips
    for res in (residual, None):  # before the first executed layer vLLM's residual is None
        layer, rows = _ProjLayer(d, 0, qsl), _RowSubset()
        full_h, full_r = layer.forward(positions, hidden.clone(), None if res is None else res.clone())
        install_projection_sub_batches(layer.self_attn, rows)
        with pytest.raises(RuntimeError, match="already sub-batched"):
            install_projection_sub_batches(layer.self_attn, rows)
        layer.self_attn.qkv_proj.tokens.clear(), layer.self_attn.o_proj.tokens.clear()
        got_h, got_r = _sub_batch_layer(layer, positions, hidden.clone(), None if res is None else res.clone(),
                                        run, skip, rows)
        assert layer.self_attn.qkv_proj.tokens == [6] and layer.self_attn.o_proj.tokens == [6]
        assert rows.idx is None  # reset after the layer: an unsplit call runs vLLM's own projections
        assert torch.equal(layer.self_attn.seen[-1][skip], torch.zeros(3, 3 * d))
        torch.testing.assert_close(got_h[run], full_h[run], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_r[run], full_r[run], rtol=1e-5, atol=1e-6)
        _assert_stream_kept(got_h, got_r, hidden, res, skip)
        # without the installed projections only the MLP half is a sub-batch: the same outputs
        plain = _ProjLayer(d, 0, qsl)
        alt_h, alt_r = _sub_batch_layer(plain, positions, hidden.clone(), None if res is None else res.clone(),
                                        run, skip, rows)
        assert plain.self_attn.qkv_proj.tokens == [T]
        torch.testing.assert_close(alt_h, got_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alt_r, got_r, rtol=1e-5, atol=1e-6)
        again = layer.forward(positions, hidden.clone(), None if res is None else res.clone())
        assert layer.self_attn.qkv_proj.tokens[-1] == T  # unset: the projections see every token
        torch.testing.assert_close(again[0], full_h, rtol=1e-6, atol=1e-7)


def test_mlp_sub_batch_equals_the_whole_layer_for_running_tokens_and_keeps_the_rest(tmp_path):
    pytest.importorskip("vllm")
    import torch

    from retrofit.core.plans import EXECUTE, SKIP
    from retrofit.serve.vllm_model import RetrofitController, _splittable, _Step, _sub_batch_layer

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
        for run_idx, skip_idx in (splits[1], splits[8]):  # exact, and padded with skipping tokens
            got_h, got_r = _sub_batch_layer(layer, positions, hidden.clone(), None if res is None else res.clone(),
                                            run_idx, skip_idx)
            torch.testing.assert_close(got_h[run], full_h[run], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_r[run], full_r[run], rtol=1e-5, atol=1e-6)
            _assert_stream_kept(got_h, got_r, hidden, res, skip)
    with pytest.raises(ServeConfigError, match="sub_batch must be true or false, got 'yes'"):
        parse_serve_config({"allow_request_plans": True, "sub_batch": "yes"})
    assert not parse_serve_config({"allow_request_plans": True, "sub_batch": False}).sub_batch
    for bad in (0, True, 2.0):
        with pytest.raises(ServeConfigError, match="sub_batch_multiple must be a positive integer"):
            parse_serve_config({"allow_request_plans": True, "sub_batch_multiple": bad})


@pytest.mark.parametrize("query_lens", [(3, 2, 4), (1, 1, 1)])
def test_cpu_sub_metadata_attends_the_running_requests_as_the_whole_step_does(query_lens):
    """The whole-layer sub-batch's attention metadata: vLLM's CPU attention kernel over just requests 0 and 2
    (prefill chunks on cached context, and decoding) gives their rows of the whole step's output."""
    pytest.importorskip("vllm")
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata, _get_attn_isa

    from retrofit.serve.vllm_model import _cpu_sub_metadata

    heads, kv_heads, hd, bs = 4, 2, 32, 16
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)  # its __init__ wants a whole vLLM config
    impl.num_heads, impl.num_kv_heads, impl.head_size, impl.scale = heads, kv_heads, hd, hd ** -0.5
    impl.sliding_window, impl.kv_cache_dtype = -1, "auto"
    attn = type("Attn", (), {"impl": impl, "isa": _get_attn_isa(torch.float32, bs, hd, "auto")})()
    g = torch.Generator().manual_seed(0)
    seq_lens = torch.tensor([10, 7, 12], dtype=torch.int32)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    T = qsl[-1]
    key_cache = torch.randn(3, kv_heads, bs, hd, generator=g)
    value_cache = torch.randn(3, kv_heads, bs, hd, generator=g)
    block_table = torch.tensor([[0], [1], [2]], dtype=torch.int32)
    slots = torch.cat([r * bs + torch.arange(int(seq_lens[r]) - q, int(seq_lens[r])) for r, q in enumerate(query_lens)])
    qsl_t = torch.tensor(qsl, dtype=torch.int32)

    def run(md, query):
        out = torch.empty_like(query)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=md.query_start_loc, seq_lens=md.seq_lens, scale=impl.scale, causal=True,
            alibi_slopes=None, sliding_window=impl.sliding_window, block_table=md.block_table, softcap=0,
            scheduler_metadata=md.scheduler_metadata, s_aux=None, dynamic_causal=None, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype="auto")
        return out

    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=3, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, seq_lens=seq_lens, dtype=torch.float32,
        query_start_loc=qsl_t, causal=True, sliding_window_size=-1, isa=attn.isa, enable_kv_split=True)
    md = CPUAttentionMetadata(num_actual_tokens=T, max_query_len=max(query_lens), query_start_loc=qsl_t,
                              max_seq_len=12, seq_lens=seq_lens, block_table=block_table, slot_mapping=slots,
                              scheduler_metadata=sched)
    query = torch.randn(T, heads, hd, generator=g)
    whole = run(md, query)
    run_rows = torch.tensor([True, False, True])
    run_idx = torch.cat([torch.arange(qsl[0], qsl[1]), torch.arange(qsl[2], qsl[3])])
    sub, sub_slots = _cpu_sub_metadata(attn, md, slots, qsl, run_rows, run_idx, torch.float32)
    assert sub.num_actual_tokens == run_idx.numel() and sub.max_query_len == max(query_lens[0], query_lens[2])
    assert sub.query_start_loc.tolist() == [0, query_lens[0], query_lens[0] + query_lens[2]]
    assert sub.seq_lens.tolist() == [10, 12] and sub.block_table.tolist() == [[0], [2]] and sub.max_seq_len == 12
    assert torch.equal(sub_slots, slots[run_idx]) and torch.equal(sub.slot_mapping, slots[run_idx])
    part = run(sub, query[run_idx].contiguous())
    torch.testing.assert_close(part, whole[run_idx], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not vLLM's CPU attention metadata"):
        _cpu_sub_metadata(attn, object(), slots, qsl, run_rows, run_idx, torch.float32)


def test_whole_sub_batch_swaps_the_layers_metadata_only_while_it_runs_and_keeps_the_skipping_streams():
    """_whole_sub_batch alone: the layer's forward sees just the running tokens, with the sub-batch's attention
    metadata and KV-cache slots in place of the step's for that layer only; both are put back afterwards (also
    when the forward raises); running tokens get the forward's (hidden, residual), the others (0, their stream)."""
    pytest.importorskip("vllm")
    import torch

    from retrofit.serve.vllm_model import _whole_sub_batch

    T, d = 6, 4
    g = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    positions = torch.arange(10, 10 + T)
    run_idx = torch.tensor([0, 2, 3])
    step_md, step_slots, sub_md, sub_slots = object(), torch.arange(T), object(), torch.tensor([7, 8, 9])
    other_md = object()
    fc = SimpleNamespace(attn_metadata={"l1": step_md, "l2": other_md},
                         slot_mapping={"l1": step_slots, "l2": torch.arange(T)})
    seen = []

    def forward(pos, h, r):
        seen.append((pos.clone(), h.clone(), None if r is None else r.clone(), fc.attn_metadata["l1"],
                     fc.slot_mapping["l1"], fc.attn_metadata["l2"]))
        return 2 * h + pos[:, None], h - (0 if r is None else r)

    for res in (residual, None):
        seen.clear()
        out_h, out_r = _whole_sub_batch(forward, positions, hidden, res, run_idx, fc, "l1", sub_md, sub_slots)
        pos, h_in, r_in, md_in, slots_in, md2_in = seen[0]
        assert torch.equal(pos, positions[run_idx]) and torch.equal(h_in, hidden[run_idx])
        assert (r_in is None) == (res is None) and (res is None or torch.equal(r_in, res[run_idx]))
        assert md_in is sub_md and slots_in is sub_slots and md2_in is other_md  # this layer's entries only
        assert fc.attn_metadata["l1"] is step_md and fc.slot_mapping["l1"] is step_slots  # put back
        want_h, want_r = forward(positions[run_idx], hidden[run_idx], None if res is None else res[run_idx])
        skip = torch.tensor([1, 4, 5])
        stream = hidden if res is None else hidden + res
        assert torch.equal(out_h[run_idx], want_h) and torch.equal(out_r[run_idx], want_r)
        assert torch.equal(out_h[skip], torch.zeros(3, d)) and torch.equal(out_r[skip], stream[skip])

    def broken(pos, h, r):
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        _whole_sub_batch(broken, positions, hidden, residual, run_idx, fc, "l1", sub_md, sub_slots)
    assert fc.attn_metadata["l1"] is step_md and fc.slot_mapping["l1"] is step_slots
