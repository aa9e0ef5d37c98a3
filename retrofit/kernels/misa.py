"""MISA scoring for DeepSeek-Sparse-Attention indexers: torch reference, chunked CPU path, Triton GPU kernel.

Notation (one sequence unless a batch dimension is named):
    q  [S, H, D]   indexer queries (RoPE already applied), H heads
    w  [S, H]      per-head weights (may be negative; DSA multiplies them by H**-0.5)
    k  [T, D]      the one key shared by all heads
    scale          DSA's softmax_scale (D**-0.5)

DSA token score  I[t, s] = sum_j w[t, j] * ReLU(scale * q[t, j] . k[s])
MISA head score  E[t, j] = sum_b |w[t, j] * ReLU(scale * q[t, j] . kbar[b])|   over the causal key blocks of query t
MISA token score I_h[t, s] = the same sum over the top-h heads of E[t, :] only.

Moment router (``router="moments"``, this library's default; the paper's block means are ``router="blockmean"``):
per query, model head ``j``'s pre-activation over the visible keys as ``X_j ~ N(mu_j, sigma_j^2)`` with
``mu_j = scale q_j . mean(k)``, ``sigma_j^2 = scale^2 q_j^T Cov(k) q_j`` (key moments of the causal prefix, taken at
the last block boundary). ``ReLU(X_j)`` is replaced by its best linear fit ``Phi(mu_j/sigma_j) X_j + c_j``
(Stein: the slope is ``P(X_j > 0)``); the heads whose fit is worst -- largest ``|w_j| sqrt(Var ReLU(X_j) -
Phi^2 sigma_j^2)`` -- are routed and scored exactly, and the nearly linear remaining heads (slope above
``linear_threshold``) enter the token score as one linear term ``lin[t] . k[s]`` with
``lin[t] = scale sum_j w_j Phi_j q_j`` (one extra dot product per key; constants do not change a top-k).
Block means measure how much *mass* a head puts on every key; a head whose ReLU is active on nearly all keys
carries much mass but barely changes the ranking, which is what the moment router separates.

Causal blocks: query ``t`` whose last visible key is ``qpos[t]`` sees the full blocks ``b < (qpos[t] + 1) // B``
(mean over their valid keys) and, when ``(qpos[t] + 1) % B != 0``, one partial block: the mean of its valid keys
up to ``qpos[t]`` ("a partial block is averaged over its real length"). Nothing after ``qpos[t]`` enters the
routing, so MISA stays causal (cached decoding equals a full forward).

Three implementations of the routed token score, all tested against each other:
    * :func:`routed_scores_reference` -- the exact op sequence of transformers' ``DeepseekV32Indexer`` on the
      gathered heads (broadcast matmul, ReLU, weighted head sum, mask). With all heads it is bit-identical to DSA.
    * :func:`routed_topk_torch` -- the CPU path: queries in chunks, each chunk one GEMM ``[c*h, D] @ [D, T_c]``
      against only the keys its causal prefix reaches, then top-k; never materialises ``[S, T]``.
    * :func:`routed_scores_triton` -- a Triton kernel (GPU): per tile of queries x keys, loop over the h
      selected heads, ``tl.dot`` of the per-row gathered queries with the key tile, ReLU, weight, accumulate.
:func:`routed_topk` picks Triton on CUDA tensors when triton is importable, else the torch path.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: only GPUs use it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU machines
    triton = None
    tl = None
    HAS_TRITON = False

# Triton's interpreter (TRITON_INTERPRET=1, read by triton when it is imported) runs the same kernel on CPU
# tensors, slowly, with numpy: the test suite checks the kernel that way on machines without a GPU.
# kernel="triton" then accepts CPU tensors; kernel="auto" still takes Triton only on CUDA.
TRITON_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = [
    "HAS_TRITON",
    "block_means",
    "head_scores",
    "route_heads",
    "key_moments",
    "moment_route",
    "route",
    "ROUTERS",
    "routed_scores_reference",
    "break_ties_",
    "routed_topk_torch",
    "auto_candidates",
    "routed_scores_triton",
    "routed_topk",
    "misa_topk",
    "dense_topk",
    "indexer_flops",
    "recall",
    "mask_info",
]


# ----------------------------------------------------------------------------------------------------------
# masks, routing
# ----------------------------------------------------------------------------------------------------------
# an additive mask entry at or below this hides its key: transformers fills with the dtype's minimum or -inf,
# hand-made masks often with -1e4 or -1e9 (-1e4 in bfloat16 is -9984); a visible entry is 0 (or a small bias)
MASKED_AT = -1e3


def mask_info(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a ``[..., S, T]`` attention mask (bool: True = visible; float: additive, 0 = visible, ``<= MASKED_AT``
    hidden) return ``(valid [..., S, T] bool, qpos [..., S] long = last visible key or -1, key_valid [..., T]
    bool)``."""
    if mask.dtype == torch.bool:
        valid = mask
    else:
        valid = mask > MASKED_AT
    T = valid.shape[-1]
    ar = torch.arange(T, device=valid.device)
    last = torch.where(valid, ar, torch.full_like(ar, -1)).amax(-1)
    return valid, last, valid.any(-2)


