"""Exact checks of the MISA kernel helpers (``retrofit.kernels.misa``) that the model-level tests reach only loosely.

Small hand-built tensors with values written out by hand, or a tiny float64 reference written here from the
docstrings: masks, block means, head scores, head routing, key moments, the router dispatch, the chunked CPU
top-k, the GPU dispatch (with the Triton scorer replaced by the reference scorer), FLOP counts and recall.
"""

from types import SimpleNamespace

import pytest
import torch

from retrofit.kernels import misa as K


def _rand(S, T, H, D, seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, H, D, generator=g)
    k = torch.randn(T, D, generator=g) + bias
    w = torch.randn(S, H, generator=g) * torch.linspace(0.2, 2.0, H)
    return q, w, k


# ----------------------------------------------------------------------------------------------------------
# mask_info
# ----------------------------------------------------------------------------------------------------------
def test_mask_info_reads_bool_and_additive_masks_of_every_dtype():
    fm = torch.finfo(torch.float32).min
    m = torch.tensor([
        [[0.0, fm, fm, fm], [0.0, 0.0, fm, fm], [0.0, 0.0, 0.0, fm]],  # causal
        # a query that sees nothing; hand-made masks (-1e9, -1e4, -inf) hide their keys too; at or below -1e3 is
        # masked, a small bias (-999, -3) is visible
        [[fm, fm, fm, fm], [-1e9, -999.0, fm, 0.0], [-1e4, -3.0, float("-inf"), -1e3]],
    ])
    valid, qpos, key_valid = K.mask_info(m)
    assert torch.equal(valid, torch.tensor([
        [[True, False, False, False], [True, True, False, False], [True, True, True, False]],
        [[False, False, False, False], [False, True, False, True], [False, True, False, False]]]))
    assert qpos.dtype == torch.long and torch.equal(qpos, torch.tensor([[0, 1, 2], [-1, 3, 1]]))
    assert torch.equal(key_valid, torch.tensor([[True, True, True, False], [False, True, False, True]]))
    # a causal -1e9 mask, as people build it by hand: the same selection as transformers' own
    hand = torch.triu(torch.full((4, 4), -1e9), 1)
    assert torch.equal(K.mask_info(hand)[1], torch.arange(4))
    assert torch.equal(K.mask_info(torch.tensor([[-1e4, 0.0]], dtype=torch.bfloat16))[0], torch.tensor([[False, True]]))
    # half-precision masks are built with their own dtype's minimum (float16's is only -65504)
    want_valid = torch.tensor([[True, False, False], [False, False, False], [True, True, False]])
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        lo = torch.finfo(dt).min
        md = torch.tensor([[0.0, lo, lo], [lo, lo, lo], [0.0, -3.0, lo]], dtype=dt)
        valid, qpos, key_valid = K.mask_info(md)
        assert torch.equal(valid, want_valid), dt
        assert torch.equal(qpos, torch.tensor([0, -1, 1])), dt
        assert torch.equal(key_valid, torch.tensor([True, True, False])), dt
    valid, qpos, key_valid = K.mask_info(want_valid)  # bool: True = visible, returned as is
    assert valid is want_valid and torch.equal(qpos, torch.tensor([0, -1, 1]))
    assert torch.equal(key_valid, torch.tensor([True, True, False]))


# ----------------------------------------------------------------------------------------------------------
# block_means / head_scores
# ----------------------------------------------------------------------------------------------------------
def test_block_means_by_hand():
    k = torch.arange(14.0).view(7, 2)  # key i = [2i, 2i + 1]
    kv = torch.tensor([True, False, True, False, False, True, True])
    kbar, csum, ccount = K.block_means(k, kv, 3)
    # block 0: keys 0, 2 valid; block 1: only key 5 (a mean over one key); key 6 is past the last full block
    assert torch.equal(kbar, torch.tensor([[2.0, 3.0], [10.0, 11.0]]))
    assert torch.equal(csum, torch.tensor([[0.0, 0], [0, 1], [0, 1], [4, 6], [4, 6], [4, 6], [14, 17], [26, 30]]))
    assert torch.equal(ccount, torch.tensor([0.0, 1, 1, 2, 2, 2, 3, 4]))
    kbar, csum, ccount = K.block_means(k, None, 3)
    assert torch.equal(kbar, torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    assert torch.equal(csum, torch.cat([torch.zeros(1, 2), k.cumsum(0)]))
    assert torch.equal(ccount, torch.arange(8.0))
    # a full block without any valid key has mean 0
    kbar, _, _ = K.block_means(k, torch.tensor([False, False, False, True, True, False, True]), 3)
    assert torch.equal(kbar, torch.tensor([[0.0, 0.0], [7.0, 8.0]]))
    # fewer keys than one block: no full block at all
    kbar, csum, ccount = K.block_means(k[:2], None, 3)
    assert kbar.shape == (0, 2) and kbar.dtype == torch.float32
    assert torch.equal(csum, torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 4.0]]))
    assert torch.equal(ccount, torch.tensor([0.0, 1.0, 2.0]))


