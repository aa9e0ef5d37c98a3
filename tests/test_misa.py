"""MISA (indexer-head routing for DeepSeek Sparse Attention): method on tiny DSA models + kernels vs reference."""

import pytest
import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.kernels import misa as K
from retrofit.testing import DSA_FAMILIES, tiny_model

SEQ = 72  # > index_topk (8) and several blocks of 8


def _model(family):
    return tiny_model(family, max_position_embeddings=512)


def _capture_indices(model, ids):
    caps = {}
    hooks = [ix.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__(i, o.clone()))
             for i, ix in get_adapter(model).indexers(model).items()]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return logits, caps


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_full_heads_bit_identical_and_detach_restores(family):
    model = _model(family)
    ids = torch.randint(3, 128, (2, SEQ))
    before = {n: p.clone() for n, p in model.named_parameters()}
    ref_logits, ref_idx = _capture_indices(model, ids)
    H = model.config.index_n_heads
    handle = retrofit.attach(model, "misa", active_heads=H, block_size=8, kernel="reference")
    logits, idx = _capture_indices(model, ids)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(idx[i], ref_idx[i]) for i in ref_idx)
    assert idx[0].dtype == torch.int32 and idx[0].shape == (2, SEQ, model.config.index_topk)
    # active_heads above n_heads is the dense indexer too; MISA's stats count the same FLOPs
    assert handle.stats()["flops_ratio"] == pytest.approx(1.0)
    handle.detach()
    for ix in get_adapter(model).indexers(model).values():
        assert "forward" not in ix.__dict__
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("router", ["blockmean", "moments"])
@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_routed_outputs_close_and_hierarchical_recovers_more(family, router):
    model = _model(family)
    ids = torch.randint(3, 128, (2, SEQ))
    ref_logits, _ = _capture_indices(model, ids)
    res = {}
    for name, kw in {"misa": {}, "hier": {"hierarchical": True, "candidates": 16}}.items():
        h = retrofit.attach(model, "misa", active_heads=4, block_size=8, measure=True, router=router, **kw)
        with torch.no_grad():
            logits = model(ids).logits
        st = h.stats()
        h.detach()
        res[name] = (logits, st)
    # random token selection inside the causal prefix, as a control for "close"
    idxs = get_adapter(model).indexers(model)

    def rand_forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                     past_key_values=None):
        B, S, T = attention_mask.shape
        noise = torch.rand(B, S, T).masked_fill(~K.mask_info(attention_mask)[0], -1.0)
        return noise.topk(min(self.index_topk, T), -1).indices.to(torch.int32)

    import types
    for ix in idxs.values():
        ix.forward = types.MethodType(rand_forward, ix)
    with torch.no_grad():
        rand_logits = model(ids).logits
    for ix in idxs.values():
        del ix.forward

    def err(x):
        return float((x - ref_logits).norm() / ref_logits.norm())

    misa_logits, st = res["misa"]
    hier_logits, st_h = res["hier"]
    assert err(misa_logits) < 0.75 * err(rand_logits)
    assert torch.nn.functional.cosine_similarity(misa_logits.flatten(), ref_logits.flatten(), 0) > 0.9
    assert 0.6 < st["recall"] < 0.95  # routed: some of the dense selection is lost ...
    assert st_h["recall"] > st["recall"] + 0.05  # ... and the hierarchical re-score recovers tokens
    assert err(hier_logits) < err(misa_logits)
    assert len(st["layers"]) == 4
    assert all(0 <= v["recall"] <= 1 for v in st["layers"].values())
    if router == "blockmean":
        assert st["flops_ratio"] > 1.5
    else:  # the moment router costs O(H D^2) per query: at 16-dim heads and 72 tokens it saves nothing; the
        # stats count exactly what kernels.misa.indexer_flops says for these prefixes
        qpos = torch.arange(SEQ)
        H, D = model.config.index_n_heads, model.config.index_head_dim
        want = K.indexer_flops(qpos, H, D) / K.indexer_flops(qpos, H, D, 4, 8, router="moments", topk=8)
        assert st["flops_ratio"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_routing_is_causal_cached_decode_equals_full_forward(family):
    from transformers import DynamicCache

    model = _model(family)
    ids = torch.randint(3, 128, (1, 40))
    h = retrofit.attach(model, "misa", active_heads=3, block_size=8)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :30], past_key_values=cache, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(30, 40):
            out = model(ids[:, t: t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    h.detach()
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 29:39], atol=1e-4, rtol=1e-4)


