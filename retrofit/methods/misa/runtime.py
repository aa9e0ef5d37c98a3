"""MISA: a router over the heads of a DeepSeek-Sparse-Attention indexer (arXiv 2605.07363).

``retrofit.attach(model, "misa", active_heads=8)`` replaces the ``forward`` of every DSA indexer
(``self_attn.indexer`` of DeepSeek-V3.2 / GLM-MoE-DSA in transformers) with MISA's routed scoring:
a router scores each indexer head per query (by default from the causal key moments, see kernels.misa; the
paper's block means with ``router="blockmean"``), the top ``active_heads`` heads (plus, with the moment router,
one linear term for the nearly linear remaining heads) score the tokens, the top-k tokens are returned as before.
``hierarchical=True`` (MISA-dagger) keeps ``candidates`` keys by the routed
score and re-scores them with all heads. Training-free: the artifact holds only the config.
``detach()`` restores the indexers' own forward. See docs/misa.md.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch

from retrofit.core.hooks import patch_forward
from retrofit.kernels import misa as K
from retrofit.methods import Method, register_method
from retrofit.methods.misa.config import MisaConfig

__all__ = ["Misa"]

# transformers indexer class -> the RoPE function its forward uses (name in its own module)
_ROPE_FN = {
    "DeepseekV32Indexer": "apply_rotary_pos_emb",  # non-interleaved (half split)
    "GlmMoeDsaIndexer": "apply_rotary_pos_emb_interleave",
}
# Below this many (query, key, head) triples the exact reference path runs (also on CPU in 'auto').
_REFERENCE_MAX = 1 << 24


def _rope_fn(indexer):
    name = _ROPE_FN.get(type(indexer).__name__)
    mod = sys.modules.get(type(indexer).__module__)
    fn = getattr(mod, name, None) if name else None
    if fn is None:
        raise TypeError(
            f"MISA does not know the indexer class {type(indexer).__name__}; supported: {sorted(_ROPE_FN)} "
            "(transformers DeepSeek-V3.2 and GLM-MoE-DSA)."
        )
    return fn


def _project(indexer, rope, hidden_states, q_resid, position_embeddings, past_key_values):
    """q [B,S,H,D], k [B,T,D], weights [B,S,H]: the indexer's own projections, as its forward computes them."""
    B, S, _ = hidden_states.shape
    cos, sin = position_embeddings
    q = indexer.wq_b(q_resid).view(B, S, indexer.n_heads, indexer.head_dim)
    r = indexer.qk_rope_head_dim
    q_rot, q_pass = torch.split(q, [r, indexer.head_dim - r], dim=-1)
    k = indexer.k_norm(indexer.wk(hidden_states)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [r, indexer.head_dim - r], dim=-1)
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    if past_key_values is not None:
        k = past_key_values.update_indexer(k, indexer.layer_idx)
    weights = indexer.weights_proj(hidden_states.to(indexer.weights_proj.weight.dtype)).float() * (
        indexer.n_heads**-0.5)
    return q, k, weights


