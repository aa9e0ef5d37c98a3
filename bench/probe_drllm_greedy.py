"""Probe: is there a better k-th layer to skip than the labels' vote (issue 12, greedy on train)?

The task routers reduce, on ARC-Easy, to the labels' voted static order (19, 18, 20, 13, ...): the 3-layer plan
scores 0.505 on the test set, a point below the base model. This probe asks whether the vote's third choice is
the weak link. Starting from a skip set (``--start``, default the vote's first two layers, 18 + 19), every
remaining layer is added in turn and the plans are scored on ARC-Easy **train** questions (one prefix-cached
call per question); the candidates are ranked by accuracy there (ties: mean gold-choice probability). The
best few and the voted plan are then scored on **validation** (never used to choose), with paired standard
errors against the voted plan. The per-question tables are kept in ``--workdir`` and reused.

    python bench/probe_drllm_greedy.py --start 18,19 --train-limit 1200 --out bench/results/drllm_greedy_probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from retrofit.core.data import load_task
from retrofit.models import load_model
from retrofit.search.evaluator import PlanEvaluator
from retrofit.search.reward import gold_probability


def plan(skips, L):
    return tuple("skip" if i in skips else "execute" for i in range(L))


@torch.no_grad()
def table(ev, exs, plans, path: Path):
    """Per question and plan: correct and gold probability (cached in ``path``)."""
    if path.is_file():
        rows = json.loads(path.read_text())["rows"]
        if len(rows) == len(exs) and all(r["id"] == e.id for r, e in zip(rows, exs)):
            return rows
    rows = []
    for ex in tqdm(exs, desc=path.stem, mininterval=30):
        ev.set_example(ex)
        res = ev.evaluate(plans)
        rows.append({"id": ex.id, "c": [bool(r.correct) for r in res],
                     "p": [round(gold_probability(r.scores, r.gold), 5) for r in res]})
    path.write_text(json.dumps({"plans": ["".join(a[0] for a in p) for p in plans], "rows": rows}))
    return rows


def paired(rows, i, j):
    """Accuracy of plan i, and its paired difference to plan j with the standard error."""
    n = len(rows)
    a = [float(r["c"][i]) for r in rows]
    d = [float(r["c"][i]) - float(r["c"][j]) for r in rows]
    m = sum(d) / n
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n)
    return sum(a) / n, m, se


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="18,19", help="layers already skipped (the vote's first two)")
    ap.add_argument("--voted", default="20", help="the vote's next layer, the reference")
    ap.add_argument("--train-limit", type=int, default=1200)
    ap.add_argument("--top", type=int, default=5, help="candidates scored on validation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="runs/greedy_probe")
    ap.add_argument("--out", default="bench/results/drllm_greedy_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model()
    L = model.config.num_hidden_layers
    start = [int(x) for x in args.start.split(",") if x]
    voted = int(args.voted)
    cands = [j for j in range(L) if j not in start]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ev = PlanEvaluator(model, tok)
    train = load_task("arc_easy", "train", args.train_limit)
    plans = [plan([], L), plan(start, L)] + [plan(start + [j], L) for j in cands]
    rows = table(ev, train, plans, work / f"train_{'-'.join(map(str, start))}_{len(train)}.json")
    n = len(rows)
    stats = []
    for k, j in enumerate(cands):
        acc, d, se = paired(rows, 2 + k, 1)
        pg = sum(r["p"][2 + k] for r in rows) / n
        stats.append({"layer": j, "train_acc": round(acc, 4), "train_vs_start": round(d, 4),
                      "train_vs_start_se": round(se, 4), "train_gold_prob": round(pg, 4)})
    stats.sort(key=lambda s: (-s["train_acc"], -s["train_gold_prob"], s["layer"]))
    top = [s["layer"] for s in stats[:args.top]]
    chosen = top[0]
    val = load_task("arc_easy", "validation")
    vlayers = [voted] + [j for j in top if j != voted]
    vplans = [plan([], L), plan(start, L)] + [plan(start + [j], L) for j in vlayers]
    vrows = table(ev, val, vplans, work / f"val_{'-'.join(map(str, start))}_{'-'.join(map(str, vlayers))}.json")
    vout = {}
    for k, j in enumerate(vlayers):
        acc, d, se = paired(vrows, 2 + k, 2)  # against the voted third layer
        vout[str(j)] = {"val_acc": round(acc, 4), "val_vs_voted": round(d, 4), "val_vs_voted_se": round(se, 4)}
    res = {
        "model": "SmolLM2-135M-Instruct", "start_skips": start, "voted_next": voted,
        "train": {"split": "arc_easy train", "n": n, "base_acc": round(paired(rows, 0, 0)[0], 4),
                  "start_acc": round(paired(rows, 1, 0)[0], 4), "candidates": stats},
        "greedy_choice": chosen,
        "validation": {"n": len(vrows), "base_acc": round(paired(vrows, 0, 0)[0], 4),
                       "start_acc": round(paired(vrows, 1, 0)[0], 4), "plans": vout},
        "seconds": round(time.time() - t0, 1), "machine": f"x86_64 CPU, {args.threads} threads",
        "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
    }
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "train"}, indent=2))
    print("train top:", stats[:8])


if __name__ == "__main__":
    main()
