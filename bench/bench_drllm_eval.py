"""Dr.LLM end to end: routers against the base model, ShortGPT static pruning and an optuna static plan at the
same compute, on the full ARC-Easy test set, out of domain and on held-out text. One process, one run.

For each question the routers choose a plan from the prompt alone (a prefill of the question through
``retrofit.load(model, routers)``, exactly the runtime users get); the answer choices are then scored by
log-likelihood under that plan (lm-eval's multiple-choice ``acc``: argmax of the summed continuation log-probs,
prompt ``Question: {q}\\nAnswer:``, continuation `` {choice}``) with the packed, prefix-cached evaluator, which
equals full forwards (tests/test_search.py). Every configuration of one question is scored in one batched call.

* Budget points: the routers at several ``skip_bias`` values (the inference-time knob). The main point is
  chosen on ARC-Easy **validation** (never test): the largest saving whose validation accuracy is within one
  point of the base model's there.
* ShortGPT static pruning (block influence on ARC-Easy train text) at the layer count of every budget point.
* optuna static plan: a study over which k layers to skip (k = the main point's layers saved) on ARC-Easy
  train questions, started from the ShortGPT plan.
* Out of domain, the same routers and main bias: ARC-Challenge test, PIQA validation.
* Held-out text: next-token loss on windows of the Shakespeare tail (the last 30 %, read by no router or
  search), each window under the plan its routers choose from that window, against the base model and the
  ShortGPT plan with the same number of layers.

    python bench/bench_drllm_eval.py --routers bench/results/routers_drllm_arc_easy \\
        --search bench/results/search_arc_easy_train_path.jsonl.gz --out bench/results/drllm_arc_easy.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import retrofit
from retrofit.core.data import data_dir, load_task
from retrofit.core.plans import plan_passes
from retrofit.eval.static_prune import block_influence, calibration_texts, plan_from_scores
from retrofit.models import load_model
from retrofit.search.diagnostics import label_diagnostics
from retrofit.search.evaluator import PlanEvaluator
from retrofit.search.optuna_study import static_skip_study
from retrofit.search.run import read_records


@torch.no_grad()
def router_plans(model, tok, handle, examples, skip_bias: float, batch: int = 32) -> list[tuple]:
    """The plan the routers choose for each example's prompt (a prefill through the runtime)."""
    handle.config.skip_bias = float(skip_bias)
    handle.set_plan(None)
    plans: list[tuple | None] = [None] * len(examples)
    dev = next(model.parameters()).device
    # batches of similar length: left padding is masked (the routers pool over real tokens only), so the
    # plans do not depend on the grouping, and far fewer pad positions are computed
    lengths = [len(tok(e.prompt)["input_ids"]) for e in examples]
    order = sorted(range(len(examples)), key=lambda j: lengths[j])
    for i in tqdm(range(0, len(order), batch), desc=f"router plans (skip_bias {skip_bias:g})", leave=False,
                  dynamic_ncols=True):
        idx = order[i:i + batch]
        enc = tok([examples[j].prompt for j in idx], return_tensors="pt", padding=True).to(dev)
        model(**enc, use_cache=False, logits_to_keep=1)  # the plan is all we need: skip the vocabulary projection
        for j, p in zip(idx, handle.last_plans):
            plans[j] = tuple(p)
    handle.config.skip_bias = 0.0
    return plans


def score(ev, exs, configs: dict[str, list[tuple]], desc: str) -> dict[str, list[bool]]:
    """Per-question correctness of every configuration (one batched, prefix-cached call per question)."""
    out = {name: [] for name in configs}
    for j, ex in enumerate(tqdm(exs, desc=desc, dynamic_ncols=True)):
        ev.set_example(ex)
        res = ev.evaluate([configs[n][j] for n in configs])
        for n, r in zip(configs, res):
            out[n].append(bool(r.correct))
    return out