def _naive_head_scores(q, w, k, qpos, B, scale, key_valid=None):
    """float64, one query at a time: sum over the causal blocks of |w| ReLU(scale q . mean(valid keys of the block
    up to qpos)); blocks (or the partial block) without a valid key add nothing."""
    S, H, _ = q.shape
    T = k.shape[0]
    v = torch.ones(T, dtype=torch.bool) if key_valid is None else key_valid
    E = torch.zeros(S, H, dtype=torch.double)
    for t in range(S):
        n = int(qpos[t]) + 1
        for b0 in range(0, max(n, 0), B):
            idx = [i for i in range(b0, min(b0 + B, n)) if v[i]]
            if idx:
                m = k[idx].double().mean(0)
                E[t] += w[t].double().abs() * torch.relu(q[t].double() @ m * scale)
    return E


def test_head_scores_with_padding_short_prefixes_and_empty_queries():
    T, H, D, B, scale = 11, 5, 3, 4, 0.7
    qpos = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # -1: a query that sees no key
    q, w, k = _rand(len(qpos), T, H, D, seed=1, bias=0.2)
    kv = torch.ones(T, dtype=torch.bool)
    kv[5] = False  # a masked key inside the second full block
    for key_valid in (None, kv):
        want = _naive_head_scores(q, w, k, qpos, B, scale, key_valid)
        got = K.head_scores(q, w, k, qpos, B, scale, key_valid=key_valid)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_naive_head_scores(q, w, k, qpos, B, scale, kv),
                              _naive_head_scores(q, w, k, qpos, B, scale))  # the padding matters here
    assert float(want[1:4].abs().min()) >= 0 and float(want[1:4].sum()) > 0.1  # queries before the 1st boundary
    assert torch.equal(K.head_scores(q, w, k, qpos, B, scale, key_valid=kv)[0], torch.zeros(H))
    # fewer keys than one block: only partial blocks
    qpos3 = torch.tensor([-1, 0, 1, 2])
    q3, w3, k3 = _rand(4, 3, H, D, seed=2)
    torch.testing.assert_close(K.head_scores(q3, w3, k3, qpos3, B, scale).double(),
                               _naive_head_scores(q3, w3, k3, qpos3, B, scale), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# route_heads / route / key_moments
# ----------------------------------------------------------------------------------------------------------
def test_route_heads_on_batched_and_wide_scores():
    E = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.2], [5.0, 1.0, 4.0, 2.0, 3.0], [0.01, 0.02, 7.0, 0.03, 6.0]],
                      [[1.0, 2.0, 3.0, 4.0, 5.0], [9.0, 8.0, 7.0, 6.0, 5.0], [0.5, 0.1, 0.2, 0.3, 0.9]]])
    assert torch.equal(K.route_heads(E, 3),
                       torch.tensor([[[1, 2, 3], [0, 2, 4], [2, 3, 4]], [[2, 3, 4], [0, 1, 2], [0, 3, 4]]]))
    assert torch.equal(K.route_heads(E, 2), torch.tensor([[[1, 3], [0, 2], [2, 4]], [[3, 4], [0, 1], [0, 4]]]))
    assert torch.equal(K.route_heads(E, 5), torch.arange(5).expand(2, 3, 5))
    assert torch.equal(K.route_heads(E, 9), torch.arange(5).expand(2, 3, 5))
    # two queries, five heads: the query count is not the head count
    E2 = E[0, :2]
    assert torch.equal(K.route_heads(E2, 3), torch.tensor([[1, 2, 3], [0, 2, 4]]))
    assert torch.equal(K.route_heads(E2, 1), torch.tensor([[1], [0]]))
    assert torch.equal(K.route_heads(E2, 5), torch.arange(5).expand(2, 5))


def test_route_defaults_to_the_moment_router_and_passes_the_padding_to_blockmean():
    S, H, D, B, h = 24, 6, 4, 8, 2
    q, w, k = _rand(S, S, H, D, seed=4, bias=0.3)
    qpos = torch.arange(S)
    heads, lin = K.route(q, w, k, qpos, B, 0.5, h)
    want_heads, want_lin = K.moment_route(q, w, k, qpos, B, 0.5, h, linear_threshold=0.7)
    assert torch.equal(heads, want_heads) and torch.equal(lin, want_lin)
    assert float(lin.abs().max()) > 0.05  # the default threshold 0.7 keeps a remainder term here
    # blockmean: the padding mask reaches the head scores
    k = k.clone()
    k[:6] *= 25  # big padded keys: counted or not, they change the block means
    kv = torch.ones(S, dtype=torch.bool)
    kv[:6] = False
    heads, lin = K.route(q, w, k, qpos, B, 0.5, h, key_valid=kv, router="blockmean")
    assert lin is None
    assert torch.equal(heads, K.route_heads(K.head_scores(q, w, k, qpos, B, 0.5, key_valid=kv), h))
    assert not torch.equal(heads, K.route_heads(K.head_scores(q, w, k, qpos, B, 0.5), h))


