"""Configurations evaluated per second: the search's evaluator vs a naive loop (a full forward per configuration).

Same model (SmolLM2-135M-Instruct), same ARC-Easy train examples, same process, same thread count, same plans:
for each example the MCTS search runs (its evaluator: packed choices + prefix cache + batched plans) and records
the plans it evaluated; the naive loop then scores the first ``--naive-plans`` of those plans with
``naive_scores`` (the padded choice batch through every layer of the plan, LM head everywhere), which is what one
writes without the search machinery. Ablations on the same plans: the evaluator without prefix cache, and
batch = 1. Search and naive alternate per example so that machine load hits both alike.

Then writes ``bench/results/search_arc_easy.json`` from the 200-question run's JSONL and this ratio.

    PYTHONPATH=. python bench/bench_search.py --examples 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from retrofit.models import load_model  # noqa: E402
from retrofit.search.evaluator import PlanEvaluator, naive_scores  # noqa: E402
from retrofit.search.mcts import MCTSConfig, mcts_search  # noqa: E402
from retrofit.search.run import read_records, summarize  # noqa: E402
from retrofit.core.data import load_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--offset", type=int, default=0, help="first train example used")
    ap.add_argument("--naive-plans", type=int, default=12, help="plans per example scored by the naive loop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jsonl", default=str(ROOT / "bench/results/search_arc_easy_train200.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/search_arc_easy.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("default")
    exs = load_task("arc_easy", "train", args.offset + args.examples)[args.offset:]
    cfg = MCTSConfig()  # the search's defaults: 50 simulations, batch 8
    L = model.config.num_hidden_layers

    t_search = n_search = 0.0
    t_naive = n_naive = 0.0
    t_nocache = t_b1 = n_abl = 0.0
    agree = total = 0
    for k, ex in enumerate(exs):
        ev = PlanEvaluator(model, tok)
        ev.set_example(ex)
        seen: list[tuple] = []

        def evaluate(plans):
            seen.extend(p for p in plans if p not in seen)
            return [r.correct for r in ev.evaluate(plans)]

        t0 = time.perf_counter()
        ev.set_example(ex)
        mcts_search(evaluate, L, cfg, random.Random(f"0:{k}:{ex.id}"))
        t_search += time.perf_counter() - t0
        n_search += ev.stats["configs"]

        sub = seen[: args.naive_plans]
        t0 = time.perf_counter()
        naive = [naive_scores(model, tok, ex, p) for p in sub]
        t_naive += time.perf_counter() - t0
        n_naive += len(sub)
        for p, sc in zip(sub, naive):
            pred = max(range(len(sc)), key=sc.__getitem__)
            agree += pred == ev.evaluate([p])[0].pred
            total += 1

        # ablations on the same plans, batch 8: no prefix cache; and prefix cache but batch 1
        abl = PlanEvaluator(model, tok, prefix_cache=False)
        abl.set_example(ex)
        t0 = time.perf_counter()
        for i in range(0, len(seen), 8):
            abl.evaluate(seen[i:i + 8])
        t_nocache += time.perf_counter() - t0
        b1 = PlanEvaluator(model, tok)
        b1.set_example(ex)
        t0 = time.perf_counter()
        for p in seen:
            b1.evaluate([p])
        t_b1 += time.perf_counter() - t0
        n_abl += len(seen)
        print(f"example {k}: search {ev.stats['configs']} configs, naive {len(sub)}", file=sys.stderr)

    search_cps, naive_cps = n_search / t_search, n_naive / t_naive
    ratio = search_cps / naive_cps
    bench = {
        "search_configs_per_s": search_cps, "naive_configs_per_s": naive_cps, "configs_per_s_ratio": ratio,
        "no_prefix_cache_configs_per_s": n_abl / t_nocache, "batch1_configs_per_s": n_abl / t_b1,
        "naive_vs_search_prediction_agreement": agree / total, "bench_examples": len(exs),
        "bench_threads": args.threads,
    }
    print(json.dumps(bench, indent=2))

    recs = read_records(args.jsonl)
    s = summarize(recs)
    result = {
        "n_examples": s.get("n_examples", 0),
        "base_acc": s.get("base_acc"),
        "searched_acc": s.get("searched_acc"),
        "mean_layer_fraction": s.get("mean_layer_fraction"),
        "configs_per_s_ratio": ratio,
        "found_rate": s.get("found_rate"),
        "configs_evaluated": s.get("configs_evaluated"),
        "search_seconds": s.get("search_seconds"),
        **{k: v for k, v in bench.items() if k != "configs_per_s_ratio"},
        "model": "SmolLM2-135M-Instruct (retrofit.models.load_model('default'), float32)",
        "data_split": "arc_easy train, first 200 questions",
        "budget": recs[0]["budget_passes"] / recs[0]["num_layers"] if recs else None,
        "budget_passes": recs[0]["budget_passes"] if recs else None,
        "simulations": recs[0]["simulations"] if recs else None,
        "seed": recs[0]["seed"] if recs else None,
        "command": ("retrofit search --model default --task arc_easy --split train --limit 200 --budget 1.0 "
                    "--simulations 50 --seed 0 --out bench/results/search_arc_easy_train200.jsonl && "
                    f"PYTHONPATH=. python bench/bench_search.py --examples {args.examples}"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} torch thread(s), "
                  "2-core machine shared with other jobs",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("n_examples", "base_acc", "searched_acc", "mean_layer_fraction",
                                             "configs_per_s_ratio")}, indent=2))


if __name__ == "__main__":
    main()
