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