def test_config_validation_and_errors(tmp_path):
    with pytest.raises(ValueError, match="active_heads"):
        retrofit.attach(_model("deepseek_v32"), "misa", active_heads=0)
    with pytest.raises(ValueError, match="kernel"):
        retrofit.attach(_model("deepseek_v32"), "misa", kernel="cuda")
    with pytest.raises(TypeError, match="unknown option"):
        retrofit.attach(_model("deepseek_v32"), "misa", heads=3)
    with pytest.raises(ValueError, match="candidates"):
        retrofit.attach(_model("deepseek_v32"), "misa", hierarchical=True, candidates=4)
    with pytest.raises(ValueError, match="no DeepSeek-Sparse-Attention indexer"):
        retrofit.attach(tiny_model("llama"), "misa")
    model = _model("glm_moe_dsa")
    h = retrofit.attach(model, "misa", active_heads=3, block_size=16, hierarchical=True, candidates=32)
    h.save(tmp_path / "misa")
    h.detach()
    h2 = retrofit.load(model, tmp_path / "misa")
    assert (h2.config.active_heads, h2.config.block_size, h2.config.candidates) == (3, 16, 32)
    h2.detach()
    with pytest.raises(retrofit.ArtifactError, match="another base model"):
        retrofit.load(_model("deepseek_v32"), tmp_path / "misa")


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
def _rand(S=300, T=None, H=16, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or S
    q = torch.randn(S, H, D, generator=g)
    k = torch.randn(T, D, generator=g)
    # a few heads carry most of the weight, as in trained indexers
    w = torch.randn(S, H, generator=g) * torch.linspace(0.1, 2.0, H)
    qpos = torch.arange(T - S, T)
    return q, w, k, qpos


def _naive_head_scores(q, w, k, qpos, B, scale):
    S, H, D = q.shape
    E = torch.zeros(S, H)
    for t in range(S):
        n = int(qpos[t]) + 1
        for b0 in range(0, n, B):
            kb = k[b0: min(b0 + B, n)].mean(0)  # a partial block is averaged over its real length
            E[t] += (w[t] * torch.relu(q[t] @ kb * scale)).abs()
    return E


def test_head_scores_match_naive_blocks():
    q, w, k, qpos = _rand(S=40, T=70, H=6, D=8)
    E = K.head_scores(q, w, k, qpos, 16, 0.3)
    torch.testing.assert_close(E, _naive_head_scores(q, w, k, qpos, 16, 0.3), rtol=1e-4, atol=1e-5)
    idx = K.route_heads(E, 3)
    assert idx.shape == (40, 3) and bool((idx[:, 1:] > idx[:, :-1]).all())
    assert torch.equal(K.route_heads(E, 6), torch.arange(6).expand(40, 6))


@pytest.mark.parametrize("hier", [False, True])
def test_chunked_torch_path_matches_reference(hier):
    q, w, k, qpos = _rand()
    scale, topk, cand = 32**-0.5, 20, 60
    E = K.head_scores(q, w, k, qpos, 32, scale)
    head_idx = K.route_heads(E, 4)
    mask = torch.arange(k.shape[0])[None, :] <= qpos[:, None]
    ref = K.routed_scores_reference(q[None], w[None], k[None], head_idx[None], scale, mask[None])[0]
    if hier:  # reference MISA-dagger: top-k' by routed score, all-head dense score among them
        dense = K.routed_scores_reference(q[None], w[None], k[None], torch.arange(16).expand(1, 300, 16), scale,
                                          mask[None])[0]
        cidx = ref.topk(cand, -1).indices
        ref = torch.full_like(ref, float("-inf")).scatter(1, cidx, torch.gather(dense, 1, cidx))
        ref = ref.masked_fill(~mask, float("-inf"))
    want = ref.topk(topk, -1)
    got = K.routed_topk_torch(q, w, k, head_idx, qpos, topk, scale, candidates=cand if hier else None, chunk=37)
    if hier:  # rounding (scale folded into the weights) may swap a candidate at the k' boundary
        assert K.recall(got, want.indices, qpos) > 0.99
    else:  # same selected sets (compare the scores of the picks: ties may order differently)
        torch.testing.assert_close(torch.gather(ref, 1, got).sort(-1).values, want.values.sort(-1).values)
    # dense through the same path equals the reference with all heads
    dense_got = K.dense_topk(q, w, k, qpos, topk, scale)
    dense_ref = K.routed_scores_reference(q[None], w[None], k[None], torch.arange(16).expand(1, 300, 16), scale,
                                          mask[None])[0]
    torch.testing.assert_close(torch.gather(dense_ref, 1, dense_got).sort(-1).values,
                               dense_ref.topk(topk, -1).values.sort(-1).values)


def test_recall_and_flops():
    ref = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    sel = torch.tensor([[3, 2, 9, 8], [4, 5, 6, 7]])
    assert K.recall(sel, ref) == pytest.approx(0.75)
    # query 0 sees only keys 0..1: DSA's filler picks 2, 3 do not count
    assert K.recall(torch.tensor([[1, 0, 7, 8]]), torch.tensor([[0, 1, 2, 3]]), torch.tensor([1])) == 1.0
    qpos = torch.arange(32767, 32768)
    dense = K.indexer_flops(qpos, 64, 128)
    misa = K.indexer_flops(qpos, 64, 128, active_heads=8, block_size=1024)
    assert dense == 32768 * 64 * 260
    assert 7.0 < dense / misa < 8.0
    hier = K.indexer_flops(qpos, 64, 128, active_heads=8, block_size=1024, hierarchical=True, candidates=8192)
    assert hier > misa


@pytest.mark.skipif(not K.TRITON_INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets "
                    "it; the test extra installs triton)")
@pytest.mark.parametrize("blocks", [{}, {"block_m": 16, "block_n": 16}])
def test_triton_kernel_matches_reference_in_the_interpreter(blocks):
    """The Triton kernel itself, run by Triton's interpreter on CPU tensors: partial tiles (40 queries, 70 keys),
    the causal tile skip (16 x 16 tiles), sub-heads and all heads, fp32 and fp16 (bf16 needs a GPU: numpy has
    no bfloat16)."""
    q, w, k, qpos = _rand(S=40, T=70, H=4, D=16)
    scale = 16**-0.5
    head_idx = K.route_heads(K.head_scores(q, w, k, qpos, 16, scale), 2)
    mask = torch.arange(70)[None, :] <= qpos[:, None]
    ref = K.routed_scores_reference(q[None], w[None], k[None], head_idx[None], scale, mask[None])[0]
    got = K.routed_scores_triton(q, w, k, head_idx, qpos, scale, **blocks)
    assert got.dtype == torch.float32 and got.shape == (40, 70)
    assert torch.equal(torch.isinf(got), ~mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    dense = K.routed_scores_reference(q[None], w[None], k[None], torch.arange(4).expand(1, 40, 4), scale,
                                      mask[None])[0]
    torch.testing.assert_close(K.routed_scores_triton(q, w, k, None, qpos, scale, **blocks), dense,
                               rtol=1e-5, atol=1e-5)
    got16 = K.routed_scores_triton(q.half(), w, k.half(), head_idx, qpos, scale, **blocks)
    fin = torch.isfinite(ref)
    assert ((got16[fin] - ref[fin]).abs().max() / ref[fin].abs().max()) < 3e-3
    # keys in another dtype than the queries are cast to the queries' dtype: the same scores
    assert torch.equal(K.routed_scores_triton(q.half(), w, k, head_idx, qpos, scale, **blocks), got16)
    # int64 head indices and positions, non-contiguous inputs: the wrapper converts them
    got_nc = K.routed_scores_triton(q.transpose(0, 1).contiguous().transpose(0, 1), w, k, head_idx.long(),
                                    qpos.long(), scale, **blocks)
    torch.testing.assert_close(got_nc, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_dim 24 must be a power of two"):
        K.routed_scores_triton(q[..., :24].repeat(1, 1, 2)[..., :24], w, k.repeat(1, 2)[:, :24], head_idx, qpos,
                               scale)


@pytest.mark.skipif(not K.TRITON_INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets "
                    "it; the test extra installs triton)")
def test_triton_dispatch_selects_the_same_keys_as_the_torch_path():
    """routed_topk(kernel='triton') (scores from the kernel, then ties, validity, the linear remainder and the
    candidate re-scoring in torch) picks the keys the torch path picks; kernel='auto' on CPU stays on torch."""
    q, w, k, qpos = _rand(S=40, T=70, H=4, D=16, seed=1)
    scale = 16**-0.5
    head_idx = K.route_heads(K.head_scores(q, w, k, qpos, 16, scale), 2)
    lin = torch.randn(40, 16) * 0.1
    valid = torch.rand(40, 70) > 0.2
    for kw in ({}, {"lin": lin}, {"valid": valid}, {"candidates": 24}, {"lin": lin, "candidates": 24}):
        tri = K.routed_topk(q, w, k, head_idx, qpos, 8, scale, kernel="triton", **kw)
        ref = K.routed_topk_torch(q, w, k, head_idx, qpos, 8, scale, **kw)
        assert tri.shape == ref.shape == (40, 8), kw
        assert [set(a) for a in tri.tolist()] == [set(b) for b in ref.tolist()], kw
    dense_tri = K.routed_topk(q, w, k, None, qpos, 8, scale, kernel="triton")
    dense_ref = K.routed_topk_torch(q, w, k, None, qpos, 8, scale)
    assert [set(a) for a in dense_tri.tolist()] == [set(b) for b in dense_ref.tolist()]
    assert K._use_triton(q, "triton") and not K._use_triton(q, "auto") and not K._use_triton(q, "torch")


@pytest.mark.skipif(not K.TRITON_INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets "
                    "it; the test extra installs triton)")
def test_triton_wrapper_asks_for_ieee_dots_on_fp32_only_and_passes_ieee_on(monkeypatch):
    """What the wrapper hands the kernel: IEEE fp32 dots by default (TF32 only when ieee=False is asked for), never
    for fp16 inputs; misa_topk / dense_topk pass their ieee on. (TF32 itself only exists on a GPU.)"""
    q, w, k, qpos = _rand(S=8, T=8, H=2, D=16)
    seen = []
    real = K._routed_scores_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["IEEE"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(K, "_routed_scores_kernel", Recorder())
    K.routed_scores_triton(q, w, k, None, qpos, 1.0)
    K.routed_scores_triton(q, w, k, None, qpos, 1.0, ieee=False)
    K.routed_scores_triton(q.half(), w, k.half(), None, qpos, 1.0)
    K.routed_scores_triton(q.half(), w, k.half(), None, qpos, 1.0, ieee=True)
    assert seen == [True, False, False, False]
    seen.clear()
    for ieee in (True, False):
        K.misa_topk(q, w, k, qpos, 4, 1.0, active_heads=1, block_size=4, kernel="triton", ieee=ieee)
        K.dense_topk(q, w, k, qpos, 4, 1.0, kernel="triton", ieee=ieee)
    K.misa_topk(q, w, k, qpos, 4, 1.0, active_heads=1, block_size=4, kernel="triton")
    K.dense_topk(q, w, k, qpos, 4, 1.0, kernel="triton")
    assert seen == [True, True, False, False, True, True]


@pytest.mark.skipif(not K.TRITON_INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets "
                    "it; the test extra installs triton)")
def test_triton_wrapper_makes_its_tensors_on_the_inputs_device():
    """Under another default device (as with torch.set_default_device("cuda") and inputs elsewhere) the head
    indices and the output are made on the inputs' device: the same scores."""
    q, w, k, qpos = _rand(S=8, T=8, H=2, D=16)
    want = K.routed_scores_triton(q, w, k, None, qpos, 1.0)
    with torch.device("meta"):
        got = K.routed_scores_triton(q, w, k, None, qpos, 1.0)
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_triton_path_refusals_name_the_fix(monkeypatch):
    """Without triton, or on CPU tensors without the interpreter, the Triton path says what to use instead."""
    q, w, k, qpos = _rand(S=8, T=8, H=2, D=16)
    monkeypatch.setattr(K, "TRITON_INTERPRETED", False)
    with pytest.raises(ValueError, match=r"runs on CUDA tensors \(or on CPU under TRITON_INTERPRET=1, slowly\); on "
                                         r"CPU use routed_topk_torch"):
        K.routed_scores_triton(q, w, k, None, qpos, 1.0)
    with pytest.raises(RuntimeError, match=r"kernel='triton' needs CUDA tensors and the triton package \(or "
                                           r"TRITON_INTERPRET=1 set before triton is imported"):
        K.routed_topk(q, w, k, None, qpos, 4, 1.0, kernel="triton")
    assert K.routed_topk(q, w, k, None, qpos, 4, 1.0, kernel="auto").shape == (8, 4)
    monkeypatch.setattr(K, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match=r"^routed_scores_triton needs the `triton` package \(GPU builds of torch "
                                           r"ship it\)\.$"):
        K.routed_scores_triton(q, w, k, None, qpos, 1.0)


@pytest.mark.skipif(not K.TRITON_INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets "
                    "it; the test extra installs triton)")
def test_misa_and_dense_topk_pass_the_kernel_choice_on(monkeypatch):
    """misa_topk / dense_topk run the kernel they are asked for: kernel='triton' gives the torch path's keys
    (through the interpreter) and, where Triton cannot run, refuses instead of falling back; an unknown name
    is an error, not a silent torch run."""
    q, w, k, qpos = _rand(S=40, T=70, H=4, D=16, seed=2)
    scale = 16**-0.5
    for hier in (False, True):
        tri, hi = K.misa_topk(q, w, k, qpos, 8, scale, active_heads=2, block_size=16, hierarchical=hier,
                              candidates=24, kernel="triton")
        ref, hr = K.misa_topk(q, w, k, qpos, 8, scale, active_heads=2, block_size=16, hierarchical=hier,
                              candidates=24, kernel="torch")
        # the same heads; the keys up to near-ties (the kernel and the torch path sum in different orders)
        assert torch.equal(hi, hr) and K.recall(tri, ref, qpos) > 0.99
    default, hd = K.misa_topk(q, w, k, qpos, 8, scale, active_heads=2, block_size=16)  # kernel="auto": torch on CPU
    ref, hr = K.misa_topk(q, w, k, qpos, 8, scale, active_heads=2, block_size=16, kernel="torch")
    assert torch.equal(hd, hr) and torch.equal(default, ref)
    dense = K.dense_topk(q, w, k, qpos, 8, scale, kernel="triton")
    assert [set(a) for a in dense.tolist()] == [set(b) for b in K.dense_topk(q, w, k, qpos, 8, scale).tolist()]
    for bad in ("tritn", None):
        with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'torch', 'triton'\), got"):
            K.misa_topk(q, w, k, qpos, 8, scale, active_heads=2, block_size=16, kernel=bad)
        with pytest.raises(ValueError, match="kernel must be one of"):
            K.dense_topk(q, w, k, qpos, 8, scale, kernel=bad)
    monkeypatch.setattr(K, "TRITON_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="kernel='triton' needs CUDA tensors"):
        K.misa_topk(q, w, k, qpos, 8, scale, active_heads=2, block_size=16, kernel="triton")
    with pytest.raises(RuntimeError, match="kernel='triton' needs CUDA tensors"):
        K.dense_topk(q, w, k, qpos, 8, scale, kernel="triton")


@pytest.mark.skipif(not (K.HAS_TRITON and torch.cuda.is_available()), reason="Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("D", [32, 64, 128])
def test_triton_kernel_matches_reference(D):
    q, w, k, qpos = (t.cuda() for t in _rand(S=333, T=500, H=16, D=D))
    scale = D**-0.5
    head_idx = K.route_heads(K.head_scores(q, w, k, qpos, 64, scale), 5)
    mask = torch.arange(500, device="cuda")[None, :] <= qpos[:, None]
    ref = K.routed_scores_reference(q[None], w[None], k[None], head_idx[None], scale, mask[None])[0]
    got = K.routed_scores_triton(q, w, k, head_idx, qpos, scale, ieee=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    dense_ref = K.routed_scores_reference(q[None], w[None], k[None], torch.arange(16, device="cuda").expand(
        1, 333, 16), scale, mask[None])[0]
    torch.testing.assert_close(K.routed_scores_triton(q, w, k, None, qpos, scale), dense_ref, rtol=1e-4, atol=1e-4)
    # bf16 inputs stay close to the fp32 reference
    got16 = K.routed_scores_triton(q.bfloat16(), w, k.bfloat16(), head_idx, qpos, scale)
    fin = torch.isfinite(ref)
    assert ((got16[fin] - ref[fin]).abs().max() / ref[fin].abs().max()) < 0.03
    # the model path picks Triton on CUDA and agrees with the torch path
    sel_gpu = K.routed_topk(q, w, k, head_idx, qpos, 32, scale, kernel="auto")
    sel_cpu = K.routed_topk_torch(q.cpu(), w.cpu(), k.cpu(), head_idx.cpu(), qpos.cpu(), 32, scale)
    assert K.recall(sel_gpu.cpu(), sel_cpu, qpos.cpu()) > 0.999


@pytest.mark.skipif(not K.TRITON_INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets "
                    "it; the test extra installs triton)")
def test_triton_wrapper_output_is_float32_whatever_the_default_dtype():
    """The kernel writes float32 scores: the wrapper's output buffer is float32 also when torch's default dtype is
    float64 (torch.set_default_dtype)."""
    q, w, k, qpos = _rand(S=8, T=8, H=2, D=16)
    want = K.routed_scores_triton(q, w, k, None, qpos, 1.0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = K.routed_scores_triton(q, w, k, None, qpos, 1.0)
    finally:
        torch.set_default_dtype(old)
    assert got.dtype == torch.float32 and torch.equal(got, want)