def block_means(k: torch.Tensor, key_valid: torch.Tensor | None, block_size: int):
    """Means of the valid keys of each full block, and the running sums used for partial blocks.

    k ``[T, D]``; returns ``(kbar [nb_full, D], csum [T + 1, D], ccount [T + 1])`` where ``csum[i]`` is the sum of
    valid keys before position ``i``.
    """
    T, D = k.shape
    kf = k.float()
    v = torch.ones(T, device=k.device) if key_valid is None else key_valid.float()
    kv = kf * v[:, None]
    csum = torch.cat([kf.new_zeros(1, D), kv.cumsum(0)])
    ccount = torch.cat([v.new_zeros(1), v.cumsum(0)])
    nb = T // block_size
    if nb:
        sums = kv[: nb * block_size].view(nb, block_size, D).sum(1)
        counts = v[: nb * block_size].view(nb, block_size).sum(1)
        kbar = sums / counts.clamp_min(1)[:, None]
    else:
        kbar = kf.new_zeros(0, D)
    return kbar, csum, ccount


def head_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, block_size: int,
                scale: float, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """MISA's head score ``E [S, H]`` for one sequence (see module docstring)."""
    S, H, D = q.shape
    kbar, csum, ccount = block_means(k, key_valid, block_size)
    qf = q.float()
    wa = w.float().abs()
    E = qf.new_zeros(S, H)
    nfull = ((qpos + 1) // block_size).clamp_min(0)  # full blocks visible to each query
    if kbar.shape[0]:
        g = torch.relu(torch.matmul(qf.reshape(S * H, D), kbar.t()) * scale).view(S, H, -1)
        bmask = torch.arange(kbar.shape[0], device=q.device)[None, :] < nfull[:, None]  # [S, nb]
        E = E + (g * bmask[:, None, :]).sum(-1)
    # the partial block of each query: valid keys in [nfull*B, qpos]
    start = (nfull * block_size).clamp(max=k.shape[0])
    end = (qpos + 1).clamp(min=0)
    cnt = ccount[end] - ccount[start]
    part = (csum[end] - csum[start]) / cnt.clamp_min(1)[:, None]  # [S, D]
    has = (end > start) & (cnt > 0)
    gp = torch.relu(torch.einsum("shd,sd->sh", qf, part) * scale)
    E = E + gp * has[:, None]
    return wa * E


def route_heads(E: torch.Tensor, active_heads: int) -> torch.Tensor:
    """Top-``active_heads`` heads per query from ``E [..., H]``, sorted ascending (so all heads -> arange)."""
    H = E.shape[-1]
    if active_heads >= H:
        return torch.arange(H, device=E.device).expand(*E.shape[:-1], H).contiguous()
    return E.topk(active_heads, dim=-1).indices.sort(dim=-1).values


# ----------------------------------------------------------------------------------------------------------
# moment router: Gaussian model of each head's pre-activation, exact heads + one linear remainder term
# ----------------------------------------------------------------------------------------------------------
ROUTERS = ("moments", "blockmean")
_INV_SQRT_2PI = 0.3989422804014327


def _boundary_moments(k: torch.Tensor, key_valid: torch.Tensor | None, block_size: int):
    """Cumulative key sums, outer-product sums and counts at the block boundaries ``0, B, ..., nb B``."""
    T, D = k.shape
    kf = k.float()
    v = torch.ones(T, device=k.device) if key_valid is None else key_valid.float()
    kv = kf * v[:, None]
    nb = T // block_size
    s1, s2, cnt = kf.new_zeros(nb + 1, D), kf.new_zeros(nb + 1, D, D), v.new_zeros(nb + 1)
    if nb:
        blk = kv[: nb * block_size].view(nb, block_size, D)
        s1[1:] = blk.sum(1).cumsum(0)
        s2[1:] = torch.bmm(blk.transpose(1, 2), blk).cumsum(0)
        cnt[1:] = v[: nb * block_size].view(nb, block_size).sum(1).cumsum(0)
    return kv, v, s1, s2, cnt


def key_moments(k: torch.Tensor, key_valid: torch.Tensor | None, block_size: int, ends: torch.Tensor,
                _boundary=None):
    """Causal key moments for queries that see ``ends`` keys (``[S]``, = qpos + 1).

    A query is given the mean ``[S, D]`` and covariance ``[S, D, D]`` of the valid keys before its last block
    boundary ``(ends // B) * B``; queries that have not reached one (``ends < B``) get those of their whole prefix.
    Nothing at or after ``ends`` enters, so routing stays causal. Cost: ``T D^2`` once per sequence (outer
    products summed per block) plus, for queries inside the first block, the running moments of that block.
    """
    T, D = k.shape
    kv, v, s1, s2, cnt = _boundary if _boundary is not None else _boundary_moments(k, key_valid, block_size)
    ends = ends.clamp(0, T)
    bidx = torch.div(ends, block_size, rounding_mode="floor")
    S1, S2, C = s1[bidx], s2[bidx], cnt[bidx]
    early = bidx == 0
    if bool(early.any()):  # queries before the first boundary: moments of their own (short) prefix
        ee = ends[early]
        u, inv = torch.unique(ee, sorted=True, return_inverse=True)
        # running sums at the distinct prefix lengths only: one small product per segment between them
        e1, e2, ec = kv.new_zeros(len(u), D), kv.new_zeros(len(u), D, D), v.new_zeros(len(u))
        a1, a2, ac, prev = kv.new_zeros(D), kv.new_zeros(D, D), v.new_zeros(()), 0
        for i, e in enumerate(u.tolist()):
            seg = kv[prev:e]
            a1, a2, ac = a1 + seg.sum(0), a2 + seg.t() @ seg, ac + v[prev:e].sum()
            e1[i], e2[i], ec[i], prev = a1, a2, ac, e
        S1[early], S2[early], C[early] = e1[inv], e2[inv], ec[inv]
    n = C.clamp_min(1)
    mean = S1 / n[:, None]
    cov = S2 / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    return mean, cov


def moment_route(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, block_size: int,
                 scale: float, active_heads: int, key_valid: torch.Tensor | None = None,
                 linear_threshold: float | None = 0.7, chunk: int = 256):
    """The moment router for one sequence (see module docstring).

    Returns ``(head_idx [S, h] sorted, lin [S, D] float32 or None)``: the exactly scored heads, and the linear
    remainder vector so that the routed token score is ``sum_{j in head_idx} w_j ReLU(scale q_j . k) + lin . k``.
    ``linear_threshold=None`` drops the remainder (heads only). ``active_heads >= H`` returns all heads, no term.
    """
    S, H, D = q.shape
    if active_heads >= H:
        return torch.arange(H, device=q.device).expand(S, H).contiguous(), None
    qf, wf = q.float(), w.float()
    bnd = _boundary_moments(k, key_valid, block_size)
    heads, lins = [], []
    for r0 in range(0, S, chunk):
        r1 = min(S, r0 + chunk)
        mean, cov = key_moments(k, key_valid, block_size, qpos[r0:r1] + 1, _boundary=bnd)
        qs = qf[r0:r1]
        mu = torch.bmm(qs, mean.unsqueeze(-1)).squeeze(-1) * scale  # [s, H]
        var = (torch.bmm(qs, cov) * qs).sum(-1).clamp_min(0) * (scale * scale)
        sig = var.sqrt().clamp_min(1e-12 * (mu.abs().amax(-1, keepdim=True) + 1e-30))
        z = mu / sig
        cdf = torch.special.ndtr(z)
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        m1 = mu * cdf + sig * pdf  # E ReLU(X)
        m2 = (mu * mu + var) * cdf + mu * sig * pdf  # E ReLU(X)^2
        resid = (m2 - m1 * m1 - cdf * cdf * var).clamp_min(0)  # error variance of the linear fit
        score = wf[r0:r1].abs() * resid.sqrt()
        idx = score.topk(active_heads, dim=-1).indices.sort(dim=-1).values
        heads.append(idx)
        if linear_threshold is not None:
            coef = wf[r0:r1] * cdf * (cdf > linear_threshold)
            coef = coef.scatter(1, idx, 0.0)  # routed heads are scored exactly
            lins.append(torch.bmm(coef.unsqueeze(1), qs).squeeze(1) * scale)
    return torch.cat(heads), (torch.cat(lins) if lins else None)


def route(q, w, k, qpos, block_size, scale, active_heads, key_valid=None, router="moments",
          linear_threshold=0.7):
    """``(head_idx [S, h], lin [S, D] or None)`` for one sequence with the named router."""
    if router == "moments":
        return moment_route(q, w, k, qpos, block_size, scale, active_heads, key_valid=key_valid,
                            linear_threshold=linear_threshold)
    if router == "blockmean":
        return route_heads(head_scores(q, w, k, qpos, block_size, scale, key_valid=key_valid), active_heads), None
    raise ValueError(f"unknown MISA router {router!r}; choose one of {ROUTERS}")


_TIE_EPS = 2.0 ** -120  # far below any nonzero score's float32 ulp, far above float32's smallest normal


def break_ties_(scores: torch.Tensor) -> torch.Tensor:
    """Order exactly tied routed scores by key position (later key first), in place.

    With few heads many keys score exactly 0 (every routed head's ReLU is 0), and ``topk`` breaks such ties
    by an unspecified rule that depends on the row length, so a query's selection would change with the number
    of keys *after* it (a full forward vs a cached decode). Adding ``position * 2**-120`` leaves every nonzero
    score unchanged (it is below their float32 rounding) and makes the order of zeros a function of position
    only, so the selection stays causal. ``-inf`` (masked) stays ``-inf``.
    """
    ar = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    return scores.add_(ar * _TIE_EPS)


# ----------------------------------------------------------------------------------------------------------
# reference: DSA's own op sequence on the gathered heads (batched, as transformers' indexer)
# ----------------------------------------------------------------------------------------------------------
def routed_scores_reference(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, head_idx: torch.Tensor,
                            scale: float, mask: torch.Tensor | None = None,
                            lin: torch.Tensor | None = None) -> torch.Tensor:
    """Token scores with the selected heads only. q ``[B,S,H,D]``, w ``[B,S,H]``, k ``[B,T,D]``,
    head_idx ``[B,S,h]``, mask ``[B,S,T]`` (bool or additive), lin ``[B,S,D]`` the moment router's linear
    remainder (added as ``lin . k``) -> ``[B,S,T]`` float32.

    Written as transformers' ``DeepseekV32Indexer.forward`` computes it, so that ``head_idx = arange(H)`` gives
    the dense indexer's scores bit for bit.
    """
    D = q.shape[-1]
    q_sel = torch.gather(q, 2, head_idx[..., None].expand(*head_idx.shape, D))
    w_sel = torch.gather(w, 2, head_idx)
    scores = torch.matmul(q_sel.float(), k.transpose(-1, -2).float().unsqueeze(1)) * scale
    scores = torch.relu(scores)
    index_scores = torch.matmul(w_sel.float().unsqueeze(-2), scores).squeeze(-2)
    if lin is not None:
        index_scores = index_scores + torch.matmul(lin.float(), k.transpose(-1, -2).float())
    if mask is not None:
        if mask.dtype == torch.bool:
            index_scores = index_scores.masked_fill(~mask, float("-inf"))
        else:
            index_scores = index_scores + mask
    return index_scores


# ----------------------------------------------------------------------------------------------------------
# CPU path: chunked GEMMs over the causal prefix, top-k inside the chunk loop
# ----------------------------------------------------------------------------------------------------------
def _chunk_rows(H: int, T: int, budget_bytes: int = 1 << 28) -> int:
    return max(1, min(4096, budget_bytes // max(1, 4 * H * T)))


def _complement(head_idx: torch.Tensor, H: int) -> torch.Tensor:
    """``[S, H - h]`` the heads not in each row of ``head_idx [S, h]`` (ascending)."""
    keep = torch.ones(head_idx.shape[0], H, dtype=torch.bool, device=head_idx.device)
    keep.scatter_(1, head_idx, False)
    return torch.nonzero(keep)[:, 1].view(head_idx.shape[0], H - head_idx.shape[1])


def auto_candidates(n: int, topk: int) -> int:
    """MISA-dagger's ``k'`` for a query chunk whose longest causal prefix has ``n`` keys (``candidates="auto"``):
    ``max(2 topk, n / 8)`` rounded up to a multiple of 256, at most ``n``. Re-scoring costs ``k' H`` dot
    products per query against ``n h`` for the routed pass, so ``k'`` grows with the context but stays a
    fixed fraction of it (chosen on a held-out text segment, see BENCHMARKS.md)."""
    kc = max(2 * topk, -(-n // 8))
    kc = -(-kc // 256) * 256
    return int(min(n, kc))


def _n_candidates(candidates, n: int, topk: int) -> int:
    if candidates == "auto":
        return auto_candidates(n, topk)
    return int(candidates)


def routed_topk_torch(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, head_idx: torch.Tensor | None,
                      qpos: torch.Tensor, topk: int, scale: float, valid: torch.Tensor | None = None,
                      candidates: int | str | None = None, chunk: int | None = None,
                      lin: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k key indices per query for one sequence, scoring only the causal prefix of each chunk of queries.

    q ``[S,H,D]``, w ``[S,H]``, k ``[T,D]``, head_idx ``[S,h]`` (None = all heads, i.e. the dense indexer),
    qpos ``[S]`` last visible key per query, valid ``[S,T]`` optional extra key mask (e.g. padding),
    lin ``[S,D]`` the moment router's linear remainder (token score ``+= lin . k``).
    ``candidates``: hierarchical mode -- keep that many keys (an int, or ``"auto"``: :func:`auto_candidates` of
    the chunk's prefix length) by the routed score, gather their keys once and re-score them with all heads in
    one batched product. Returns ``[S, min(topk, T)]`` int64.
    """
    S, H, D = q.shape
    T = k.shape[0]
    kk = min(topk, T)
    kf = k.float()
    qf = q.float()
    wf = w.float()
    h = H if head_idx is None else head_idx.shape[1]
    chunk = chunk or _chunk_rows(h, T)
    out = torch.empty(S, kk, dtype=torch.long, device=q.device)
    ar = torch.arange(T, device=q.device)
    wpos = wf * scale  # ReLU(scale * x) = scale * ReLU(x) for scale > 0: fold the scale into the weights
    for r0 in range(0, S, chunk):
        r1 = min(S, r0 + chunk)
        c = r1 - r0
        qmin = int(qpos[r0:r1].min())
        Tc = max(int(qpos[r0:r1].max()) + 1, kk)
        kc = kf[:Tc]
        ncand = None if candidates is None else _n_candidates(candidates, Tc, kk)
        if head_idx is not None and ncand is not None and ncand >= Tc:
            # MISA-dagger where k' covers every key: the re-score is the dense score, so skip the routed pass
            sc = torch.matmul(qf[r0:r1].reshape(c * H, D), kc.t()).relu_()
            scores = torch.bmm(wpos[r0:r1].unsqueeze(1), sc.view(c, H, Tc)).squeeze(1)
            del sc
            lo = max(qmin + 1, 0)
            if lo < Tc:
                scores[:, lo:].masked_fill_(ar[None, lo:Tc] > qpos[r0:r1, None], float("-inf"))
            if valid is not None:
                scores.masked_fill_(~valid[r0:r1, :Tc], float("-inf"))
            out[r0:r1] = scores.topk(kk, dim=-1, sorted=False).indices
            continue
        if head_idx is None:
            qs, ws = qf[r0:r1], wpos[r0:r1]
        else:
            idx = head_idx[r0:r1]
            qs = torch.gather(qf[r0:r1], 1, idx[..., None].expand(c, h, D))
            ws = torch.gather(wpos[r0:r1], 1, idx)
        sc = torch.matmul(qs.reshape(c * h, D), kc.t()).relu_()
        scores = torch.bmm(ws.unsqueeze(1), sc.view(c, h, Tc)).squeeze(1)  # [c, Tc]
        del sc
        hier = ncand is not None and head_idx is not None and ncand < Tc
        exact = scores.clone() if (hier and lin is not None) else scores  # the routed heads' exact part
        if lin is not None and head_idx is not None:
            scores.addmm_(lin[r0:r1].float(), kc.t())
        if head_idx is not None:
            break_ties_(scores)
        lo = max(qmin + 1, 0)  # keys before every query's position are visible to the whole chunk
        if lo < Tc:
            tail = scores[:, lo:]
            tail.masked_fill_(ar[None, lo:Tc] > qpos[r0:r1, None], float("-inf"))
        if valid is not None:
            scores.masked_fill_(~valid[r0:r1, :Tc], float("-inf"))
        if hier:
            cand = scores.topk(ncand, dim=-1, sorted=False)
            # the candidates' keys gathered once; the heads not routed scored in one batched product, the
            # routed heads' exact scores reused: together the dense score of every candidate
            kc_sel = torch.index_select(kc, 0, cand.indices.reshape(-1)).view(c, ncand, D)
            rest = _complement(head_idx[r0:r1], H)
            q_rest = torch.gather(qf[r0:r1], 1, rest[..., None].expand(c, rest.shape[1], D))
            w_rest = torch.gather(wpos[r0:r1], 1, rest)
            full = torch.bmm(q_rest, kc_sel.transpose(1, 2)).relu_()  # [c, H - h, k']
            rescored = torch.bmm(w_rest.unsqueeze(1), full).squeeze(1)  # [c, k']
            rescored += torch.gather(exact, 1, cand.indices)
            rescored.masked_fill_(torch.isinf(cand.values), float("-inf"))
            sel = rescored.topk(kk, dim=-1, sorted=False).indices
            out[r0:r1] = torch.gather(cand.indices, 1, sel)
        else:  # (k' covering every visible key took the dense branch at the top of the loop)
            out[r0:r1] = scores.topk(kk, dim=-1, sorted=False).indices
    return out


# ----------------------------------------------------------------------------------------------------------
# GPU path: Triton
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _routed_scores_kernel(q_ptr, w_ptr, k_ptr, idx_ptr, qpos_ptr, out_ptr, S, T, scale,
                              H: tl.constexpr, D: tl.constexpr, NH: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.arange(0, D)
        mrow = rm < S
        qp = tl.load(qpos_ptr + rm, mask=mrow, other=-1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # causal skip: a key tile past every query's prefix costs nothing
        if pid_n * BLOCK_N <= tl.max(qp, axis=0):
            kt = tl.load(k_ptr + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < T), other=0.0)
            for i in range(NH):
                hid = tl.load(idx_ptr + rm * NH + i, mask=mrow, other=0)
                qt = tl.load(q_ptr + (rm[:, None] * H + hid[:, None]) * D + rd[None, :], mask=mrow[:, None],
                             other=0.0)
                wv = tl.load(w_ptr + rm * H + hid, mask=mrow, other=0.0)
                if IEEE:
                    s = tl.dot(qt, tl.trans(kt), input_precision="ieee")
                else:
                    s = tl.dot(qt, tl.trans(kt))
                s = tl.maximum(s * scale, 0.0)
                acc += wv[:, None] * s
        vis = rn[None, :] <= qp[:, None]
        acc = tl.where(vis, acc, float("-inf"))
        tl.store(out_ptr + rm[:, None] * T + rn[None, :], acc, mask=mrow[:, None] & (rn[None, :] < T))


def routed_scores_triton(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, head_idx: torch.Tensor | None,
                         qpos: torch.Tensor, scale: float, ieee: bool = True,
                         block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Triton routed token scores for one sequence: ``[S, T]`` float32, ``-inf`` after each query's ``qpos``.

    q ``[S,H,D]`` (fp32/bf16/fp16, D a power of two >= 16), w ``[S,H]``, k ``[T,D]`` same dtype as q,
    head_idx ``[S,h]`` int (None = all heads = the dense indexer). ``ieee=False`` lets fp32 dots use TF32.
    """
    if not HAS_TRITON:
        raise RuntimeError("routed_scores_triton needs the `triton` package (GPU builds of torch ship it).")
    if not (q.is_cuda or TRITON_INTERPRETED):
        raise ValueError("routed_scores_triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, slowly); "
                         "on CPU use routed_topk_torch.")
    S, H, D = q.shape
    T = k.shape[0]
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim {D} must be a power of two >= 16 for the Triton kernel")
    if head_idx is None:
        head_idx = torch.arange(H, device=q.device, dtype=torch.int32).expand(S, H)
    head_idx = head_idx.to(torch.int32).contiguous()
    out = torch.empty(S, T, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(S, block_m), triton.cdiv(T, block_n))
    _routed_scores_kernel[grid](q.contiguous(), w.float().contiguous(), k.to(q.dtype).contiguous(), head_idx,
                                qpos.to(torch.int32).contiguous(), out, S, T, float(scale), H=H, D=D,
                                NH=head_idx.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
                                IEEE=bool(ieee and q.dtype == torch.float32))
    return out


# ----------------------------------------------------------------------------------------------------------
# dispatch + whole MISA selection for one sequence
# ----------------------------------------------------------------------------------------------------------
KERNELS = ("auto", "torch", "triton")


def _use_triton(t: torch.Tensor, kernel: str) -> bool:
    if kernel not in KERNELS:  # a misspelt name would otherwise run the torch path without a word
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton":
        if not (HAS_TRITON and (t.is_cuda or TRITON_INTERPRETED)):
            raise RuntimeError("kernel='triton' needs CUDA tensors and the triton package (or TRITON_INTERPRET=1 "
                               "set before triton is imported, to run it on CPU); use kernel='auto'.")
        return True
    return kernel == "auto" and HAS_TRITON and t.is_cuda


def routed_topk(q, w, k, head_idx, qpos, topk, scale, valid=None, candidates=None, kernel: str = "auto",
                ieee: bool = True, chunk: int | None = None, lin: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k keys per query with the given heads (None = all) and optional linear remainder ``lin``.
    Triton on CUDA when available, else torch."""
    T = k.shape[0]
    kk = min(topk, T)
    if not _use_triton(q, kernel):
        return routed_topk_torch(q, w, k, head_idx, qpos, topk, scale, valid=valid, candidates=candidates,
                                 chunk=chunk, lin=lin)
    scores = routed_scores_triton(q, w, k, head_idx, qpos, scale, ieee=ieee)
    if lin is not None and head_idx is not None:
        scores += torch.matmul(lin.float(), k.float().t())
    if head_idx is not None:
        break_ties_(scores)
    if valid is not None:
        scores.masked_fill_(~valid, float("-inf"))
    if candidates is not None and head_idx is not None:
        kc = min(_n_candidates(candidates, T, kk), T)
        cand = scores.topk(kc, dim=-1)
        kc_sel = k.float()[cand.indices]
        full = torch.bmm(kc_sel, q.float().transpose(1, 2)).mul_(scale).relu_()
        rescored = torch.bmm(full, w.float().unsqueeze(-1)).squeeze(-1)
        rescored.masked_fill_(torch.isinf(cand.values), float("-inf"))
        return torch.gather(cand.indices, 1, rescored.topk(kk, dim=-1).indices)
    return scores.topk(kk, dim=-1).indices


def misa_topk(q, w, k, qpos, topk, scale, active_heads=8, block_size=1024, hierarchical=False, candidates="auto",
              valid=None, key_valid=None, kernel="auto", ieee=True, chunk=None, router="moments",
              linear_threshold=0.7):
    """MISA (or MISA-dagger with ``hierarchical``) top-k selection for one sequence; returns (indices, head_idx)."""
    H = q.shape[1]
    lin = None
    if active_heads >= H:
        head_idx = None
    else:
        head_idx, lin = route(q, w, k, qpos, block_size, scale, active_heads, key_valid=key_valid, router=router,
                              linear_threshold=linear_threshold)
    idx = routed_topk(q, w, k, head_idx, qpos, topk, scale, valid=valid,
                      candidates=candidates if hierarchical else None, kernel=kernel, ieee=ieee, chunk=chunk,
                      lin=lin)
    return idx, head_idx


def dense_topk(q, w, k, qpos, topk, scale, valid=None, kernel="auto", ieee=True, chunk=None):
    """The dense DSA indexer's top-k (all heads) through the same code path."""
    return routed_topk(q, w, k, None, qpos, topk, scale, valid=valid, kernel=kernel, ieee=ieee, chunk=chunk)


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------
def indexer_flops(qpos: torch.Tensor, H: int, D: int, active_heads: int | None = None, block_size: int = 1024,
                  hierarchical: bool = False, candidates: int | str = 8192, router: str = "blockmean",
                  topk: int = 2048, linear: bool = True) -> float:
    """Floating-point operations of the indexer's scoring for queries with last visible keys ``qpos``.

    One (query, key, head) costs ``2D`` (dot) + 1 (scale) + 1 (ReLU) + 2 (weighted sum) = ``2D + 4``.
    Dense: every visible key with all H heads. MISA: the router + the routed score with h heads + for
    MISA-dagger the all-head re-score of ``min(k', visible)`` candidates (``candidates="auto"``: k' from each
    query's own prefix length, :func:`auto_candidates`). Top-k selection is not counted (the same for both).
    Routers: ``blockmean`` -- the head score over the visible blocks (all H heads, + 1 for |.|) and the key
    pooling (D adds per key, once per sequence); ``moments`` -- per query ``mu`` (2D per head), ``q^T C q``
    (2D^2 + 2D per head), the Gaussian statistics (~20 per head), the remainder vector (2D per head) and its
    score (2D + 1 per key, when ``linear``); per sequence the key moments (2D^2 + D per key).
    """
    n = (qpos.double() + 1).clamp_min(0)
    per = 2 * D + 4
    if active_heads is None or active_heads >= H:
        return float((n * H * per).sum())
    T = float(n.max()) if n.numel() else 0.0
    if router == "moments":
        f = n.numel() * H * (2 * D * D + (6 if linear else 4) * D + 20) + T * (2 * D * D + D)
        f = f + (n * (active_heads * per + ((2 * D + 1) if linear else 0))).sum()
    elif router == "blockmean":
        nb = torch.ceil(n / block_size)
        f = (nb * H * (per + 1)).sum() + (n * active_heads * per).sum() + T * D
    else:
        raise ValueError(f"unknown MISA router {router!r}; choose one of {ROUTERS}")
    if hierarchical:
        if candidates == "auto":
            kc = torch.tensor([auto_candidates(int(x), topk) for x in n.long().tolist()], dtype=torch.double)
        else:
            kc = torch.full_like(n, float(candidates))
        f = f + (torch.minimum(n, kc) * H * per).sum()
    return float(f)


def recall(selected: torch.Tensor, reference: torch.Tensor, qpos: torch.Tensor | None = None) -> float:
    """Mean over queries of |selected ∩ reference| / |reference| (``[S, k]`` index sets). With ``qpos``,
    reference entries past a query's prefix (DSA's filler picks when fewer than k keys are visible) are ignored."""
    S, kk = reference.shape
    ref_valid = torch.ones_like(reference, dtype=torch.bool) if qpos is None else reference <= qpos[:, None]
    sel_valid = torch.ones_like(selected, dtype=torch.bool) if qpos is None else selected <= qpos[:, None]
    M = int(max(int(reference.max()), int(selected.max()))) + 1
    hits = torch.zeros(S, M + 1, dtype=torch.bool, device=reference.device)  # column M collects invalid picks
    hits.scatter_(1, torch.where(sel_valid, selected, torch.full_like(selected, M)), True)
    hits[:, M] = False
    inter = torch.gather(hits, 1, reference) & ref_valid
    denom = ref_valid.sum(1).clamp_min(1)
    return float((inter.sum(1).float() / denom).mean())
