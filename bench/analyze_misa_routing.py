"""Why does MISA's head routing miss the dense indexer's top-k in some layers? Diagnostics on real activations.

For sampled queries of a long held-out Shakespeare context (``--offset`` picks the segment; the benchmark uses
offset 0, router settings are chosen on another segment), with the distilled SmolLM2 lightning indexer:

* per-head contributions ``c[j, s] = w[j] * ReLU(scale * q[j] . k[s])`` for every visible key;
* how alike the heads are (cosine of their contribution profiles over keys, of their queries);
* how spread the heads' mass is (share of the top-8 heads in the total |c| mass);
* how well each head statistic ranks heads: the routed recall when routing by it (heads only, no linear
  remainder), and the overlap of its top-h heads with those of the exact oracles (exact mass over all keys,
  mass on the dense top-k keys);
* what kind of heads each router picks: on how many keys their ReLU is on, how much their contribution varies.

    PYTHONPATH=. python bench/analyze_misa_routing.py --offset 65536 --out bench/results/misa_routing_diag.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.kernels import misa as K  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def per_head_contrib(q, w, k, scale):
    """q [c,H,D], w [c,H], k [T,D] -> c [c,H,T] = w * ReLU(scale q.k)."""
    return torch.relu(torch.einsum("chd,td->cht", q, k) * scale) * w[..., None]


def routed_recall(contrib, heads, dense_sel, n, topk):
    """Recall of the top-k by the sum of ``heads`` contributions (per query) against dense_sel."""
    c = torch.gather(contrib, 1, heads[..., None].expand(*heads.shape, contrib.shape[-1])).sum(1)
    c = c[:, :n]
    K.break_ties_(c)
    sel = c.topk(topk, -1).indices
    qpos = torch.full((c.shape[0],), n - 1)
    return K.recall(sel, dense_sel, qpos)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--offset", type=int, default=65536)
    ap.add_argument("--queries", type=int, default=96, help="query positions spread over the last half")
    ap.add_argument("--active-heads", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--blocks", default="1024,256,64")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--indexer", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from retrofit.methods.misa.distill import default_indexer_path, load_indexers, long_context_inputs
    from retrofit.models import cache_dir, load_model

    model, tok = load_model("default")
    indexers, _ = load_indexers(Path(args.indexer or default_indexer_path()), model)
    layers = sorted(indexers)
    name = f"shakespeare_inputs_{args.length}" + (f"_at{args.offset}" if args.offset else "") + ".safetensors"
    x = long_context_inputs(model, tok, args.data, layers, length=args.length, offset=args.offset,
                            cache=cache_dir() / "misa" / name)
    blocks = [int(b) for b in args.blocks.split(",")]
    h, topk = args.active_heads, args.topk
    L = args.length
    qpos_all = torch.linspace(L // 2, L - 1, args.queries).round().long()
    report = {"length": L, "offset": args.offset, "queries": args.queries, "layers": {}}
    for layer in layers:
        idx = indexers[layer]
        with torch.no_grad():
            q, k, w = (t[0].contiguous() for t in idx.project(x[layer][None]))
        scale = idx.softmax_scale
        H = q.shape[1]
        acc: dict[str, list] = {}

        def add(name, v):
            acc.setdefault(name, []).append(float(v))

        for t in qpos_all.tolist():
            n = t + 1
            qt, wt = q[t:t + 1], w[t:t + 1]
            c = per_head_contrib(qt, wt, k[:n], scale)  # [1,H,n]
            dense = c.sum(1)
            dsel = dense.topk(topk, -1).indices  # [1,topk]
            ca = c.abs()[0]  # [H,n]
            # head similarity: cosine of contribution profiles (centred), of queries
            prof = ca - ca.mean(1, keepdim=True)
            prof = prof / prof.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cs = prof @ prof.t()
            off = ~torch.eye(H, dtype=torch.bool)
            add("profile_cos_mean", cs[off].mean())
            qn = qt[0] / qt[0].norm(dim=1, keepdim=True)
            add("query_cos_mean", (qn @ qn.t())[off].mean())
            mass = ca.sum(1)
            add("top8_mass_share", mass.topk(h).values.sum() / mass.sum())
            add("neg_weight_frac", (wt[0] < 0).float().mean())
            # active fraction of keys per head (ReLU > 0)
            add("relu_active_frac", (ca > 0).float().mean())
            top_mass = ca[:, dsel[0]].sum(1)
            add("topset_mass_share_top8", top_mass.topk(h).values.sum() / top_mass.sum())
            stats = {
                "oracle_mass": mass,
                "oracle_topset": top_mass,
                "oracle_discrim": (c[0][:, dsel[0]].sum(1) - c[0].mean(1) * topk).abs(),
            }
            qp = torch.tensor([t])
            for B in blocks:
                stats[f"blockmean_{B}"] = K.head_scores(qt, wt, k[:n], qp, B, scale)[0]
            # block max of true contributions (not computable cheaply; an oracle of the block idea)
            for B in blocks:
                nb = (n + B - 1) // B
                pad = torch.zeros(H, nb * B)
                pad[:, :n] = ca
                stats[f"oracle_blockmax_{B}"] = pad.view(H, nb, B).amax(-1).sum(-1)
            stats["moments_router"] = torch.zeros(H).scatter(
                0, K.moment_route(qt, wt, k[:n], qp, 1024, scale, h)[0][0], 1.0)  # its picks (a 0/1 score)
            act = (ca > 0).float().mean(1)  # fraction of keys on which each head's ReLU is on
            cv = ca.std(1) / ca.mean(1).clamp_min(1e-12)  # variation of its contribution over the keys
            for name in ("blockmean_1024", "oracle_topset", "moments_router"):
                picks = stats[name].topk(h).indices
                add(f"picked_active_frac[{name}]", act[picks].mean())
                add(f"picked_contrib_cv[{name}]", cv[picks].mean())
            for name, s in stats.items():
                heads = s.topk(h).indices.sort().values[None]
                add(f"recall[{name}]", routed_recall(c, heads, dsel, n, topk))
                o_top = set(stats["oracle_topset"].topk(h).indices.tolist())
                add(f"overlap_with_topset[{name}]", len(o_top & set(heads[0].tolist())) / h)
                r1 = s.argsort().argsort().float()
                r2 = stats["oracle_topset"].argsort().argsort().float()
                add(f"spearman_vs_topset[{name}]", torch.corrcoef(torch.stack([r1, r2]))[0, 1])
            # the true top heads' block-mean scores vs the ones chosen
            bm = stats["blockmean_1024"]
            true_top = stats["oracle_topset"].topk(h).indices
            chosen = bm.topk(h).indices
            add("blockmean1024_true_top_mean_over_chosen_mean", bm[true_top].mean() / bm[chosen].mean())
            add("blockmean1024_rel_spread", bm.std() / bm.mean())
            add("mass_rel_spread", mass.std() / mass.mean())
        rep = {k2: sum(v) / len(v) for k2, v in acc.items()}
        report["layers"][str(layer)] = rep
        print(f"layer {layer}:", flush=True)
        for k2, v in rep.items():
            print(f"  {k2:55s} {v:.4f}", flush=True)
        del q, k, w
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
