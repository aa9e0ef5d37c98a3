"""Why RoMA moves little on the testbed: the task loss, measured on the studies' own validation split.

    OMP_NUM_THREADS=2 python bench/bench_roma_loss.py --train-limit 1000 --out bench/results/roma_task_loss.json
    # script check (tiny random MoE; numbers mean nothing):
    OMP_NUM_THREADS=1 python bench/bench_roma_loss.py --tiny --train-limit 40

The first ``--train-limit`` ARC-Easy *train* questions are split exactly as ``roma_study`` splits them
(``split_train_val``, 20 %, seed 0): gate deltas train on the fit part and are scored on the validation part
(never on the test split). For each setting in ``--settings`` it trains plain gate finetuning (λ = 0) and RoMA
(its λ, k) under both task losses (``RomaConfig.task_loss``): 'continuation' (the paper's: cross-entropy of the
gold answer's tokens) and 'choice' (cross-entropy of the gold choice over the choices' summed log-likelihoods,
the quantity lm-eval's ``acc`` ranks). Every trained set and the base model are then scored in one pass on the
fit part (its first ``--fit-eval``: did training change the decisions it trained on?) and on the validation
part (do they generalise?), with the mean gold-choice probability beside the accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (lr, λ, k, layers choice, epochs). 'paper': the paper's settings; 'strong': the best RoMA trial of the
# session-19 study on this split (BENCHMARKS.md, issue 17), the one setting that moved validation accuracy.
SETTINGS = {"paper": (7e-5, 0.8, 3, "last_5", 3), "strong": (2.4e-3, 0.29, 8, "last_half", 1)}


def gold_prob(scores, gold):
    return float(torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)[gold])


def score_sets(handle, tok, examples, delta_sets, desc):
    """name -> (acc, mean gold probability, per-example correct) for several delta sets in one pass."""
    from tqdm.auto import tqdm

    from retrofit.methods.roma.train import score_example_multi

    names = list(delta_sets)
    ok = {n: [] for n in names}
    gp = {n: [] for n in names}
    for ex in tqdm(examples, desc=desc):
        for n, s in zip(names, score_example_multi(handle, tok, ex, [delta_sets[n] for n in names])):
            ok[n].append(max(range(len(s)), key=s.__getitem__) == ex.gold)
            gp[n].append(gold_prob(s, ex.gold))
    return {n: (sum(ok[n]) / len(ok[n]), sum(gp[n]) / len(gp[n]), ok[n]) for n in names}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--settings", default="strong", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--losses", default="continuation,choice")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-eval", type=int, default=300, help="score the first N fit questions (0 = all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_path = Path(args.out or REPO / ("runs/roma_task_loss_tiny.json" if args.tiny
                                         else "bench/results/roma_task_loss.json"))
    names = [s for s in args.settings.split(",") if s]
    bad = [s for s in names if s not in SETTINGS]
    if bad:
        ap.error(f"unknown --settings {bad}; choose from {', '.join(SETTINGS)}")
    losses = [s for s in args.losses.split(",") if s]

    import retrofit
    from retrofit.arch import get_adapter
    from retrofit.artifacts import fingerprint
    from retrofit.core.data import load_task
    from retrofit.methods.roma import RomaConfig
    from retrofit.methods.roma.train import base_pass, embed_texts, frozen_prefix, train_roma
    from retrofit.methods.roma.tune import layers_for, split_train_val
    from retrofit.moe.moefy import load_bench_model

    from runlog import RunLog, command_line

    log = RunLog()
    torch.manual_seed(args.seed)
    model, tok = load_bench_model(args.tiny)
    fp = fingerprint(model)
    n_moe = len(get_adapter(model).moe_gates(model))
    train = load_task("arc_easy", split="train", limit=args.train_limit)
    fit, val = split_train_val(train, args.val_fraction, args.seed)
    test_ids = {ex.id for ex in load_task("arc_easy", split="test")}
    assert not {ex.id for ex in train} & test_ids, "a training item is a test item"
    emb = embed_texts([ex.prompt for ex in fit])
    log(f"{type(model).__name__}, {n_moe} MoE layers, threads {torch.get_num_threads()}; ARC-Easy train "
        f"{len(train)} -> fit {len(fit)} / val {len(val)}")

    passes, prefixes = {}, {}  # num_layers -> base pass; (num_layers, task_loss) -> frozen prefix
    deltas, reports = {"base": None}, {}
    widest = 0
    for sname in names:
        lr, lam, k, layers, epochs = SETTINGS[sname]
        nl = layers_for(layers, n_moe)
        widest = max(widest, nl)
        for loss in losses:
            for method, lm in (("plain_ft", 0.0), ("roma", lam)):
                cfg = RomaConfig(num_layers=nl, lam=lm, k=k, lr=lr, epochs=epochs, seed=args.seed, task_loss=loss)
                if (nl, loss) not in prefixes:
                    h = retrofit.attach(model, "roma", **asdict(cfg))
                    t0 = time.time()
                    try:
                        if nl not in passes:
                            passes[nl] = base_pass(h, tok, fit)
                        prefixes[nl, loss] = frozen_prefix(h, tok, fit, True, loss)
                    finally:
                        h.detach()
                    log(f"base pass / frozen prefix ({nl} layers, {loss}): {time.time() - t0:.0f} s")
                base, prefix = passes[nl], prefixes[nl, loss]
                name = f"{sname}/{loss}/{method}"
                t0 = time.time()
                h, rep = train_roma(model, tok, fit, cfg, embeddings=emb if lm > 0 else None, base=base,
                                    prefix=prefix, progress=True)
                deltas[name] = {int(l): p.detach().clone() for l, p in h.deltas.items()}
                h.detach()
                reports[name] = {"config": rep["config"], "history": rep["history"],
                                 "delta_norms": rep["delta_norms"], "seconds": round(time.time() - t0, 1)}
                log(f"{name}: trained in {time.time() - t0:.0f} s; last epoch {rep['history'][-1]}")

    h = retrofit.attach(model, "roma", num_layers=widest)
    try:
        for n, d in deltas.items():
            if d is not None:
                deltas[n] = {l: d.get(l, torch.zeros_like(h.deltas[str(l)])) for l in h.layers}
        t0 = time.time()
        on_val = score_sets(h, tok, val, deltas, "validation")
        log(f"validation scored in {time.time() - t0:.0f} s")
        t0 = time.time()
        fit_eval = fit[:args.fit_eval] if args.fit_eval else fit
        on_fit = score_sets(h, tok, fit_eval, deltas, "fit")
        log(f"fit part scored in {time.time() - t0:.0f} s")
    finally:
        h.detach()
    assert fingerprint(model) == fp, "base weights changed"

    def se(p, n):
        return round(math.sqrt(p * (1 - p) / n), 4)

    rows = {}
    base_val = on_val["base"][2]
    for n in deltas:
        va, vg, vok = on_val[n]
        fa, fg, _ = on_fit[n]
        rows[n] = {"val_acc": round(va, 4), "val_acc_stderr": se(va, len(val)), "val_gold_prob": round(vg, 4),
                   "fit_acc": round(fa, 4), "fit_acc_stderr": se(fa, len(fit_eval)), "fit_gold_prob": round(fg, 4),
                   "val_fixed_vs_base": sum(a and not b for a, b in zip(vok, base_val)),
                   "val_broken_vs_base": sum(b and not a for a, b in zip(vok, base_val))}
        log(f"{n:32s} val {va:.4f} (gold p {vg:.4f})  fit {fa:.4f} (gold p {fg:.4f})")
    result = {
        "status": "script check on a tiny random Mixtral: numbers mean nothing" if args.tiny else
                  "real run on the MoE testbed",
        "model_fingerprint": fp,
        "n_fit": len(fit), "n_val": len(val), "n_fit_scored": len(fit_eval),
        "split": f"split_train_val(first {len(train)} ARC-Easy train questions, {args.val_fraction:g}, seed "
                 f"{args.seed}): the RoMA studies' split; no test item",
        "settings": {s: dict(zip(("lr", "lam", "k", "layers", "epochs"), SETTINGS[s])) for s in names},
        "results": rows,
        "train_reports": reports,
        "command": command_line(),
        "machine": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
                   f"{os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.time() - log.t0, 1),
        "log": log.lines,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
