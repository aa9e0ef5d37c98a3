"""MISA vs the dense DSA indexer on real activations: recall, indexer FLOPs, wall time, over context lengths.

The indexer is the lightning indexer distilled onto SmolLM2-135M from its own attention
(`retrofit misa distill`, artifact in the retrofit cache). Its q/k/w for up to 32K tokens come from SmolLM2's
attention inputs over held-out Shakespeare, computed in consecutive 8192-token chunks and concatenated
(see docs/misa.md). Dense and MISA run in the same process on the same queries with the same code path
(retrofit.kernels.misa: chunked GEMMs over each chunk's causal prefix, then top-k).

CPU (default):
    PYTHONPATH=. python bench/bench_misa.py
GPU (the device machine; reads a pack made by `--pack-gpu DIR` here, writes a JSON to merge with --merge-gpu):
    python bench/bench_misa.py --gpu DIR --gpu-out OUT.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.kernels import misa as K  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _now():
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _timed(fn, repeats, sync=None):
    times, out = [], None
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _alternating(fns: dict, repeats: int, sync=None):
    """Run the callables in turn, ``repeats`` rounds (dense, MISA, ... alternating, so that load from other jobs
    on a shared machine hits all of them alike); median seconds and the last output of each."""
    times = {n: [] for n in fns}
    outs = {}
    for _ in range(repeats):
        for n, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            outs[n] = fn()
            if sync:
                sync()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}, outs


def measure(q, w, k, qpos, args, scale, kernel="auto", sync=None, chunk=None):
    """One layer, one context length: dense / MISA / MISA-dagger (and the paper's block-mean router)
    selections, times (alternating, median) and recalls."""
    H, D = q.shape[1], q.shape[2]
    kw = dict(kernel=kernel, chunk=chunk, router=args.router, linear_threshold=args.linear_threshold)
    fns = {
        "dense": lambda: K.dense_topk(q, w, k, qpos, args.topk, scale, kernel=kernel, chunk=chunk),
        "misa": lambda: K.misa_topk(q, w, k, qpos, args.topk, scale, args.active_heads, args.block_size, **kw)[0],
        "hier": lambda: K.misa_topk(q, w, k, qpos, args.topk, scale, args.active_heads, args.block_size,
                                    hierarchical=True, candidates=args.candidates, **kw)[0],
    }
    if args.compare_blockmean and args.router != "blockmean":
        fns["blockmean"] = lambda: K.misa_topk(q, w, k, qpos, args.topk, scale, args.active_heads, args.block_size,
                                               kernel=kernel, chunk=chunk, router="blockmean")[0]
    t, outs = _alternating(fns, args.repeats, sync)
    nontriv = qpos >= args.topk  # queries that see more keys than top-k (selection not trivial)
    d, p = outs["dense"].cpu(), qpos.cpu()
    sel = nontriv.cpu()

    def rec(x, mask=None):
        x = x.cpu()
        if mask is not None and not bool(mask.any()):
            return 1.0
        return K.recall(x[mask], d[mask], p[mask]) if mask is not None else K.recall(x, d, p)

    r = dict(dense_s=t["dense"], misa_s=t["misa"], hier_s=t["hier"],
             recall=rec(outs["misa"], sel), recall_all=rec(outs["misa"]), hier_recall=rec(outs["hier"], sel),
             hier_recall_all=rec(outs["hier"]), H=H, D=D)
    if "blockmean" in outs:
        r.update(blockmean_s=t["blockmean"], blockmean_recall=rec(outs["blockmean"], sel))
    r["_selections"] = {n: o.cpu() for n, o in outs.items()}
    return r


@torch.no_grad()
def attention_mass(model, layer, x, qpos, selections):
    """SmolLM2's own head-summed attention distribution of ``layer`` for the queries ``qpos`` over the keys of
    ``x [S, hidden]`` (one context of at most the model's 8K), and the share of it that each selection
    ``[Q, k]`` keeps (mean over queries), plus the best any k keys can keep (attention's own top-k)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from retrofit.arch import get_adapter

    adapter = get_adapter(model)
    attn = adapter.attention(adapter.layers(model)[layer])
    S, hd = x.shape[0], attn.head_dim
    pos = torch.arange(S)[None]
    cos, sin = adapter.decoder(model).rotary_emb(x[None], pos)
    k = attn.k_proj(x[None]).view(1, S, -1, hd).transpose(1, 2)
    q = attn.q_proj(x[qpos][None]).view(1, len(qpos), -1, hd).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, qpos], sin[:, qpos])
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling  # [1, heads, Q, S]
    causal = torch.arange(S)[None, :] <= qpos[:, None]
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum(1)[0]
    p = p / p.sum(-1, keepdim=True)
    kk = next(iter(selections.values())).shape[1]
    out = {n: float(torch.gather(p, 1, sel.clamp(max=S - 1)).mul(torch.gather(causal, 1, sel.clamp(max=S - 1)))
                    .sum(-1).mean()) for n, sel in selections.items()}
    out["attention_topk"] = float(p.topk(kk, -1).values.sum(-1).mean())
    return out


def cpu_main(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from retrofit.methods.misa.distill import default_indexer_path, load_indexers, long_context_inputs
    from retrofit.models import cache_dir, load_model

    torch.manual_seed(0)
    ind_path = Path(args.indexer or default_indexer_path())
    if not (ind_path / "retrofit.json").is_file():
        raise SystemExit(f"no distilled indexer at {ind_path}: run `retrofit misa distill` first")
    model, tok = load_model("default")
    indexers, meta = load_indexers(ind_path, model)
    layers = sorted(indexers)
    Lmax = max(args.lengths)
    tag = f"_at{args.offset}" if args.offset else ""
    x = long_context_inputs(model, tok, args.data, layers, length=Lmax, offset=args.offset,
                            cache=cache_dir() / "misa" / f"shakespeare_inputs_{Lmax}{tag}.safetensors")
    out_path = Path(args.out)
    res = json.loads(out_path.read_text()) if (args.resume and out_path.is_file()) else {}
    res.setdefault("lengths", {})
    res.update(config=dict(active_heads=args.active_heads, block_size=args.block_size, candidates=args.candidates,
                           router=args.router, linear_threshold=args.linear_threshold, offset=args.offset,
                           topk=args.topk, queries=args.queries, repeats=args.repeats, layers=layers,
                           indexer_heads=indexers[layers[0]].n_heads, indexer_head_dim=indexers[layers[0]].head_dim),
               indexer=dict(path=str(ind_path), distill_metrics=meta.get("extra", {}).get("metrics")))
    per = {L: {} for L in args.lengths}
    for layer in layers:
        idx = indexers[layer]
        with torch.no_grad():
            q, k, w = (t[0].contiguous() for t in idx.project(x[layer][None]))
        scale = idx.softmax_scale
        for L in args.lengths:
            if str(L) in res["lengths"] and str(layer) in res["lengths"][str(L)].get("per_layer", {}):
                per[L][layer] = res["lengths"][str(L)]["per_layer"][str(layer)]
                continue
            qpos = torch.linspace(0, L - 1, min(args.queries, L)).round().long().unique()
            r = measure(q[qpos], w[qpos], k[:L], qpos, args, scale, chunk=args.chunk)
            sels = r.pop("_selections")
            if L == args.mass_length:  # one real SmolLM2 context: how much attention each selection keeps
                keep = qpos >= args.topk
                r["attention_mass"] = attention_mass(model, layer, x[layer][:L], qpos[keep],
                                                     {n: v[keep] for n, v in sels.items()})
            full = torch.arange(L)
            H, D = q.shape[1], q.shape[2]
            fd = K.indexer_flops(full, H, D)
            fk = dict(router=args.router, topk=args.topk, linear=args.linear_threshold is not None)
            r["flops_ratio"] = fd / K.indexer_flops(full, H, D, args.active_heads, args.block_size, **fk)
            r["hier_flops_ratio"] = fd / K.indexer_flops(full, H, D, args.active_heads, args.block_size, True,
                                                         args.candidates, **fk)
            if "blockmean_recall" in r:
                r["blockmean_flops_ratio"] = fd / K.indexer_flops(full, H, D, args.active_heads, args.block_size)
            per[L][layer] = r
            print(f"L={L:6d} layer {layer:2d}: recall {r['recall']:.4f} (all {r['recall_all']:.4f}) "
                  f"hier {r['hier_recall']:.4f}  flops x{r['flops_ratio']:.2f} (hier x{r['hier_flops_ratio']:.2f})"
                  f"  dense {r['dense_s']:.3f}s misa {r['misa_s']:.3f}s hier {r['hier_s']:.3f}s"
                  + (f"  [block means: recall {r['blockmean_recall']:.4f} {r['blockmean_s']:.3f}s]"
                     if "blockmean_recall" in r else ""), flush=True)
            _summarise(res, per, args)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(res, indent=2))
        del q, k, w
    _summarise(res, per, args)
    out_path.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in _HEADLINE if k in res}))