@register_method("misa")
class Misa(Method):
    config_cls = MisaConfig
    prompt_policy = "continuation"  # head routing per query token, causal

    # lifecycle ------------------------------------------------------------------------------------
    def _attach(self, tensors, meta):
        indexers = self.adapter.indexers(self.model)
        if not indexers:
            raise ValueError(
                f"{type(self.model).__name__} has no DeepSeek-Sparse-Attention indexer, so MISA has nothing to "
                "route. MISA needs a DSA model (model_type deepseek_v32 or glm_moe_dsa)."
            )
        for i, idx in indexers.items():
            _rope_fn(idx)  # clear error for unknown indexer classes
            if (self.config.hierarchical and self.config.candidates != "auto"
                    and self.config.candidates < idx.index_topk):
                raise ValueError(f"candidates={self.config.candidates} is below the indexer's top-k "
                                 f"({idx.index_topk}) in layer {i}: use candidates >= {idx.index_topk}.")
        self.indexers = indexers
        self._stats = defaultdict(lambda: defaultdict(float))
        self._patches = [patch_forward(idx, _make_forward(self, i), bind=True) for i, idx in indexers.items()]

    def _detach(self):
        for p in reversed(getattr(self, "_patches", [])):
            p.restore()
        self._patches = []

    def stats(self) -> dict:
        """Per layer: calls, queries, dense and MISA indexer FLOPs, scoring time, and (``measure=True``) the
        recall of the dense indexer's selection; plus totals."""
        layers = {}
        for i, s in sorted(self._stats.items()):
            d = dict(s)
            if d.get("recall_n"):
                d["recall"] = d["recall_sum"] / d["recall_n"]
            d.pop("recall_sum", None)
            d.pop("recall_n", None)
            d["flops_ratio"] = d["flops_dense"] / max(d["flops_misa"], 1.0)
            layers[i] = d
        tot_d = sum(d["flops_dense"] for d in layers.values())
        tot_m = sum(d["flops_misa"] for d in layers.values())
        out = {"layers": layers, "flops_dense": tot_d, "flops_misa": tot_m,
               "flops_ratio": tot_d / max(tot_m, 1.0), "time_s": sum(d["time_s"] for d in layers.values())}
        rec = [d["recall"] for d in layers.values() if "recall" in d]
        if rec:
            out["recall"] = sum(rec) / len(rec)
        return out

    def reset_stats(self):
        self._stats.clear()

    # scoring --------------------------------------------------------------------------------------
    def select(self, indexer, q, k, weights, attention_mask):
        """MISA's top-k indices ``[B,S,topk]`` int32 from the indexer's q/k/weights and its ``[B,S,T]`` mask,
        with ``qpos``, the validity mask and the number of heads each query was actually scored with (its FLOPs
        are counted from that number, not from the config)."""
        cfg = self.config
        B, S, H, D = q.shape
        T = k.shape[1]
        topk = min(indexer.index_topk, T)
        scale = indexer.softmax_scale
        valid, qpos, key_valid = K.mask_info(attention_mask)
        h = min(cfg.active_heads, H)
        use_ref = cfg.kernel == "reference" or (
            cfg.kernel == "auto" and not (K.HAS_TRITON and q.is_cuda) and S * T * H <= _REFERENCE_MAX)
        if use_ref:
            lin = None
            if h >= H:
                head_idx = torch.arange(H, device=q.device).expand(B, S, H)
            else:
                routed = [K.route(q[b], weights[b], k[b], qpos[b], cfg.block_size, scale, h, key_valid=key_valid[b],
                                  router=cfg.router, linear_threshold=cfg.linear_threshold) for b in range(B)]
                head_idx = torch.stack([r[0] for r in routed])
                if routed[0][1] is not None:
                    lin = torch.stack([r[1] for r in routed])
            scores = K.routed_scores_reference(q, weights, k, head_idx, scale, attention_mask, lin=lin)
            if h < H:
                K.break_ties_(scores)
            if cfg.hierarchical and h < H:
                kc = min(K.auto_candidates(T, topk) if cfg.candidates == "auto" else cfg.candidates, T)
                cand = scores.topk(kc, dim=-1)
                k_c = torch.gather(k.float().unsqueeze(1).expand(B, S, T, D), 2,
                                   cand.indices[..., None].expand(B, S, kc, D))  # [B,S,k',D]
                full = torch.relu(torch.matmul(q.float(), k_c.transpose(-1, -2)) * scale)  # [B,S,H,k']
                rescored = torch.matmul(weights.float().unsqueeze(-2), full).squeeze(-2)
                rescored = rescored.masked_fill(torch.isinf(cand.values), float("-inf"))
                sel = torch.gather(cand.indices, -1, rescored.topk(topk, dim=-1).indices)
            else:
                sel = scores.topk(topk, dim=-1).indices
            heads = head_idx.shape[-1]
        else:
            picks = [K.misa_topk(q[b], weights[b], k[b], qpos[b], topk, scale, active_heads=h,
                                 block_size=cfg.block_size, hierarchical=cfg.hierarchical, candidates=cfg.candidates,
                                 valid=valid[b], key_valid=key_valid[b], kernel=cfg.kernel, router=cfg.router,
                                 linear_threshold=cfg.linear_threshold) for b in range(B)]
            sel = torch.stack([p[0] for p in picks])
            heads = H if picks[0][1] is None else picks[0][1].shape[-1]
        return sel.to(torch.int32), qpos, valid, heads

    def _record(self, layer, indexer, q, k, weights, attention_mask, sel, qpos, valid, seconds, heads):
        cfg = self.config
        st = self._stats[layer]
        B, S, H, D = q.shape
        st["calls"] += 1
        st["queries"] += B * S
        st["time_s"] += seconds
        for b in range(B):
            st["flops_dense"] += K.indexer_flops(qpos[b], H, D)
            st["flops_misa"] += K.indexer_flops(qpos[b], H, D, heads, cfg.block_size, cfg.hierarchical,
                                                cfg.candidates, router=cfg.router, topk=sel.shape[-1],
                                                linear=cfg.linear_threshold is not None)
        if cfg.measure:
            topk = sel.shape[-1]
            all_heads = torch.arange(H, device=q.device).expand(B, S, H)
            dense = K.routed_scores_reference(q, weights, k, all_heads, indexer.softmax_scale, attention_mask)
            dense = dense.topk(topk, dim=-1).indices
            for b in range(B):
                st["recall_sum"] += K.recall(sel[b].long(), dense[b], qpos[b])
                st["recall_n"] += 1


def _make_forward(handle: Misa, layer: int):
    @torch.no_grad()
    def forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                past_key_values=None):
        rope = _rope_fn(self)
        q, k, weights = _project(self, rope, hidden_states, q_resid, position_embeddings, past_key_values)
        t0 = time.perf_counter()
        sel, qpos, valid, heads = handle.select(self, q, k, weights, attention_mask)
        dt = time.perf_counter() - t0
        handle._record(layer, self, q, k, weights, attention_mask, sel, qpos, valid, dt, heads)
        return sel

    return forward
