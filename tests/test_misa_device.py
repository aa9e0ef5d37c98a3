"""MISA kernels keep every tensor they create on the inputs' device, not on torch's default device.

The suite runs on CPU, where the inputs' device and the default device coincide, so a dropped ``device=`` would go
unnoticed until a GPU run. Here each call is made twice with the same CPU inputs: once normally and once inside
``with torch.device("meta")``, which makes ``meta`` the default device (a user whose inputs sit elsewhere than the
default). A tensor created without ``device=`` then lands on ``meta``, and the call either fails on mixed devices
or returns a meta tensor; the right code returns the same CPU result both times.
"""

from __future__ import annotations

import pytest
import torch

from retrofit.kernels import misa as M

S, H, D, T, B = 12, 4, 8, 12, 4
SCALE = D ** -0.5


def _check_same(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _check_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert b.device.type == "cpu", f"result on {b.device}, inputs on cpu"
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    else:
        assert a == b


def same_under_meta_default(fn):
    """``fn()`` with the CPU default device and again with ``meta`` as the default: equal results, on the CPU."""
    ref = fn()
    with torch.device("meta"):
        got = fn()
    _check_same(ref, got)
    return ref


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(S, H, D, generator=g)
    w = torch.randn(S, H, generator=g)
    k = torch.randn(T, D, generator=g)
    qpos = torch.arange(S)
    mask = torch.tril(torch.ones(S, T, dtype=torch.bool))
    key_valid = torch.ones(T, dtype=torch.bool)
    key_valid[5] = False
    return q, w, k, qpos, mask, key_valid


def test_meta_default_trick_catches_a_missing_device():
    """The trick itself: a tensor made without ``device=`` lands on the default device."""
    x = torch.zeros(3)
    with torch.device("meta"):
        assert torch.arange(3).device.type == "meta"
        assert torch.arange(3, device=x.device).device.type == "cpu"
    with pytest.raises(AssertionError):
        same_under_meta_default(lambda: torch.arange(3))


def test_mask_info_keeps_input_device(data):
    _, _, _, _, mask, _ = data
    valid, last, kv = same_under_meta_default(lambda: M.mask_info(mask))
    assert torch.equal(last, torch.arange(S))
    additive = torch.zeros(S, T).masked_fill(~mask, torch.finfo(torch.float32).min)
    valid2, last2, kv2 = same_under_meta_default(lambda: M.mask_info(additive))
    assert torch.equal(valid2, valid) and torch.equal(last2, last) and torch.equal(kv2, kv)


def test_block_router_keeps_input_device(data):
    q, w, k, qpos, _, key_valid = data
    kbar, csum, ccount = same_under_meta_default(lambda: M.block_means(k, None, B))
    assert kbar.shape == (T // B, D) and torch.equal(ccount, torch.arange(T + 1, dtype=torch.float32))
    same_under_meta_default(lambda: M.block_means(k, key_valid, B))
    E = same_under_meta_default(lambda: M.head_scores(q, w, k, qpos, B, SCALE))
    assert E.shape == (S, H) and bool((E > 0).any())
    same_under_meta_default(lambda: M.head_scores(q, w, k, qpos, B, SCALE, key_valid=key_valid))
    all_heads = same_under_meta_default(lambda: M.route_heads(E, H))
    assert torch.equal(all_heads, torch.arange(H).expand(S, H))
    same_under_meta_default(lambda: M.route_heads(E, 2))
    # the public entry point, blockmean router, with all heads and with fewer
    idx, lin = same_under_meta_default(lambda: M.route(q, w, k, qpos, B, SCALE, H, router="blockmean"))
    assert torch.equal(idx, all_heads) and lin is None
    same_under_meta_default(lambda: M.route(q, w, k, qpos, B, SCALE, 2, router="blockmean"))


def test_moment_router_keeps_input_device(data):
    q, w, k, qpos, _, key_valid = data
    mean, cov = same_under_meta_default(lambda: M.key_moments(k, None, B, qpos + 1))
    assert mean.shape == (S, D) and cov.shape == (S, D, D)
    same_under_meta_default(lambda: M.key_moments(k, key_valid, B, qpos + 1))
    idx, lin = same_under_meta_default(lambda: M.moment_route(q, w, k, qpos, B, SCALE, 2, chunk=5))
    assert idx.shape == (S, 2) and lin.shape == (S, D)
    same_under_meta_default(lambda: M.moment_route(q, w, k, qpos, B, SCALE, 2, key_valid=key_valid))
    idx_all, lin_all = same_under_meta_default(lambda: M.moment_route(q, w, k, qpos, B, SCALE, H))
    assert torch.equal(idx_all, torch.arange(H).expand(S, H)) and lin_all is None
    same_under_meta_default(lambda: M.route(q, w, k, qpos, B, SCALE, H, router="moments"))
    same_under_meta_default(lambda: M.route(q, w, k, qpos, B, SCALE, 3, router="moments"))


def test_break_ties_keeps_input_device():
    scores = torch.zeros(3, 5)
    out = same_under_meta_default(lambda: M.break_ties_(scores.clone()))
    assert out.argmax(-1).tolist() == [4, 4, 4]


def test_routed_topk_torch_keeps_input_device(data):
    q, w, k, qpos, mask, key_valid = data
    valid = mask & key_valid[None, :]
    head_idx, lin = M.moment_route(q, w, k, qpos, B, SCALE, 2)
    # dense (all heads), one chunk and several
    dense = same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, None, qpos, 4, SCALE))
    same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, None, qpos, 4, SCALE, valid=valid, chunk=5))
    # routed heads, with and without the linear remainder and a key mask
    same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, head_idx, qpos, 4, SCALE))
    same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, head_idx, qpos, 4, SCALE, valid=valid, lin=lin,
                                                        chunk=3))
    # hierarchical: candidates fewer than the prefix (complement of the routed heads re-scored) ...
    hier = same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, head_idx, qpos, 4, SCALE, candidates=6,
                                                               lin=lin, chunk=5))
    same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, head_idx, qpos, 4, SCALE, candidates=6,
                                                        valid=valid))
    # ... and covering every key (the dense branch), and "auto"
    same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, head_idx, qpos, 4, SCALE, candidates=100,
                                                        valid=valid, chunk=4))
    same_under_meta_default(lambda: M.routed_topk_torch(q, w, k, head_idx, qpos, 4, SCALE, candidates="auto"))
    assert dense.shape == hier.shape == (S, 4)


def test_misa_topk_and_recall_keep_input_device(data):
    q, w, k, qpos, _, key_valid = data
    for router in M.ROUTERS:
        for hierarchical in (False, True):
            same_under_meta_default(lambda: M.misa_topk(q, w, k, qpos, 4, SCALE, active_heads=2, block_size=B,
                                                        hierarchical=hierarchical, candidates=6, key_valid=key_valid,
                                                        kernel="torch", router=router))
    dense = same_under_meta_default(lambda: M.dense_topk(q, w, k, qpos, 4, SCALE, kernel="torch"))
    sel, _ = M.misa_topk(q, w, k, qpos, 4, SCALE, active_heads=1, block_size=B, kernel="torch")
    r = same_under_meta_default(lambda: M.recall(sel, dense, qpos))
    assert 0.0 <= r <= 1.0
    assert same_under_meta_default(lambda: M.recall(dense, dense)) == 1.0
    assert same_under_meta_default(lambda: M.recall(dense, dense, qpos)) == 1.0
