"""Choose the router-training recipe on ARC-Easy *validation* (never test): train each variant on the same
search labels, then score its skip_bias curve on validation next to ShortGPT static pruning and the labels'
voted static plan at the same layer counts.

Variants: label target (``shortest``: the search's shortest rewarded plan, the paper; ``soft``: per layer the
share of rewarded plans per action) x unlabeled questions (``drop``: the paper; ``execute``: taught the
all-execute plan). The summary per variant is the mean, over the curve's points with layer fraction in
[0.8, 0.97], of (router accuracy - ShortGPT accuracy at the same layer count): the gain per-question routing
brings over a static plan where the issue's targets lie.

    python bench/bench_drllm_variants.py --search runs/search_path_s0.jsonl --out bench/results/drllm_variants.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import retrofit  # noqa: E402
from bench_drllm_eval import router_plans, score, static_k, summary  # noqa: E402
from retrofit.core.data import load_task  # noqa: E402
from retrofit.eval.static_prune import block_influence, calibration_texts, plan_from_scores  # noqa: E402
from retrofit.methods.drllm.train import (  # noqa: E402
    TrainConfig, calibrate_skip_bias, collect, label_center, shrink_routers, train_from_searches)  # noqa: E402
from retrofit.models import load_model  # noqa: E402
from retrofit.search.diagnostics import label_diagnostics, label_shares, voted_plan  # noqa: E402
from retrofit.search.evaluator import PlanEvaluator  # noqa: E402
from retrofit.search.run import read_records  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", nargs="+", required=True)
    ap.add_argument("--targets", nargs="*", default=["shortest", "soft", "safety"])
    ap.add_argument("--unlabeled", nargs="*", default=["drop", "execute"])
    ap.add_argument("--skip-bias", type=float, nargs="*", default=[-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    ap.add_argument("--limit", type=int, default=None, help="validation questions (default: all 570)")
    ap.add_argument("--bottleneck", type=int, default=128, help="router MLP width (the paper's 128)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (the paper's 0.01)")
    ap.add_argument("--shrink", type=float, nargs="*", default=[1.0],
                    help="score each variant with its routers' per-question deviation from their mean logits scaled "
                         "by these factors (1 = as trained, 0 = the static plan of the mean logits)")
    ap.add_argument("--center", default="routers", choices=["routers", "labels"],
                    help="what --shrink pulls toward: the routers' mean logits or the labels' action shares")
    ap.add_argument("--layer-fractions", type=float, nargs="*", default=None,
                    help="instead of --skip-bias: for each variant the skip_bias values at which its routers execute "
                         "these shares of the block passes on the training prompts (calibrate_skip_bias)")
    ap.add_argument("--shrink-examples", type=int, default=300,
                    help="training questions whose all-execute features give the routers' mean logits")
    ap.add_argument("--workdir", default="runs/drllm_variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/drllm_variants.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model("default")
    L = model.config.num_hidden_layers
    val = load_task("arc_easy", "validation", args.limit)
    ev = PlanEvaluator(model, tok)
    recs = [r for p in args.search for r in read_records(p)]
    diag = label_diagnostics(recs)
    shares = label_shares([r for r in recs if r.get("found")])
    base = [("execute",) * L] * len(val)
    voted = {k: [tuple(voted_plan(shares, k))] * len(val) for k in range(1, 9)}
    cache = Path(args.workdir) / f"baselines_{len(val)}_{len(recs)}.json"  # the same questions and labels
    bigger = sorted(Path(args.workdir).glob(f"baselines_*_{len(recs)}.json"), key=lambda p: int(p.stem.split("_")[1]))
    bigger = [p for p in bigger if int(p.stem.split("_")[1]) >= len(val)]
    if cache.is_file():
        ref = json.loads(cache.read_text())
    elif bigger:  # the first questions of a longer run: the same per-question results
        ref = {k: v[:len(val)] for k, v in json.loads(bigger[0].read_text()).items()}
    else:
        scores = block_influence(model, tok, calibration_texts(num_samples=128, seed=0), progress=False)
        statics = {k: [tuple(plan_from_scores(scores, k))] * len(val) for k in range(1, 9)}
        ref = score(ev, val, {"base": base, **{f"static_k{k}": v for k, v in statics.items()},
                              **{f"voted_k{k}": v for k, v in voted.items()}}, "validation baselines")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(ref))
    base_acc = sum(ref["base"]) / len(val)
    out = {"n_val": len(val), "base_acc": base_acc, "n_records": len(recs), "n_labels": diag.get("n_labels"),
           "static": {k: sum(ref[f"static_k{k}"]) / len(val) for k in range(1, 9)},
           "voted": {k: sum(ref[f"voted_k{k}"]) / len(val) for k in voted}, "variants": {}}
    found = [r for r in recs if r.get("found")]
    center = label_center(found, L) if args.center == "labels" else None
    sub = [{**r, "plan": ["execute"] * L} for r in found][:args.shrink_examples]
    for target in args.targets:
        for unl in args.unlabeled:
            name = f"{target}-{unl}" + (f"-b{args.bottleneck}-wd{args.weight_decay:g}"
                                         if (args.bottleneck, args.weight_decay) != (128, 0.01) else "")
            d = Path(args.workdir) / name
            cfg = TrainConfig(target=target, unlabeled=unl, weight_decay=args.weight_decay)
            rep_path = d / "training_report.json"
            rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
            same = rep is not None and {**asdict(TrainConfig()), **rep.get("config", {})} == asdict(cfg)
            if not same or rep.get("records_read") != len(recs):
                rep = train_from_searches(model, tok, args.search, d, cfg, bottleneck=args.bottleneck, progress=False)
            f = v = None
            if any(a != 1.0 for a in args.shrink) or args.layer_fractions or center is not None:
                # the routers' inputs under the all-execute plan do not depend on the routers: collected once
                h = retrofit.load(model, d)
                try:
                    f, v, _ = collect(h, tok, sub, progress=False)
                finally:
                    h.detach()
            for alpha in args.shrink:
                vname = name + (f"-shrink{alpha:g}" if alpha != 1.0 else "") + (
                    "-labelcenter" if args.center == "labels" else "")
                h = retrofit.load(model, d)
                try:
                    biases = args.skip_bias
                    if alpha != 1.0 or center is not None:
                        shrink_routers(h.routers, f, v, alpha, center)
                    if args.layer_fractions:
                        biases = [round(calibrate_skip_bias(h.routers, f, v, x)[0], 4) for x in args.layer_fractions]
                    plans = {b: router_plans(model, tok, h, val, b) for b in biases}
                    res = score(ev, val, {f"b{b:g}": plans[b] for b in biases}, f"validation {vname}")
                finally:
                    h.detach()
                curve, gains = [], []
                for b in biases:
                    s = summary(res[f"b{b:g}"], plans[b], L)
                    k = static_k(plans[b], L)
                    st = out["static"].get(k, base_acc if k == 0 else None)
                    vt = out["voted"].get(k, base_acc if k == 0 else None)
                    curve.append({"skip_bias": b, "acc": s["acc"], "layer_fraction": s["layer_fraction"], "k": k,
                                  "static_acc": st, "voted_acc": vt,
                                  "distinct_plans": len(set(plans[b]))})
                    if st is not None and 0.8 <= s["layer_fraction"] <= 0.97:
                        gains.append(s["acc"] - st)
                out["variants"][vname] = {"curve": curve,
                                          "mean_gain_vs_static": sum(gains) / len(gains) if gains else None,
                                          "n_points": len(gains), "best_epoch": rep["best_epoch"], "shrink": alpha,
                                          "val_labels_acc": rep["history"][rep["best_epoch"]]["val_acc"]}
                print(vname, json.dumps(out["variants"][vname]["curve"]), out["variants"][vname]["mean_gain_vs_static"],
                      flush=True)
    out.update(search=args.search, seconds=round(time.time() - t0, 1), command="python " + " ".join(sys.argv),
               date=datetime.date.today().isoformat())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"base {base_acc:.4f}; static {out['static']}; voted {out['voted']}")
    for n, v in out["variants"].items():
        print(f"{n:<18} mean gain vs ShortGPT at 0.80-0.97 of the layers: {v['mean_gain_vs_static']}")


if __name__ == "__main__":
    main()