def test_key_moments_of_an_empty_or_negative_prefix_are_zero():
    k = torch.arange(20.0).view(10, 2) ** 1.5
    ends = torch.tensor([-2, -1, 0, 3, 8])
    mean, cov = K.key_moments(k, None, 4, ends)
    assert torch.equal(mean[:3], torch.zeros(3, 2)) and torch.equal(cov[:3], torch.zeros(3, 2, 2))
    for i, stop in ((3, 3), (4, 8)):  # query 3 before the first boundary (its prefix), query 4 at boundary 8
        sel = k[:stop].double()
        m = sel.mean(0)
        torch.testing.assert_close(mean[i].double(), m)
        torch.testing.assert_close(cov[i].double(), (sel - m).t() @ (sel - m) / stop, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# routed_scores_reference with an additive mask
# ----------------------------------------------------------------------------------------------------------
def test_reference_scores_add_a_float_mask():
    S, T, H, D = 5, 7, 4, 3
    q, w, k = _rand(S, T, H, D, seed=6)
    head_idx = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3], [1, 2]])
    vis = torch.arange(T)[None, :] <= torch.tensor([0, 2, 3, 5, 6])[:, None]
    fm = torch.finfo(torch.float32).min
    add = torch.zeros(S, T).masked_fill(~vis, fm)
    args = (q[None], w[None], k[None], head_idx[None], 0.6)
    raw = K.routed_scores_reference(*args)[0]
    got = K.routed_scores_reference(*args, mask=add[None])[0]
    assert got.dtype == torch.float32 and torch.equal(got, raw + add)
    boolean = K.routed_scores_reference(*args, mask=vis[None])[0]
    assert torch.equal(got[vis], boolean[vis]) and bool((got[~vis] < fm / 2).all())
    assert torch.equal(got.topk(1, -1).indices, boolean.topk(1, -1).indices)


# ----------------------------------------------------------------------------------------------------------
# routed_topk_torch: a query that sees no key
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("candidates", [None, 4, 100])
@pytest.mark.parametrize("routed", [False, True])
def test_query_that_sees_no_key_is_fully_masked(candidates, routed):
    """qpos = -1 (mask_info's "no visible key") masks every key of that query, key 0 included: the picks are those
    of the same call with a padding mask that hides the whole row."""
    S, T, H, D = 6, 10, 4, 4
    q, w, k = _rand(S, T, H, D, seed=7, bias=0.5)
    w = w.abs()  # positive weights: key 0 scores finite and > -inf for every query
    qpos = torch.tensor([-1, 2, 4, 6, 8, 9])
    head_idx = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3], [1, 3], [0, 2]]) if routed else None
    hide = torch.ones(S, T, dtype=torch.bool)
    hide[0] = False
    for chunk in (None, 2):
        a = K.routed_topk_torch(q, w, k, head_idx, qpos, 3, 0.5, candidates=candidates, chunk=chunk)
        b = K.routed_topk_torch(q, w, k, head_idx, qpos, 3, 0.5, valid=hide, candidates=candidates, chunk=chunk)
        assert torch.equal(a, b), (chunk, a[0], b[0])
        assert bool((a[1:] <= qpos[1:, None]).all())


# ----------------------------------------------------------------------------------------------------------
# dispatch: routed_topk / _use_triton
# ----------------------------------------------------------------------------------------------------------
def test_use_triton_decision(monkeypatch):
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    monkeypatch.setattr(K, "HAS_TRITON", True)
    monkeypatch.setattr(K, "TRITON_INTERPRETED", False, raising=False)  # CPU tensors cannot run Triton then
    assert K._use_triton(cuda, "triton") is True
    assert K._use_triton(cuda, "auto") is True
    assert K._use_triton(cuda, "torch") is False
    assert K._use_triton(cpu, "auto") is False
    assert K._use_triton(cpu, "torch") is False
    with pytest.raises(RuntimeError, match="kernel='triton' needs CUDA tensors"):
        K._use_triton(cpu, "triton")
    monkeypatch.setattr(K, "HAS_TRITON", False)
    assert K._use_triton(cuda, "auto") is False
    with pytest.raises(RuntimeError, match="kernel='triton' needs CUDA tensors"):
        K._use_triton(cuda, "triton")


