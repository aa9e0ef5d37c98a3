"""Probe (issue 17): where the MoE testbed's ARC-Easy answers part from the dense model's.

The distilled testbed is within 1.5x of the dense perplexity but 10 points below it on ARC-Easy, and random
routing scores as well as its fitted gates (bench/results/moe_testbed_e8k2.json). This probe asks, question by
question, whether the MoE keeps the dense model's answers and loses on some, or answers differently
altogether: the predicted choice of the dense model, the distilled MoE and the MoE under random routing on the
same ARC-Easy test questions (the first ``--limit``, as the testbed benchmark), their pairwise agreement (and
what chance agreement would be given each one's answer distribution), and each model's accuracy on the
questions the dense model gets right and gets wrong.

    python bench/probe_moe_agreement.py --limit 500 --out bench/results/moe_agreement.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_moe_testbed import RandomRouting, arc_accuracy  # noqa: E402

from retrofit.core.data import load_task  # noqa: E402
from retrofit.models import load_model  # noqa: E402
from retrofit.moe.moefy import testbed_dir  # noqa: E402


def chance_agreement(a: list[int], b: list[int]) -> float:
    """Agreement of two answer lists if each answered independently with its own answer-position shares."""
    ca, cb, n = Counter(a), Counter(b), len(a)
    return sum(ca[k] * cb[k] for k in ca) / (n * n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--testbed", default=None, help="the distilled testbed folder (default: retrofit moefy's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/moe_agreement.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    dense, tok = load_model("default")
    path = Path(args.testbed).expanduser() if args.testbed else testbed_dir(8, 2, 768, "qwen2_moe", distilled=True)
    moe = load_model(str(path))[0]
    exs = load_task("arc_easy", split="test", limit=args.limit)
    gold = [ex.gold for ex in exs]
    preds = {"dense": arc_accuracy(dense, tok, exs, "dense")[1], "moe": arc_accuracy(moe, tok, exs, "moe")[1]}
    rr = RandomRouting(moe, args.seed)
    try:
        preds["random_routing"] = arc_accuracy(moe, tok, exs, "random routing")[1]
    finally:
        rr.close()
    n = len(exs)
    right = [p == g for p, g in zip(preds["dense"], gold)]
    models = {}
    for name, p in preds.items():
        ok = [a == g for a, g in zip(p, gold)]
        models[name] = {
            "acc": round(sum(ok) / n, 4),
            "acc_where_dense_right": round(sum(o for o, r in zip(ok, right) if r) / max(sum(right), 1), 4),
            "acc_where_dense_wrong": round(sum(o for o, r in zip(ok, right) if not r) / max(n - sum(right), 1), 4),
            "answer_position_shares": {str(k): round(v / n, 4) for k, v in sorted(Counter(p).items())},
        }
    pairs = {}
    for a, b in (("moe", "dense"), ("random_routing", "dense"), ("moe", "random_routing")):
        pairs[f"{a}~{b}"] = {"agreement": round(sum(x == y for x, y in zip(preds[a], preds[b])) / n, 4),
                             "chance": round(chance_agreement(preds[a], preds[b]), 4)}
    res = {"n": n, "split": "arc_easy test (first n, as bench_moe_testbed.py)", "testbed": str(path),
           "models": models, "agreement": pairs, "seconds": round(time.time() - t0, 1),
           "machine": f"x86_64 CPU, {args.threads} threads", "command": "python " + " ".join(sys.argv),
           "date": datetime.date.today().isoformat()}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