_HEADLINE = ("recall_32k", "min_layer_recall_32k", "flops_ratio_32k", "speedup_32k", "dagger_recall_32k",
             "dagger_speedup_32k", "blockmean_recall_32k", "blockmean_min_layer_recall_32k")


def _summarise(res, per, args):
    for L, layers in per.items():
        if not layers:
            continue
        rows = list(layers.values())
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        dense_s, misa_s, hier_s = (sum(r[k] for r in rows) for k in ("dense_s", "misa_s", "hier_s"))
        res["lengths"][str(L)] = dict(
            recall=mean("recall"), min_layer_recall=min(r["recall"] for r in rows),
            recall_all_queries=mean("recall_all"), hier_recall=mean("hier_recall"),
            min_layer_hier_recall=min(r["hier_recall"] for r in rows),
            flops_ratio=mean("flops_ratio"), hier_flops_ratio=mean("hier_flops_ratio"),
            speedup=dense_s / misa_s, hier_speedup=dense_s / hier_s,
            dense_s=dense_s, misa_s=misa_s, hier_s=hier_s, layers_done=len(rows),
            per_layer={str(l): r for l, r in layers.items()})
        if all("blockmean_recall" in r for r in rows):
            res["lengths"][str(L)].update(
                blockmean_recall=mean("blockmean_recall"),
                blockmean_min_layer_recall=min(r["blockmean_recall"] for r in rows),
                blockmean_speedup=dense_s / sum(r["blockmean_s"] for r in rows))
    mass_rows = {l: r["attention_mass"] for l, r in per.get(args.mass_length, {}).items() if "attention_mass" in r}
    if mass_rows:
        res[f"attention_mass_{args.mass_length // 1024}k"] = {str(l): m for l, m in mass_rows.items()}
    if "32768" in res["lengths"]:
        r = res["lengths"]["32768"]
        res.update(recall_32k=r["recall"], min_layer_recall_32k=r["min_layer_recall"],
                   flops_ratio_32k=r["flops_ratio"], speedup_32k=r["speedup"],
                   dagger_recall_32k=r["hier_recall"], dagger_min_layer_recall_32k=r["min_layer_hier_recall"],
                   dagger_speedup_32k=r["hier_speedup"], dagger_flops_ratio_32k=r["hier_flops_ratio"])
        if "blockmean_recall" in r:
            res.update(blockmean_recall_32k=r["blockmean_recall"],
                       blockmean_min_layer_recall_32k=r["blockmean_min_layer_recall"])
    met = (res.get("indexer") or {}).get("distill_metrics") or {}
    if met.get("layers"):
        res["indexer_kl"] = {str(l): m["heldout_kl"] for l, m in met["layers"].items()}
        res["indexer_kl_uniform"] = {str(l): m["heldout_kl_uniform"] for l, m in met["layers"].items()}
        res["indexer_mass_top64"] = {str(l): m["mass_top64"] for l, m in met["layers"].items()}
        res["attention_mass_top64_oracle"] = {str(l): m["mass_top64_oracle"] for l, m in met["layers"].items()}
    res.setdefault("gpu", None)
    machine = f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads (2-core machine shared with other jobs)"
    res.update(device=machine, machine=machine,
               command="PYTHONPATH=. python bench/bench_misa.py " + " ".join(sys.argv[1:]), date=_now(),
               torch=torch.__version__)