def test_routed_topk_defaults_reach_the_kernel(monkeypatch):
    S, T, H, D = 8, 8, 4, 4
    q, w, k = _rand(S, T, H, D, seed=8)
    qpos = torch.arange(S)
    seen = []
    real = K._use_triton
    monkeypatch.setattr(K, "_use_triton", lambda t, kernel: seen.append(kernel) or real(t, kernel))
    K.routed_topk(q, w, k, None, qpos, 2, 0.5)
    assert seen == ["auto"]  # Triton on CUDA tensors by default
    calls = []

    def fake_triton(q_, w_, k_, hi, qp, sc, **kw):
        calls.append(kw)
        heads = torch.arange(H).expand(S, H) if hi is None else hi
        vis = torch.arange(T)[None, :] <= qp[:, None]
        return K.routed_scores_reference(q_[None], w_[None], k_[None], heads[None], sc, vis[None])[0]

    monkeypatch.setattr(K, "_use_triton", lambda t, kernel: True)
    monkeypatch.setattr(K, "routed_scores_triton", fake_triton)
    got = K.routed_topk(q, w, k, None, qpos, 2, 0.5)
    K.routed_topk(q, w, k, None, qpos, 2, 0.5, ieee=False)
    assert calls == [{"ieee": True}, {"ieee": False}]  # exact fp32 dots unless TF32 is asked for
    assert torch.equal(got.sort(-1).values, K.routed_topk_torch(q, w, k, None, qpos, 2, 0.5).sort(-1).values)


def test_routed_topk_passes_the_chunk_size_on():
    """With ``candidates="auto"`` k' follows each chunk's prefix length, so the chunk size shows in the picks: one
    chunk reaching 2100 keys re-scores 512 candidates for every query, chunks of one query 256 for the queries
    at ~1000 keys."""
    T, H, D = 2100, 8, 8
    qpos = torch.tensor(list(range(1000, 1012)) + [2099])
    q, w, k = _rand(len(qpos), T, H, D, seed=0)
    head_idx = torch.randint(0, H, (len(qpos), 1), generator=torch.Generator().manual_seed(1))
    kw = dict(candidates="auto", kernel="torch")
    one = K.routed_topk_torch(q, w, k, head_idx, qpos, 4, D ** -0.5, candidates="auto")
    each = K.routed_topk_torch(q, w, k, head_idx, qpos, 4, D ** -0.5, candidates="auto", chunk=1)
    assert not torch.equal(one.sort(-1).values, each.sort(-1).values)
    assert torch.equal(K.routed_topk(q, w, k, head_idx, qpos, 4, D ** -0.5, chunk=1, **kw), each)
    assert torch.equal(K.routed_topk(q, w, k, head_idx, qpos, 4, D ** -0.5, **kw), one)
    # the two k' by hand: 256 for the queries at ~1000 keys in chunks of one, 512 for all in one chunk
    by256 = K.routed_topk_torch(q, w, k, head_idx, qpos, 4, D ** -0.5, candidates=256, chunk=1)
    by512 = K.routed_topk_torch(q, w, k, head_idx, qpos, 4, D ** -0.5, candidates=512, chunk=1)
    assert torch.equal(each[:-1].sort(-1).values, by256[:-1].sort(-1).values)
    assert torch.equal(one.sort(-1).values, by512.sort(-1).values)


# ----------------------------------------------------------------------------------------------------------
# auto_candidates / indexer_flops / recall
# ----------------------------------------------------------------------------------------------------------
def test_auto_candidates_by_hand():
    # max(2 topk, ceil(n / 8)) rounded up to a multiple of 256, at most n
    for n, topk, want in ((2048, 100, 256), (2049, 100, 512), (2050, 100, 512), (100000, 10, 12544),
                          (5000, 1000, 2048), (300, 2048, 300), (4097, 1, 768), (65536, 2048, 8192)):
        assert K.auto_candidates(n, topk) == want, (n, topk)


def test_indexer_flops_default_block_size_is_1024():
    H, D, h = 4, 8, 2
    per = 2 * D + 4
    for n, blocks in ((1024, 1), (1025, 2), (2048, 2), (2049, 3)):
        want = blocks * H * (per + 1) + n * h * per + n * D
        assert K.indexer_flops(torch.tensor([n - 1]), H, D, active_heads=h) == float(want), n


def test_recall_with_a_single_reference_key():
    assert K.recall(torch.tensor([[0]]), torch.tensor([[0]])) == 1.0
    assert K.recall(torch.tensor([[3], [1]]), torch.tensor([[3], [2]])) == 0.5
    # the query at 0 sees one key: its one valid reference pick found is full recall (filler 5 ignored)
    assert K.recall(torch.tensor([[0, 7]]), torch.tensor([[0, 5]]), torch.tensor([0])) == 1.0
    assert K.recall(torch.tensor([[4, 0], [2, 1]]), torch.tensor([[0, 5], [1, 3]]), torch.tensor([0, 1])) == 1.0
