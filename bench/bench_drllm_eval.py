"""Dr.LLM end to end on whole test sets: routers vs base vs static pruning at equal compute, same process.

For each question the routers choose a plan from the prompt alone (prefill of the question, exactly as
`retrofit.attach(model, "drllm", routers=...)` does it); the answer choices are then scored by log-likelihood
under that plan (lm-eval's multiple-choice `acc`: argmax of the summed continuation log-probs, prompt
`Question: {q}\\nAnswer:` and continuation ` {choice}`). The same scorer gives the base model (all layers) and
static pruning (ShortGPT block influence on ARC-Easy train text, k least important layers skipped, k chosen
so its compute equals the routers'). `retrofit eval` runs the same configurations through lm-eval; its
accuracy on the first N questions equals this script's on those questions (checked in BENCHMARKS.md).

    python bench/bench_drllm_eval.py --routers runs/routers_arc_full --device cuda \
        --skip-bias 0 --skip-bias -1 --skip-bias -2 --out bench/results/drllm_arc_easy.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import retrofit
from retrofit.eval.static_prune import block_influence, calibration_texts, plan_from_scores
from retrofit.models import load_model
from retrofit.search.evaluator import PlanEvaluator
from retrofit.core.data import load_task
from retrofit.core.plans import plan_passes as passes


@torch.no_grad()
def router_plans(model, tok, handle, examples, skip_bias: float, batch: int = 32):
    handle.config.skip_bias = float(skip_bias)
    handle.set_plan(None)
    plans = []
    dev = next(model.parameters()).device
    for i in range(0, len(examples), batch):
        enc = tok([e.prompt for e in examples[i:i + batch]], return_tensors="pt", padding=True).to(dev)
        model(**enc, use_cache=False)
        plans.extend(tuple(p) for p in handle.last_plans)
    return plans


def run_task(model, tok, handle, ev, task, split, limit, biases, static_ks, scores, shard=(0, 1)):
    exs = load_task(task, split=split, limit=limit)[shard[0]::shard[1]]
    L = handle.num_layers
    configs = {"base": [("execute",) * L] * len(exs)}
    for b in biases:
        configs[f"drllm_bias{b:g}"] = router_plans(model, tok, handle, exs, b)
    for k in static_ks:
        configs[f"static_k{k}"] = [tuple(plan_from_scores(scores, k))] * len(exs)
    correct = {name: 0 for name in configs}
    for j, ex in enumerate(tqdm(exs, desc=f"{task} scoring")):
        ev.set_example(ex)
        res = ev.evaluate([configs[n][j] for n in configs])
        for n, r in zip(configs, res):
            correct[n] += bool(r.correct)
    out = {}
    for n, plans in configs.items():
        counts = [[sum(p[i] == a for p in plans) for a in ("skip", "execute", "repeat")] for i in range(L)]
        out[n] = {"correct": correct[n], "passes": sum(passes(p) for p in plans), "action_counts": counts}
    return {"task": task, "split": split, "n": len(exs), "runs": out}


def merge_parts(parts, L):
    """Sum shard results of one task and derive acc / mean layers."""
    n = sum(p["n"] for p in parts)
    runs = {}
    for name in parts[0]["runs"]:
        c = sum(p["runs"][name]["correct"] for p in parts)
        ps = sum(p["runs"][name]["passes"] for p in parts)
        ac = [[sum(p["runs"][name]["action_counts"][i][a] for p in parts) for a in range(3)] for i in range(L)]
        runs[name] = {"acc": c / n, "mean_layers_executed": ps / n, "layer_fraction": ps / n / L, "correct": c}
        if name.startswith("drllm"):
            runs[name]["action_counts"] = ac
    return {"task": parts[0]["task"], "split": parts[0]["split"], "n": n, "runs": runs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--routers", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-bias", type=float, action="append", default=None)
    ap.add_argument("--static-k", type=int, action="append", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--ood", default="arc_challenge")
    ap.add_argument("--out", default="bench/results/drllm_arc_easy.json")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--shard", default="0/1", help="i/n: score questions i, i+n, ... and write a part file")
    ap.add_argument("--merge", nargs="*", help="part files of all shards: write the summary to --out")
    args = ap.parse_args()
    if args.merge:
        return write_summary(args, [json.loads(Path(p).read_text()) for p in args.merge])
    shard = tuple(int(x) for x in args.shard.split("/"))
    biases = args.skip_bias or [0.0]
    t0 = time.time()
    model, tok = load_model(args.model)
    model.to(args.device)
    L = model.config.num_hidden_layers
    scores = block_influence(model, tok, calibration_texts(num_samples=args.calib_samples, seed=0), progress=False)
    handle = retrofit.load(model, args.routers)
    ev = PlanEvaluator(model, tok)
    # static pruning at the routers' compute (bias 0), plus a few more points for the curve
    probe = load_task("arc_easy", split="test", limit=args.limit)
    k_eq = max(1, round(L - sum(map(passes, router_plans(model, tok, handle, probe, biases[0]))) / len(probe)))
    static_ks = sorted(set((args.static_k or [2, 4, 6, 8]) + [k_eq]))
    part = {"in_domain": run_task(model, tok, handle, ev, "arc_easy", "test", args.limit, biases, static_ks, scores,
                                  shard)}
    if args.ood:
        part["ood"] = run_task(model, tok, handle, ev, args.ood, None, args.limit, biases, static_ks, scores, shard)
    part.update(L=L, k_eq=k_eq, biases=biases, scores=[float(x) for x in scores], seconds=round(time.time() - t0, 1),
                device=(torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine())
                + f" ({args.device})")
    if shard == (0, 1):
        return write_summary(args, [part])
    Path(args.out).write_text(json.dumps(part))


def write_summary(args, parts):
    L, k_eq, biases = parts[0]["L"], parts[0]["k_eq"], parts[0]["biases"]
    res = {key: merge_parts([p[key] for p in parts], L) for key in parts[0] if key in ("in_domain", "ood")}
    ind, ood = res["in_domain"]["runs"], res.get("ood", {}).get("runs", {})
    main_run = f"drllm_bias{biases[0]:g}"
    summary = {
        "model": "SmolLM2-135M-Instruct" if args.model == "default" else args.model,
        "train_split": "arc_easy train (MCTS plans, bench/results/search_arc_easy_train_full_h100.jsonl.gz)",
        "eval_split": "arc_easy test", "n_eval": res["in_domain"]["n"],
        "base_acc": ind["base"]["acc"],
        "drllm_acc": ind[main_run]["acc"], "drllm_layer_fraction": ind[main_run]["layer_fraction"],
        "static_acc": ind[f"static_k{k_eq}"]["acc"], "static_layer_fraction": ind[f"static_k{k_eq}"]["layer_fraction"],
        "ood_task": res["ood"]["task"] if "ood" in res else None, "ood_base_acc": ood.get("base", {}).get("acc"),
        "ood_drllm_acc": ood.get(main_run, {}).get("acc"), "ood_layer_fraction": ood.get(main_run, {}).get("layer_fraction"),
        "static_k_equal_compute": k_eq, "skip_biases": biases, "routers": args.routers,
        "block_influence": [round(float(s), 5) for s in parts[0]["scores"]], "shards": len(parts),
        "details": res,
        "device": parts[0]["device"],
        "seconds_per_shard": [p["seconds"] for p in parts],
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    for name, part in res.items():
        print(f"== {part['task']} ({part['n']} questions)")
        for n, r in part["runs"].items():
            print(f"  {n:<18} acc {r['acc']:.4f}  layers {r['mean_layers_executed']:.2f}/{L} ({r['layer_fraction']:.3f})")


if __name__ == "__main__":
    main()