# ------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------
def pack_gpu(args):
    """Write what the GPU run needs (one layer's attention inputs at 32K in bf16 + that layer's indexer)."""
    from safetensors.torch import load_file, save_file

    from retrofit.methods.misa.distill import default_indexer_path, load_indexers
    from retrofit.models import cache_dir

    indexers, meta = load_indexers(args.indexer or default_indexer_path())
    layer = args.gpu_layer if args.gpu_layer is not None else sorted(indexers)[len(indexers) // 2]
    Lmax = max(args.lengths)
    acts = load_file(str(cache_dir() / "misa" / f"shakespeare_inputs_{Lmax}.safetensors"))
    d = Path(args.pack_gpu)
    d.mkdir(parents=True, exist_ok=True)
    t = {"x": acts[f"layer{layer}"][:Lmax].to(torch.bfloat16).contiguous()}
    t.update({f"idx.{n}": p.to(torch.bfloat16).contiguous() for n, p in indexers[layer].state_dict().items()})
    save_file(t, str(d / "misa_gpu.safetensors"))
    (d / "misa_gpu.json").write_text(json.dumps({"layer": layer, "config": meta["config"]["indexer"]}))
    print(f"packed layer {layer} into {d}")


def gpu_main(args):
    from safetensors.torch import load_file

    from retrofit.methods.misa.distill import IndexerConfig, LightningIndexer

    d = Path(args.gpu)
    info = json.loads((d / "misa_gpu.json").read_text())
    t = load_file(str(d / "misa_gpu.safetensors"))
    idx = LightningIndexer(IndexerConfig(**info["config"]))
    idx.load_state_dict({n[4:]: v.float() for n, v in t.items() if n.startswith("idx.")})
    dev = torch.device("cuda")
    idx = idx.to(dev).eval()
    with torch.no_grad():
        q, k, w = (z[0].contiguous() for z in idx.project(t["x"].float().to(dev)[None]))
    scale = idx.softmax_scale
    sync = torch.cuda.synchronize
    out = {"device": torch.cuda.get_device_name(0), "layer": info["layer"], "date": _now(),
           "torch": torch.__version__, "triton": getattr(K.triton, "__version__", None),
           "queries": "all (full prefill)", "lengths": {}}
    H, D = q.shape[1], q.shape[2]
    for L in args.lengths:
        qpos = torch.arange(L, device=dev)
        ql, wl, kl = q[:L], w[:L], k[:L]
        row = {}
        for prec, qq, kk in (("fp32", ql, kl), ("bf16", ql.bfloat16(), kl.bfloat16())):
            # scoring only (the kernel), dense = the same kernel with all heads
            head_idx = K.route_heads(K.head_scores(ql, wl, kl, qpos, args.block_size, scale), args.active_heads)
            ds, dscore = _timed(lambda: K.routed_scores_triton(qq, wl, kk, None, qpos, scale, ieee=False),
                                args.repeats, sync)
            del dscore
            ms, _ = _timed(lambda: K.routed_scores_triton(
                qq, wl, kk, K.route_heads(K.head_scores(ql, wl, kl, qpos, args.block_size, scale),
                                          args.active_heads), qpos, scale, ieee=False), args.repeats, sync)
            row[f"{prec}_kernel_dense_ms"] = ds * 1e3
            row[f"{prec}_kernel_misa_ms"] = ms * 1e3
            row[f"{prec}_kernel_speedup"] = ds / ms
            del head_idx
        # torch (cuBLAS) dense scoring as in transformers, in query chunks, for reference
        def torch_dense():
            for r0 in range(0, L, 4096):
                r1 = min(L, r0 + 4096)
                s = torch.relu(torch.matmul(ql[r0:r1].reshape(-1, D), kl[:r1].t()) * scale).view(r1 - r0, H, r1)
                torch.bmm(wl[r0:r1].unsqueeze(1), s)
        ts, _ = _timed(torch_dense, args.repeats, sync)
        row["torch_dense_scoring_ms"] = ts * 1e3
        # end-to-end selection (scores + top-k), recall vs dense, fp32 inputs with TF32 dots
        a = argparse.Namespace(**{**vars(args), "repeats": max(1, args.repeats // 2)})
        r = measure(ql, wl, kl, qpos, a, scale, kernel="auto", sync=sync)
        row.update(select_dense_ms=r["dense_s"] * 1e3, select_misa_ms=r["misa_s"] * 1e3,
                   select_hier_ms=r["hier_s"] * 1e3, select_speedup=r["dense_s"] / r["misa_s"],
                   recall=r["recall"], hier_recall=r["hier_recall"], recall_all=r["recall_all"])
        full = torch.arange(L)
        row["flops_ratio"] = K.indexer_flops(full, H, D) / K.indexer_flops(full, H, D, args.active_heads,
                                                                            args.block_size)
        out["lengths"][str(L)] = row
        print(L, json.dumps(row), flush=True)
        torch.cuda.empty_cache()
        Path(args.gpu_out).write_text(json.dumps(out, indent=2))


def merge_gpu(args):
    res = json.loads(Path(args.out).read_text())
    g = json.loads(Path(args.merge_gpu).read_text())
    g["command"] = ("python bench/bench_misa.py --gpu <pack> --gpu-out <json> (pack: bench/bench_misa.py --pack-gpu); "
                    "merged with --merge-gpu")
    res["gpu"] = g
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("merged GPU results into", args.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--queries", type=int, default=512, help="query positions sampled evenly over each context")
    ap.add_argument("--active-heads", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--candidates", default="auto", help="MISA-dagger k': an int, or 'auto' (from the context length)")
    ap.add_argument("--router", default="moments", choices=K.ROUTERS)
    ap.add_argument("--linear-threshold", type=float, default=0.7,
                    help="moment router: heads with ReLU slope above this enter the linear remainder; <0 = none")
    ap.add_argument("--no-compare-blockmean", dest="compare_blockmean", action="store_false",
                    help="skip the paper's block-mean router (run by default for comparison)")
    ap.add_argument("--mass-length", type=int, default=8192,
                    help="context length (<= SmolLM2's 8K, one forward) at which the attention mass kept by "
                         "each selection is measured")
    ap.add_argument("--offset", type=int, default=0,
                    help="start of the text segment in held-out Shakespeare (tuning runs use a disjoint one)")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=32, help="query rows per GEMM (same for dense and MISA)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--indexer", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "misa.json"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--pack-gpu", default=None)
    ap.add_argument("--gpu-layer", type=int, default=None)
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--gpu-out", default="misa_gpu.json")
    ap.add_argument("--merge-gpu", default=None)
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.candidates = args.candidates if args.candidates == "auto" else int(args.candidates)
    if args.linear_threshold is not None and args.linear_threshold < 0:
        args.linear_threshold = None
    if args.pack_gpu:
        pack_gpu(args)
    elif args.gpu:
        gpu_main(args)
    elif args.merge_gpu:
        merge_gpu(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
