"""MISA's moment router (issue 18): where block means rank heads wrongly, causality, the linear remainder,
MISA-dagger's candidate re-score, k' from the context length, FLOPs."""

import pytest
import torch

from retrofit.kernels import misa as K
from retrofit.methods.misa.config import MisaConfig


def _bias_head_case(T=600, D=8, seed=0):
    """Keys = a large common component + noise. Head 0 reads only the common component (ReLU active on every key,
    the same value everywhere: much mass, no ranking information, the biggest weight); head 1 reads a noise
    direction (the real ranking); heads 2.. are small."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, D, generator=g)
    k[:, 0] = 5.0
    H = 6
    q = torch.zeros(T, H, D)
    q[:, 0, 0] = 1.0  # bias head: q . k = 5 for every key
    q[:, 1, 1] = 3.0  # discriminative head
    q[:, 2:, 2:] = 0.05 * torch.randn(T, H - 2, D - 2, generator=g)
    w = torch.zeros(T, H)
    w[:, 0], w[:, 1], w[:, 2:] = 2.0, 0.5, 0.01
    return q, w, k


def test_moment_router_finds_the_ranking_head_where_block_means_pick_the_bias_head():
    q, w, k = _bias_head_case()
    T, D = k.shape
    scale = D ** -0.5
    qpos = torch.arange(T)
    topk = 32
    dense = K.dense_topk(q, w, k, qpos, topk, scale)
    late = qpos >= 4 * topk  # queries with a real choice
    bm_idx, bm_heads = K.misa_topk(q, w, k, qpos, topk, scale, active_heads=1, block_size=64, router="blockmean",
                                   kernel="torch")
    mo_idx, mo_heads = K.misa_topk(q, w, k, qpos, topk, scale, active_heads=1, block_size=64, kernel="torch")
    # block means: the bias head has the largest ReLU(q . mean key); the noise head's block means are ~0
    assert bool((bm_heads[late, 0] == 0).all())
    assert bool((mo_heads[late, 0] == 1).all())
    r_bm = K.recall(bm_idx[late], dense[late], qpos[late])
    r_mo = K.recall(mo_idx[late], dense[late], qpos[late])
    assert r_mo > 0.99  # (the small heads 2.. move a few ranks of the dense score)
    assert r_bm < 0.3  # the bias head scores every key alike: the pick is arbitrary


def test_key_moments_are_causal_and_match_direct_computation():
    g = torch.Generator().manual_seed(3)
    T, D, B = 100, 6, 16
    k = torch.randn(T, D, generator=g)
    ends = torch.tensor([1, 5, 16, 17, 40, 64, 100])
    mean, cov = K.key_moments(k, None, B, ends)
    for i, e in enumerate(ends.tolist()):
        m = e if e < B else (e // B) * B  # prefix inside the first block, else the last boundary
        x = k[:m]
        torch.testing.assert_close(mean[i], x.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cov[i], torch.cov(x.t(), correction=0).reshape(D, D), rtol=1e-4, atol=1e-5)
    # keys at or after a query's prefix never change its routing
    q = torch.randn(T, 4, D, generator=g)
    w = torch.randn(T, 4, generator=g)
    qpos = torch.arange(T)
    heads, lin = K.moment_route(q, w, k, qpos, B, 0.4, 2)
    k2 = k.clone()
    k2[60:] = torch.randn(T - 60, D, generator=g) * 10
    heads2, lin2 = K.moment_route(q, w, k2, qpos, B, 0.4, 2)
    assert torch.equal(heads[:60], heads2[:60]) and torch.equal(lin[:60], lin2[:60])
    # key_valid: masked keys do not count
    kv = torch.ones(T, dtype=torch.bool)
    kv[:8] = False
    mean_v, _ = K.key_moments(k, kv, B, torch.tensor([40]))
    torch.testing.assert_close(mean_v[0], k[8:32].mean(0), rtol=1e-5, atol=1e-5)


def test_linear_remainder_is_the_slope_weighted_sum_of_nearly_linear_heads():
    g = torch.Generator().manual_seed(5)
    T, H, D = 80, 8, 8
    q, k, w = torch.randn(T, H, D, generator=g), torch.randn(T, D, generator=g), torch.randn(T, H, generator=g)
    k[:, 0] = 3.0 + 0.1 * k[:, 0]
    q[:, 3:6, 0] = 4.0  # heads 3-5: pre-activation mostly positive -> ReLU slope near 1
    qpos = torch.arange(T)
    scale = D ** -0.5
    heads, lin = K.moment_route(q, w, k, qpos, 32, scale, 2, linear_threshold=0.7)
    mean, cov = K.key_moments(k, None, 32, qpos + 1)
    t = 70
    mu = scale * q[t] @ mean[t]
    sig = scale * torch.einsum("hd,de,he->h", q[t], cov[t], q[t]).sqrt()
    slope = torch.special.ndtr(mu / sig)
    use = (slope > 0.7)
    use[heads[t]] = False
    assert bool(use[3:6].any())  # nearly linear heads that are not routed form the remainder ...
    want = scale * ((w[t] * slope * use)[:, None] * q[t]).sum(0)
    torch.testing.assert_close(lin[t], want, rtol=1e-4, atol=1e-5)
    _, none = K.moment_route(q, w, k, qpos, 32, scale, 2, linear_threshold=None)
    assert none is None  # ... and no remainder when switched off
    h_all, l_all = K.moment_route(q, w, k, qpos, 32, scale, H)
    assert torch.equal(h_all, torch.arange(H).expand(T, H)) and l_all is None


@pytest.mark.parametrize("lin_on", [True, False])
def test_dagger_rescore_equals_dense_scores_on_the_candidates(lin_on):
    g = torch.Generator().manual_seed(7)
    S, T, H, D = 50, 400, 16, 16
    q, k, w = torch.randn(S, H, D, generator=g), torch.randn(T, D, generator=g), torch.randn(S, H, generator=g)
    qpos = torch.arange(T - S, T)
    scale = D ** -0.5
    topk, cand = 20, 64
    heads, lin = K.moment_route(q, w, k, qpos, 64, scale, 4, linear_threshold=0.7 if lin_on else None)
    mask = torch.arange(T)[None, :] <= qpos[:, None]
    routed = K.routed_scores_reference(q[None], w[None], k[None], heads[None], scale, mask[None],
                                       lin=None if lin is None else lin[None])[0]
    dense = K.routed_scores_reference(q[None], w[None], k[None], torch.arange(H).expand(1, S, H), scale,
                                      mask[None])[0]
    cidx = routed.topk(cand, -1).indices
    restricted = torch.full_like(dense, float("-inf")).scatter(1, cidx, torch.gather(dense, 1, cidx))
    want = restricted.topk(topk, -1).values.sort(-1).values
    got = K.routed_topk_torch(q, w, k, heads, qpos, topk, scale, candidates=cand, chunk=17, lin=lin)
    # the picks are top-k of the dense score restricted to the candidates (same scores, ties aside)
    torch.testing.assert_close(torch.gather(dense, 1, got).sort(-1).values, want, rtol=1e-5, atol=1e-5)
    assert bool(torch.gather(mask, 1, got).all())


def test_auto_candidates_grow_with_context_and_flops():
    topk = 2048
    ks = [K.auto_candidates(n, topk) for n in (1000, 4096, 8192, 32768, 65536, 131072)]
    assert ks[0] == 1000 and ks[1] == 4096  # never more than the visible keys
    assert ks[2] == ks[3] == 4096 and ks[4] == 8192 and ks[5] == 16384  # max(2 top-k, n / 8)
    assert all(x % 256 == 0 for x in ks[1:])
    qpos = torch.arange(32768)
    dense = K.indexer_flops(qpos, 64, 64)
    mom = K.indexer_flops(qpos, 64, 64, 8, 1024, router="moments")
    bm = K.indexer_flops(qpos, 64, 64, 8, 1024, router="blockmean")
    assert 6.5 < dense / mom < dense / bm < 8.0  # the moment router + linear term cost about one head
    hier = K.indexer_flops(qpos, 64, 64, 8, 1024, hierarchical=True, candidates="auto", router="moments")
    assert 2.0 < dense / hier < dense / mom
    with pytest.raises(ValueError, match="router"):
        K.indexer_flops(qpos, 64, 64, 8, router="nope")


def test_config_router_options():
    assert MisaConfig().router == "moments" and MisaConfig().candidates == "auto"
    assert MisaConfig(router="blockmean", linear_threshold=None, candidates=4096).candidates == 4096
    with pytest.raises(ValueError, match="router"):
        MisaConfig(router="max")
    with pytest.raises(ValueError, match="linear_threshold"):
        MisaConfig(linear_threshold=1.5)
    with pytest.raises(ValueError, match="candidates"):
        MisaConfig(candidates="many")
    with pytest.raises(ValueError, match="unknown MISA router"):
        K.route(torch.zeros(2, 2, 4), torch.zeros(2, 2), torch.zeros(2, 4), torch.arange(2), 1, 1.0, 1,
                router="max")