def summary(correct: list[bool], plans: list[tuple], L: int, ref: list[bool] | None = None) -> dict:
    n = len(correct)
    acc = sum(correct) / n
    d = {"acc": acc, "se": math.sqrt(acc * (1 - acc) / n), "n": n,
         "layer_fraction": sum(plan_passes(p) for p in plans) / (n * L)}
    if ref is not None:  # paired standard error of the difference to a reference run on the same questions
        diff = [a - b for a, b in zip(correct, ref)]
        m = sum(diff) / n
        d["diff_vs_ref"] = m
        d["diff_se"] = math.sqrt(sum((x - m) ** 2 for x in diff) / (n - 1) / n) if n > 1 else None
    return d


def static_k(plans: list[tuple], L: int) -> int:
    return max(0, min(L - 1, round(L - sum(plan_passes(p) for p in plans) / len(plans))))


def shakespeare_tail_windows(tok, n: int, length: int) -> list[torch.Tensor]:
    path = data_dir() / "tinyshakespeare" / "input.txt"
    ids = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    tail = ids[int(len(ids) * 0.7):]  # the same tail the MoE and MISA benchmarks hold out
    step = max(length, (len(tail) - length) // max(1, n - 1))
    return [torch.tensor([tail[s:s + length]]) for s in range(0, len(tail) - length + 1, step)][:n]


@torch.no_grad()
def heldout_loss(model, handle, windows, skip_bias: float, static_plan) -> dict:
    L = handle.num_layers
    out = {}
    for name, plan in (("base", ["execute"] * L), ("drllm", None), ("static", static_plan)):
        handle.config.skip_bias = float(skip_bias) if plan is None else 0.0
        losses, passes = [], []
        for w in windows:
            handle.set_plan(plan)
            loss = model(input_ids=w, labels=w, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss under the {name} plan")
            losses.append(float(loss))
            passes.append(plan_passes(handle.last_plans[0]))
        out[name] = {"loss": sum(losses) / len(losses), "layer_fraction": sum(passes) / (len(passes) * L),
                     "per_window": losses}
    handle.config.skip_bias = 0.0
    handle.set_plan(None)
    return out


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = res["details"]["test"]
    n = res["n_eval"]
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    b = t["base"]
    ax.errorbar([1.0], [b["acc"]], yerr=[b["se"]], fmt="s", color="k", capsize=3, label=f"base (n={n})")
    dr = sorted((v["layer_fraction"], v["acc"], v["se"], k) for k, v in t.items() if k.startswith("drllm"))
    ax.errorbar([x[0] for x in dr], [x[1] for x in dr], yerr=[x[2] for x in dr], fmt="-o", capsize=3,
                label=f"Dr.LLM routers, skip_bias sweep (n={n})")
    for x, y, _, k in dr:
        ax.annotate(k.removeprefix("drllm_bias"), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    st = sorted((v["layer_fraction"], v["acc"], v["se"]) for k, v in t.items() if k.startswith("static_k"))
    ax.errorbar([x[0] for x in st], [x[1] for x in st], yerr=[x[2] for x in st], fmt="--^", capsize=3,
                label=f"ShortGPT static pruning (n={n})")
    if "optuna" in t:
        o = t["optuna"]
        ax.errorbar([o["layer_fraction"]], [o["acc"]], yerr=[o["se"]], fmt="D", capsize=3,
                    label=f"optuna static plan (n={n})")
    ax.axhline(b["acc"] - 0.01, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("layer fraction executed (block passes / L)")
    ax.set_ylabel("accuracy (acc)")
    ax.set_title(f"ARC-Easy test: accuracy vs compute ({res['model']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", required=True)
    ap.add_argument("--search", nargs="*", default=[], help="the search results the routers were trained on")
    ap.add_argument("--model", default="default")
    ap.add_argument("--skip-bias", type=float, nargs="*", default=[-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each set (default: all)")
    ap.add_argument("--ood", nargs="*", default=["arc_challenge:test", "piqa:validation"])
    ap.add_argument("--optuna-trials", type=int, default=40)
    ap.add_argument("--optuna-examples", type=int, default=150)
    ap.add_argument("--optuna-storage", default="sqlite:///runs/optuna_drllm_static.db")
    ap.add_argument("--loss-windows", type=int, default=48)
    ap.add_argument("--loss-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/drllm_arc_easy.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model(args.model)
    L = model.config.num_hidden_layers
    base_plan = ("execute",) * L
    scores = block_influence(model, tok, calibration_texts(num_samples=128, seed=0), progress=False)
    handle = retrofit.load(model, args.routers)
    ev = PlanEvaluator(model, tok)
    biases = sorted(set(args.skip_bias))

    # 1. the operating point, chosen on validation
    val = load_task("arc_easy", "validation", args.limit)
    vplans = {b: router_plans(model, tok, handle, val, b) for b in biases}
    vres = score(ev, val, {"base": [base_plan] * len(val), **{f"b{b:g}": vplans[b] for b in biases}}, "validation")
    vsum = {b: summary(vres[f"b{b:g}"], vplans[b], L) for b in biases}
    vbase = sum(vres["base"]) / len(val)
    ok = [b for b in biases if vsum[b]["acc"] >= vbase - 0.01]
    main_b = (min(ok, key=lambda b: (vsum[b]["layer_fraction"], -vsum[b]["acc"])) if ok
              else max(biases, key=lambda b: vsum[b]["acc"]))
    print(f"validation base {vbase:.4f}; main skip_bias {main_b:g} "
          f"(acc {vsum[main_b]['acc']:.4f} at {vsum[main_b]['layer_fraction']:.3f})")

    # 2. the test set: base, routers at every bias, ShortGPT at each bias's layer count, optuna at the main one
    test = load_task("arc_easy", "test", args.limit)
    tplans = {b: router_plans(model, tok, handle, test, b) for b in biases}
    ks = sorted({static_k(tplans[b], L) for b in biases} - {0})
    k_main = static_k(tplans[main_b], L)
    train_q = load_task("arc_easy", "train", args.optuna_examples)
    opt = None
    if k_main > 0 and args.optuna_trials > 0:
        opt = static_skip_study(model, tok, train_q, skips=k_main, n_trials=args.optuna_trials,
                                storage=args.optuna_storage, study_name=f"drllm-static-k{k_main}-n{len(train_q)}",
                                start_plans=[plan_from_scores(scores, k_main)], progress=True)
    configs = {"base": [base_plan] * len(test)}
    configs.update({f"drllm_bias{b:g}": tplans[b] for b in biases})
    configs.update({f"static_k{k}": [tuple(plan_from_scores(scores, k))] * len(test) for k in ks})
    if opt:
        configs["optuna"] = [tuple(opt["best_plan"])] * len(test)
    tres = score(ev, test, configs, "arc_easy test")
    static_main = f"static_k{k_main}" if k_main > 0 else "base"
    tsum = {n: summary(tres[n], configs[n], L, ref=tres[static_main] if n.startswith("drllm") else tres["base"])
            for n in configs}

    # 3. out of domain, same routers and bias
    ood = {}
    for spec in args.ood:
        task, split = spec.split(":")
        exs = load_task(task, split, args.limit)
        dp = router_plans(model, tok, handle, exs, main_b)
        k = static_k(dp, L)
        cfg = {"base": [base_plan] * len(exs), "drllm": dp, "static": [tuple(plan_from_scores(scores, k))] * len(exs)}
        r = score(ev, exs, cfg, f"{task} {split}")
        ood[task] = {"split": split, "n": len(exs), "base_acc": sum(r["base"]) / len(exs),
                     "drllm_acc": sum(r["drllm"]) / len(exs), "layer_fraction": summary(r["drllm"], dp, L)["layer_fraction"],
                     "static_acc": sum(r["static"]) / len(exs), "static_k": k,
                     "drllm_vs_base": summary(r["drllm"], dp, L, ref=r["base"])}

    # 4. held-out text
    wins = shakespeare_tail_windows(tok, args.loss_windows, args.loss_length)
    handle.config.skip_bias = main_b
    k_loss = static_k(router_plans(model, tok, handle, [type("E", (), {"prompt": tok.decode(w[0])})() for w in wins],
                                   main_b), L)
    hl = heldout_loss(model, handle, wins, main_b, plan_from_scores(scores, k_loss))

    # 5. the labels behind the routers
    recs = [r for p in args.search for r in read_records(p)]
    diag = label_diagnostics(recs) if recs else {}
    handle.detach()

    mainr, stat = tsum[f"drllm_bias{main_b:g}"], tsum[static_main]
    res = {
        "model": "SmolLM2-135M-Instruct" if args.model == "default" else args.model,
        "splits": {"labels": "arc_easy train (MCTS search)", "operating_point": "arc_easy validation",
                   "eval": "arc_easy test", "optuna": f"arc_easy train (first {len(train_q)})",
                   "ood": args.ood, "heldout_text": f"tinyshakespeare tail (last 30 %), {len(wins)} x "
                                                    f"{args.loss_length} tokens"},
        "n_eval": len(test), "base_acc": tsum["base"]["acc"], "base_se": tsum["base"]["se"],
        "main_skip_bias": main_b, "drllm_acc": mainr["acc"], "drllm_se": mainr["se"],
        "drllm_layer_fraction": mainr["layer_fraction"],
        "static_acc": stat["acc"], "static_layer_fraction": stat["layer_fraction"], "static_k": k_main,
        "drllm_minus_static": mainr["diff_vs_ref"], "drllm_minus_static_se": mainr["diff_se"],
        "optuna_static_acc": tsum["optuna"]["acc"] if opt else None,
        "optuna_static_layer_fraction": tsum["optuna"]["layer_fraction"] if opt else None,
        "optuna": opt,
        "curve": [{"skip_bias": b, "acc": tsum[f"drllm_bias{b:g}"]["acc"], "se": tsum[f"drllm_bias{b:g}"]["se"],
                   "layer_fraction": tsum[f"drllm_bias{b:g}"]["layer_fraction"],
                   "val_acc": vsum[b]["acc"], "val_layer_fraction": vsum[b]["layer_fraction"]} for b in biases],
        "static_curve": [{"k": k, "acc": tsum[f"static_k{k}"]["acc"], "se": tsum[f"static_k{k}"]["se"],
                          "layer_fraction": tsum[f"static_k{k}"]["layer_fraction"]} for k in ks],
        "validation": {"n": len(val), "base_acc": vbase},
        "ood": ood,
        "heldout_loss": {k: v["loss"] for k, v in hl.items()},
        "heldout_layer_fraction": {k: v["layer_fraction"] for k, v in hl.items()},
        "routers": args.routers,
        "label_skip_share": diag.get("label_skip_share"),
        "labels": {k: v for k, v in diag.items() if not k.startswith("label_skip_share")} if diag else None,
        "search_files": args.search,
        "block_influence": [round(float(s), 5) for s in scores],
        "details": {"test": tsum},
        "machine": f"{platform.machine()} CPU, {args.threads} threads",
        "seconds": round(time.time() - t0, 1),
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out.with_suffix(".png"))
    print(f"== ARC-Easy test ({len(test)}): base {res['base_acc']:.4f} +- {res['base_se']:.4f}")
    for n, s in tsum.items():
        extra = f"  diff {s['diff_vs_ref']:+.4f} +- {s['diff_se']:.4f}" if "diff_vs_ref" in s else ""
        print(f"  {n:<18} acc {s['acc']:.4f} +- {s['se']:.4f}  layers {s['layer_fraction']:.3f}{extra}")
    for t, o in ood.items():
        print(f"== {t}: base {o['base_acc']:.4f}, drllm {o['drllm_acc']:.4f} at {o['layer_fraction']:.3f}, "
              f"static k={o['static_k']} {o['static_acc']:.4f}")
    print("held-out loss:", {k: round(v, 4) for k, v in res["heldout_loss"].items()},
          {k: round(v, 3) for k, v in res["heldout_layer_fraction"].items()})


if __name__ == "__main__":
    main()
