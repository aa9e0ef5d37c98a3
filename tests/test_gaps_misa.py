"""MISA routes (and counts) exactly ``active_heads`` heads on every path (issue 15, mutation 4).

The model-level MISA tests run the exact reference path (short inputs); the chunked CPU path that long inputs
take goes through ``kernels.misa.misa_topk``. Here both paths must pick the same keys with the same number of
heads, and the FLOPs in ``stats()`` must be those of the heads actually scored, written out by hand.
"""

import pytest
import torch

import retrofit
from retrofit.arch import get_adapter
from retrofit.kernels import misa as K
from retrofit.testing import tiny_model

S = 72


def _selections(model, ids, **cfg):
    h = retrofit.attach(model, "misa", **cfg)
    caps = {}
    hooks = [ix.register_forward_hook(lambda m, a, o, i=i: caps.__setitem__(i, o.clone()))
             for i, ix in get_adapter(model).indexers(model).items()]
    try:
        with torch.no_grad():
            model(ids)
        return caps, h.stats()
    finally:
        for x in hooks:
            x.remove()
        h.detach()


def _flops_by_hand(S, H, D, h, B):
    """One causal sequence of S queries (query t sees keys 0..t), blocks of B keys."""
    per = 2 * D + 4
    dense = sum((t + 1) * H * per for t in range(S))
    blocks = sum(-(-(t + 1) // B) * H * (per + 1) for t in range(S))  # ceil((t+1)/B) blocks, all H heads, + |.|
    misa = blocks + sum((t + 1) * h * per for t in range(S)) + S * D  # routed score with h heads + key pooling
    return dense, misa


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_cpu_path_routes_active_heads_like_the_reference(family):
    model = tiny_model(family, max_position_embeddings=512)
    ids = torch.randint(3, 128, (2, S), generator=torch.Generator().manual_seed(0))
    H, D = model.config.index_n_heads, model.config.index_head_dim
    ref, st_ref = _selections(model, ids, active_heads=3, block_size=8, kernel="reference", router="blockmean")
    cpu, st_cpu = _selections(model, ids, active_heads=3, block_size=8, kernel="torch", router="blockmean")
    for i in ref:  # same selected keys (as sets per query; ties may come in another order)
        hits = [K.recall(cpu[i][b].long(), ref[i][b].long(), torch.arange(S)) for b in range(ids.shape[0])]
        assert min(hits) > 0.99, (i, hits)
    # the moment router (default) too: heads + linear remainder on both paths
    mref, _ = _selections(model, ids, active_heads=3, block_size=8, kernel="reference")
    mcpu, _ = _selections(model, ids, active_heads=3, block_size=8, kernel="torch")
    for i in mref:
        hits = [K.recall(mcpu[i][b].long(), mref[i][b].long(), torch.arange(S)) for b in range(ids.shape[0])]
        assert min(hits) > 0.99, (i, hits)
    assert any(not torch.equal(mref[i], ref[i]) for i in ref)  # the routers really differ
    dense, misa = _flops_by_hand(S, H, D, 3, 8)
    for st in (st_ref, st_cpu):
        assert len(st["layers"]) == 4
        for layer in st["layers"].values():
            assert layer["flops_dense"] == 2 * dense
            assert layer["flops_misa"] == pytest.approx(2 * misa, rel=1e-12)
        assert st["flops_ratio"] == pytest.approx(dense / misa, rel=1e-12)


def test_misa_topk_scores_with_exactly_active_heads():
    g = torch.Generator().manual_seed(0)
    Sq, H, D = 200, 16, 32
    q, k = torch.randn(Sq, H, D, generator=g), torch.randn(Sq, D, generator=g)
    w = torch.randn(Sq, H, generator=g) * torch.linspace(0.1, 2.0, H)
    qpos = torch.arange(Sq)
    scale = D ** -0.5
    for h in (1, 4, 15):
        idx, head_idx = K.misa_topk(q, w, k, qpos, 20, scale, active_heads=h, block_size=32, kernel="torch",
                                    router="blockmean")
        want_heads = K.route_heads(K.head_scores(q, w, k, qpos, 32, scale), h)
        assert head_idx.shape == (Sq, h) and torch.equal(head_idx, want_heads)
        mask = torch.arange(Sq)[None, :] <= qpos[:, None]
        ref = K.routed_scores_reference(q[None], w[None], k[None], want_heads[None], scale, mask[None])[0]
        torch.testing.assert_close(torch.gather(ref, 1, idx).sort(-1).values,
                                   ref.topk(20, -1).values.sort(-1).values)
    idx, head_idx = K.misa_topk(q, w, k, qpos, 20, scale, active_heads=H, block_size=32, kernel="torch")
    assert head_idx is None  # all heads: the dense indexer


def test_misa_topk_moment_router_scores_heads_plus_linear_term():
    g = torch.Generator().manual_seed(1)
    Sq, H, D = 200, 16, 32
    q, k = torch.randn(Sq, H, D, generator=g), torch.randn(Sq, D, generator=g)
    w = torch.randn(Sq, H, generator=g)
    qpos = torch.arange(Sq)
    scale = D ** -0.5
    mask = torch.arange(Sq)[None, :] <= qpos[:, None]
    for h in (1, 4, 15):
        idx, head_idx = K.misa_topk(q, w, k, qpos, 20, scale, active_heads=h, block_size=32, kernel="torch")
        want_heads, lin = K.moment_route(q, w, k, qpos, 32, scale, h)
        assert head_idx.shape == (Sq, h) and torch.equal(head_idx, want_heads)
        ref = K.routed_scores_reference(q[None], w[None], k[None], want_heads[None], scale, mask[None],
                                        lin=lin[None])[0]
        torch.testing.assert_close(torch.gather(ref, 1, idx).sort(-1).values,
                                   ref.topk(20, -1).values.sort(-1).values)


# ----------------------------------------------------------------------------------------------------------
# exact references for the pieces the model-level tests reach only loosely (found by the mutation run)
# ----------------------------------------------------------------------------------------------------------
def _data(S=40, T=None, H=8, D=6, seed=3, pads=0):
    g = torch.Generator().manual_seed(seed)
    T = T or S + 3
    q = torch.randn(S, H, D, generator=g)
    k = torch.randn(T, D, generator=g) + 0.3  # a nonzero key mean, so mu and the linear remainder matter
    w = torch.randn(S, H, generator=g) * torch.linspace(0.2, 2.0, H)
    key_valid = torch.ones(T, dtype=torch.bool)
    key_valid[:pads] = False  # left padding
    key_valid[T // 2] = False  # and one masked key inside the sequence
    return q, w, k, torch.arange(T - S, T), key_valid


def _naive_moments(k, key_valid, B, ends):
    """float64 mean / population covariance of the valid keys before each query's last block boundary (its
    whole prefix before the first boundary), written from key_moments' docstring."""
    T, D = k.shape
    kd = k.double()
    v = torch.ones(T, dtype=torch.bool) if key_valid is None else key_valid
    means, covs = [], []
    for e in ends.tolist():
        e = min(max(e, 0), T)
        stop = (e // B) * B or e
        sel = kd[:stop][v[:stop]]
        if len(sel) == 0:
            means.append(torch.zeros(D, dtype=torch.double))
            covs.append(torch.zeros(D, D, dtype=torch.double))
            continue
        m = sel.mean(0)
        means.append(m)
        covs.append((sel - m).t() @ (sel - m) / len(sel))
    return torch.stack(means), torch.stack(covs)


@pytest.mark.parametrize("pads", [0, 2])
def test_key_moments_equal_the_prefix_moments_by_hand(pads):
    q, w, k, qpos, key_valid = _data(S=30, T=37, pads=pads)
    B = 8
    # before, at and after block boundaries, an empty prefix, and past the end (clamped to T)
    ends = torch.tensor([0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 36, 37, 50])
    for kv in (key_valid, None):
        want_m, want_c = _naive_moments(k, kv, B, ends)
        for bnd in (None, K._boundary_moments(k, kv, B)):
            m, c = K.key_moments(k, kv, B, ends, _boundary=bnd)
            torch.testing.assert_close(m.double(), want_m, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(c.double(), want_c, rtol=1e-4, atol=1e-4)


def _naive_moment_route(q, w, k, qpos, B, scale, h, key_valid=None, thr=0.7):
    """The moment router in float64, one formula per line of the module docstring."""
    mean, cov = _naive_moments(k, key_valid, B, qpos + 1)
    qd, wd = q.double(), w.double()
    mu = scale * torch.einsum("shd,sd->sh", qd, mean)
    var = (scale * scale * torch.einsum("shd,sde,she->sh", qd, cov, qd)).clamp_min(0)
    sig = var.sqrt()
    z = mu / sig
    cdf = torch.special.ndtr(z)
    pdf = torch.exp(-z * z / 2) / (2 * torch.pi) ** 0.5
    m1 = mu * cdf + sig * pdf
    m2 = (mu * mu + var) * cdf + mu * sig * pdf
    score = wd.abs() * (m2 - m1 * m1 - cdf * cdf * var).clamp_min(0).sqrt()
    heads = score.topk(h, -1).indices.sort(-1).values
    coef = (wd * cdf * (cdf > thr)).scatter(1, heads, 0.0)
    return heads, scale * torch.einsum("sh,shd->sd", coef, qd), score


@pytest.mark.parametrize("pads", [0, 2])
def test_moment_route_equals_the_gaussian_formulas_by_hand(pads):
    q, w, k, qpos, key_valid = _data(S=40, T=45, pads=pads)
    B, scale, h = 8, 0.35, 3
    want_heads, want_lin, score = _naive_moment_route(q, w, k, qpos, B, scale, h, key_valid)
    gap = score.sort(-1, descending=True).values
    assert float((gap[:, h - 1] - gap[:, h]).min()) > 1e-5  # no near ties: float32 must pick the same heads
    for chunk in (256, 7):
        heads, lin = K.moment_route(q, w, k, qpos, B, scale, h, key_valid=key_valid, chunk=chunk)
        assert torch.equal(heads, want_heads)
        torch.testing.assert_close(lin.double(), want_lin, rtol=1e-4, atol=1e-5)
    assert float(want_lin.abs().max()) > 0.1  # the remainder term is really exercised
    # the padded keys matter: routing without key_valid differs
    if pads:
        assert not torch.equal(K.moment_route(q, w, k, qpos, B, scale, h)[0], want_heads)
    heads, lin = K.moment_route(q, w, k, qpos, B, scale, h, key_valid=key_valid, linear_threshold=None)
    assert torch.equal(heads, want_heads) and lin is None
    H = q.shape[1]
    heads, lin = K.moment_route(q, w, k, qpos, B, scale, H)
    assert torch.equal(heads, torch.arange(H).expand(len(qpos), H)) and lin is None
    # misa_topk passes key_valid to the router
    _, head_idx = K.misa_topk(q, w, k, qpos, 5, scale, active_heads=h, block_size=B, key_valid=key_valid,
                              kernel="torch")
    assert torch.equal(head_idx, want_heads)


def _auto_by_hand(n, topk):
    kc = max(2 * topk, -(-n // 8))
    return min(n, -(-kc // 256) * 256)


def _indexer_flops_by_hand(qpos, H, D, h=None, B=1024, hier=False, cand=8192, router="blockmean", topk=2048,
                           linear=True):
    """Count the scoring work query by query, as indexer_flops' docstring defines it."""
    per = 2 * D + 4
    ns = [max(p + 1, 0) for p in qpos.tolist()]
    if h is None or h >= H:
        return float(sum(n * H * per for n in ns))
    total = 0
    for n in ns:
        if router == "moments":  # mu, q^T C q, Gaussian stats, remainder vector; routed heads; remainder score
            total += H * (2 * D + (2 * D * D + 2 * D) + 20 + (2 * D if linear else 0))
            total += n * h * per + (n * (2 * D + 1) if linear else 0)
        else:  # head score on the visible blocks (+1 for |.|), routed heads
            total += -(-n // B) * H * (per + 1) + n * h * per
        if hier:
            total += min(n, _auto_by_hand(n, topk) if cand == "auto" else cand) * H * per
    T = max(ns, default=0)
    total += T * (2 * D * D + D) if router == "moments" else T * D  # per sequence: key moments / key pooling
    return float(total)


def test_indexer_flops_equal_the_count_by_hand():
    qpos = torch.tensor([-1, 0, 3, 10, 40, 99])  # -1: a query that sees no key
    H, D, h, B = 6, 8, 2, 4
    for kw in ({}, {"h": H}, {"h": h, "router": "blockmean"}, {"h": h, "router": "moments"},
               {"h": h, "router": "moments", "linear": False}, {"h": h, "hier": True, "cand": 16},
               {"h": h, "router": "moments", "hier": True, "cand": "auto", "topk": 5},
               {"h": h, "hier": True, "cand": "auto", "topk": 100}):
        want = _indexer_flops_by_hand(qpos, H, D, B=B, **kw)
        got = K.indexer_flops(qpos, H, D, active_heads=kw.get("h"), block_size=B,
                              hierarchical=kw.get("hier", False), candidates=kw.get("cand", 8192),
                              router=kw.get("router", "blockmean"), topk=kw.get("topk", 2048),
                              linear=kw.get("linear", True))
        assert got == want, kw
    for router in ("moments", "blockmean"):  # no queries: no work, not one sequence's key pass
        assert K.indexer_flops(torch.tensor([], dtype=torch.long), H, D, active_heads=h, router=router) == 0.0
    # the defaults (k' = 8192 candidates, top-k 2048 for "auto") as documented, at a context longer than both
    long = torch.tensor([9000])
    assert K.indexer_flops(long, 16, 16, active_heads=2, hierarchical=True) == \
        _indexer_flops_by_hand(long, 16, 16, h=2, hier=True, cand=8192)
    assert K.indexer_flops(long, 16, 16, active_heads=2, hierarchical=True, candidates="auto") == \
        _indexer_flops_by_hand(long, 16, 16, h=2, hier=True, cand="auto", topk=2048)
    with pytest.raises(ValueError, match="unknown MISA router 'nope'"):
        K.indexer_flops(qpos, H, D, active_heads=h, router="nope")


def _ref_pick_scores(q, w, k, qpos, head_idx, scale, lin=None, valid=None):
    S, H, _ = q.shape
    hi = torch.arange(H).expand(S, H) if head_idx is None else head_idx
    mask = torch.arange(k.shape[0])[None, :] <= qpos[:, None]
    if valid is not None:
        mask = mask & valid
    return K.routed_scores_reference(q[None], w[None], k[None], hi[None], scale, mask[None],
                                     lin=None if lin is None else lin[None])[0]


def test_gpu_dispatch_post_processing_matches_the_torch_path(monkeypatch):
    """routed_topk's CUDA branch (remainder term, tie breaking, padding mask, MISA-dagger re-score) runs on CPU
    with the Triton scorer replaced by the reference scorer of the same contract ([S, T], -inf after qpos)."""
    q, w, k, qpos, key_valid = _data(S=48, T=48, H=8, D=8, pads=0)
    scale, topk = 8 ** -0.5, 6
    head_idx, lin = K.moment_route(q, w, k, qpos, 8, scale, 3)
    lin = lin * 3  # large enough to change the picks
    valid = torch.ones(48, 48, dtype=torch.bool)
    valid[:, 10:14] = False

    def fake_triton(q_, w_, k_, hi, qp, sc, ieee=True):
        return _ref_pick_scores(q_, w_, k_, qp, hi, sc)

    cases = [dict(head_idx=None), dict(head_idx=head_idx), dict(head_idx=head_idx, lin=lin),
             dict(head_idx=head_idx, valid=valid), dict(head_idx=head_idx, candidates=12),
             dict(head_idx=head_idx, lin=lin, candidates=12), dict(head_idx=head_idx, candidates="auto")]
    want = [K.routed_topk(q, w, k, c["head_idx"], qpos, topk, scale, valid=c.get("valid"),
                          candidates=c.get("candidates"), lin=c.get("lin"), kernel="torch") for c in cases]
    monkeypatch.setattr(K, "_use_triton", lambda t, kernel: True)
    monkeypatch.setattr(K, "routed_scores_triton", fake_triton)
    seen = qpos >= topk + 4  # queries with enough visible keys (no filler picks)
    for c, wnt in zip(cases, want):
        got = K.routed_topk(q, w, k, c["head_idx"], qpos, topk, scale, valid=c.get("valid"),
                            candidates=c.get("candidates"), lin=c.get("lin"))
        assert got.shape == (48, topk)
        if c.get("candidates"):  # the re-score is the dense one among the candidates: compare dense scores
            ref = _ref_pick_scores(q, w, k, qpos, None, scale, valid=c.get("valid"))
        else:
            ref = _ref_pick_scores(q, w, k, qpos, c["head_idx"], scale, lin=c.get("lin"), valid=c.get("valid"))
        torch.testing.assert_close(torch.gather(ref, 1, got)[seen].sort(-1).values,
                                   torch.gather(ref, 1, wnt)[seen].sort(-1).values)
        if c.get("valid") is not None:
            assert not bool(((got >= 10) & (got < 14))[seen].any())
    # the cases really differ from each other (remainder, mask and re-score each change picks)
    # (k' = "auto" covers all 48 keys here: the dense selection, as the first case)
    assert len({tuple(x[seen].sort(-1).values.flatten().tolist()) for x in want}) == len(cases) - 1
    with monkeypatch.context() as m:  # ties among exact zeros are broken by position on this branch too
        m.setattr(K, "routed_scores_triton", lambda *a, **kw: torch.zeros(48, 48))
        assert torch.equal(K.routed_topk(q, w, k, head_idx, qpos, 4, scale).sort(-1).values,
                           torch.arange(44, 48).expand(48, 4))


@pytest.mark.parametrize("case", ["dense", "routed", "moments", "hier", "all_candidates"])
def test_cpu_path_never_picks_a_future_key_in_any_chunk(case):
    """Each chunk of queries masks the keys after each query's own position (qpos 20..79); with small chunks every
    chunk's first query has the key right after it, which scores high here, unmasked by the chunk's prefix."""
    q, w, k, qpos, _ = _data(S=60, T=80, H=8, D=8)
    scale, topk = 8 ** -0.5, 5
    k = k * (1 + torch.arange(80.0) / 10)[:, None]  # later keys score larger: a leaked next key would be picked
    head_idx, lin = K.moment_route(q, w, k, qpos, 8, scale, 3)
    kw = {"dense": dict(head_idx=None), "routed": dict(head_idx=head_idx),
          "moments": dict(head_idx=head_idx, lin=lin), "hier": dict(head_idx=head_idx, candidates=12),
          "all_candidates": dict(head_idx=head_idx, candidates=200)}[case]
    valid = torch.ones(60, 80, dtype=torch.bool)
    valid[:, 3:6] = False
    for chunk in (1, 3, 7, 60):
        got = K.routed_topk_torch(q, w, k, kw["head_idx"], qpos, topk, scale, valid=valid, chunk=chunk,
                                  candidates=kw.get("candidates"), lin=kw.get("lin"))
        assert bool((got <= qpos[:, None]).all()), (case, chunk)
        assert not bool(((got >= 3) & (got < 6)).any()), (case, chunk)
        ref = _ref_pick_scores(q, w, k, qpos, None if "candidates" in kw else kw["head_idx"], scale,
                               lin=None if "candidates" in kw else kw.get("lin"), valid=valid)
        if case != "hier":  # the full selection: same scores as the reference's top-k
            torch.testing.assert_close(torch.gather(ref, 1, got).sort(-1).values,
                                       ref.topk(topk, -1).values.sort(-1).values)


def test_misa_topk_defaults_and_arguments_reach_the_selection():
    g = torch.Generator().manual_seed(5)
    S, H, D, T = 1100, 16, 8, 1100
    q, k = torch.randn(S, H, D, generator=g), torch.randn(T, D, generator=g) + 0.2
    k[1000:] += 3.0  # the keys' statistics change near the first block boundary, so the block size shows
    w = torch.randn(S, H, generator=g)
    qpos, scale, topk = torch.arange(S), D ** -0.5, 8
    # the documented defaults: 8 heads, blocks of 1024 keys, the moment router, k' = "auto" when hierarchical
    idx, heads = K.misa_topk(q, w, k, qpos, topk, scale, kernel="torch")
    idx2, heads2 = K.misa_topk(q, w, k, qpos, topk, scale, active_heads=8, block_size=1024, router="moments",
                               linear_threshold=0.7, hierarchical=False, kernel="torch")
    assert torch.equal(idx.sort(-1).values, idx2.sort(-1).values) and torch.equal(heads, heads2)
    assert heads.shape == (S, 8)
    assert not torch.equal(K.moment_route(q, w, k, qpos, 1025, scale, 8)[0], heads)  # the block size shows
    hi, _ = K.misa_topk(q, w, k, qpos, topk, scale, hierarchical=True, kernel="torch")
    hi2, _ = K.misa_topk(q, w, k, qpos, topk, scale, hierarchical=True, candidates="auto", kernel="torch")
    assert torch.equal(hi.sort(-1).values, hi2.sort(-1).values)
    # hierarchical re-scores (k' = 64 here), and the linear threshold reaches the router
    h64, _ = K.misa_topk(q, w, k, qpos, topk, scale, hierarchical=True, candidates=64, kernel="torch")
    want = K.routed_topk_torch(q, w, k, heads, qpos, topk, scale, candidates=64,
                               lin=K.moment_route(q, w, k, qpos, 1024, scale, 8)[1])
    assert torch.equal(h64.sort(-1).values, want.sort(-1).values) and not torch.equal(h64.sort(-1).values,
                                                                                       idx.sort(-1).values)
    t95, _ = K.misa_topk(q, w, k, qpos, topk, scale, linear_threshold=0.95, kernel="torch")
    lin95 = K.moment_route(q, w, k, qpos, 1024, scale, 8, linear_threshold=0.95)[1]
    assert torch.equal(t95.sort(-1).values,
                       K.routed_topk_torch(q, w, k, heads, qpos, topk, scale, lin=lin95).sort(-1).values)
    assert not torch.equal(t95.sort(-1).values, idx.sort(-1).values)
    # a padding mask reaches the selection (misa and dense)
    valid = torch.ones(S, T, dtype=torch.bool)
    valid[:, :50] = False
    for sel in (K.misa_topk(q, w, k, qpos, topk, scale, valid=valid, kernel="torch")[0],
                K.dense_topk(q, w, k, qpos, topk, scale, valid=valid, kernel="torch")):
        assert not bool((sel[qpos >= 60] < 50).any())


@pytest.mark.skipif(K.HAS_TRITON and torch.cuda.is_available(), reason="checks the CPU refusal of kernel='triton'")
def test_triton_kernel_asked_for_on_cpu_is_a_clear_error(monkeypatch):
    q, w, k, qpos, _ = _data(S=8, T=8)
    monkeypatch.setattr(K, "TRITON_INTERPRETED", False)  # the suite runs Triton's interpreter (conftest.py)
    with pytest.raises(RuntimeError) as e:
        K.routed_topk(q, w, k, None, qpos, 2, 0.5, kernel="triton")
    assert str(e.value) == ("kernel='triton' needs CUDA tensors and the triton package (or TRITON_INTERPRET=1 set "
                            "before triton is imported, to run it on CPU); use kernel='auto'.")
    for kernel in ("auto", "torch"):  # both take the torch path on CPU tensors
        assert torch.equal(K.routed_topk(q, w, k, None, qpos, 2, 0.5, kernel=kernel).sort(-1).values,
                           K.routed_topk_torch(q, w, k, None, qpos, 2, 0.5).sort(-1).values)
