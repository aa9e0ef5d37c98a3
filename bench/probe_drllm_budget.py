"""Probe: is a question's *budget* predictable from its prompt, where its choice of layers was not?

The MCTS labels carry a clear per-layer signal (their voted static plan beats ShortGPT) and no per-question
layer choice that survives a second seed. This probe tests another per-question signal: how many of the voted
order's layers a question can lose. For every question, the nested plans "skip the k layers the labels skip
most", k = 0..K, are scored (one prefix-cached call); a question's safe budget is the largest k whose every
nested plan keeps the base answer under the search's confident reward (questions the base answers wrongly have
nothing to lose: budget K). Features are the prompt's mean hidden state entering a few layers under the base
plan. A ridge regression fitted on ARC-Easy train predicts the budget; the budget is then given out by
quantile bins of the prediction, with the bins' budgets chosen on train (cross-validated) to maximise the
reward at a mean budget (also the validation AUC of the same features for "the base plan answers" and "the
voted k = 3 plan keeps the answer"); validation accuracy (never used to choose anything) is read from the nested-plan
table next to the static voted plan at the same mean budget.

    python bench/probe_drllm_budget.py --search bench/results/search_arc_easy_train_path.jsonl.gz --train-limit 1500

(per-question tables in ``--workdir``, resumed when present: about 25 min on one core)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from retrofit.core.data import load_task
from retrofit.models import load_model
from retrofit.search.diagnostics import label_shares, voted_plan
from retrofit.search.evaluator import PlanEvaluator
from retrofit.search.reward import RewardRule, gold_probability
from retrofit.search.run import read_records

LAYERS = (4, 8, 13, 19, 24, 30)  # hidden_states indices: input of layer i (30 = final norm input)


@torch.no_grad()
def table(model, tok, exs, plans, path: Path, rule: RewardRule):
    """Per question and nested plan: correct, rewarded, gold probability; features [N, len(LAYERS), d]."""
    done = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    rows = done["rows"]
    ev = PlanEvaluator(model, tok)
    for ex in tqdm(exs[len(rows):], desc=path.stem, dynamic_ncols=True, initial=len(rows), total=len(exs)):
        ev.set_example(ex)
        res = ev.evaluate(plans)
        base = res[0]
        ids = tok(ex.prompt, return_tensors="pt").input_ids
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states
        rows.append({"id": ex.id, "correct": [bool(r.correct) for r in res],
                     "reward": [bool(rule.correct(r, base)) for r in res],
                     "p_gold": [gold_probability(r.scores, r.gold) for r in res],
                     "feat": [hs[i][0].mean(0).tolist() for i in LAYERS]})
        if len(rows) % 100 == 0:
            path.write_text(json.dumps({"rows": rows}))
    path.write_text(json.dumps({"rows": rows}))
    return rows


def budgets(rows, K):
    out = []
    for r in rows:
        if not r["correct"][0]:
            out.append(K)
            continue
        k = 0
        while k < K and r["reward"][k + 1]:
            k += 1
        out.append(k)
    return torch.tensor(out, dtype=torch.float64)


def ridge(X, y, lam):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    A = Z.T @ Z + lam * torch.eye(Z.shape[1], dtype=Z.dtype)
    w = torch.linalg.solve(A, Z.T @ (y - y.mean()))
    return lambda Xn: ((Xn - mu) / sd) @ w + y.mean()


def auc(score, y) -> float:
    """Area under the ROC curve of ``score`` for the boolean labels ``y`` (rank statistic; ties ignored)."""
    y = torch.as_tensor(y, dtype=torch.bool)
    r = score.argsort().argsort().double() + 1
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def allocate(score, value, mean_budget, bins, K):
    """Budgets per quantile bin of ``score`` (monotone: higher score, larger budget) maximising the summed
    ``value[q][k]`` at the mean budget; a small exhaustive search over non-decreasing bin budgets."""
    edges = torch.quantile(score, torch.linspace(0, 1, bins + 1, dtype=score.dtype)[1:-1])
    b = torch.bucketize(score, edges)
    gain = torch.stack([value[b == j].sum(0) for j in range(bins)])  # [bins, K+1]
    cnt = torch.tensor([(b == j).sum() for j in range(bins)], dtype=torch.float64)
    best, best_ks = -1e9, None

    def rec(j, lo, ks):
        nonlocal best, best_ks
        if j == bins:
            m = sum(c * k for c, k in zip(cnt.tolist(), ks)) / float(cnt.sum())
            if abs(m - mean_budget) <= 0.15:
                g = sum(float(gain[i, k]) for i, k in enumerate(ks))
                if g > best:
                    best, best_ks = g, list(ks)
            return
        for k in range(lo, K + 1):
            rec(j + 1, k, ks + [k])

    rec(0, 0, [])
    return edges, best_ks


def apply(score, edges, ks):
    return torch.tensor(ks)[torch.bucketize(score, edges)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", required=True)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--val-limit", type=int, default=None)
    ap.add_argument("--workdir", default="runs/budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bins", type=int, default=4)
    ap.add_argument("--out", default="bench/results/drllm_budget_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model("default")
    recs = list(read_records(args.search))
    shares = label_shares([r for r in recs if r.get("found")])
    plans = [tuple(voted_plan(shares, k)) for k in range(args.K + 1)]
    rule = RewardRule()
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    tr = table(model, tok, load_task("arc_easy", "train", args.train_limit), plans, wd / "train_table.json", rule)
    va = table(model, tok, load_task("arc_easy", "validation", args.val_limit), plans, wd / "val_table.json", rule)
    K = args.K
    ytr, yva = budgets(tr, K), budgets(va, K)
    res = {"K": K, "n_train": len(tr), "n_val": len(va), "layers": list(LAYERS), "plans": plans, "by_layer": {}}
    # value of giving question q budget k: train = the reward (base-wrong questions: 0 whatever k), val = acc
    vtr = torch.tensor([[float(x) for x in r["reward"]] for r in tr], dtype=torch.float64)
    vtr[:, 0] = torch.tensor([float(r["correct"][0]) for r in tr], dtype=torch.float64)
    cva = torch.tensor([[float(x) for x in r["correct"]] for r in va], dtype=torch.float64)
    static = {k: float(cva[:, k].mean()) for k in range(K + 1)}
    res["static_val"] = static
    for li, layer in enumerate(LAYERS + ("all",)):
        if layer == "all":
            Xtr = torch.tensor([sum(r["feat"], []) for r in tr], dtype=torch.float64)
            Xva = torch.tensor([sum(r["feat"], []) for r in va], dtype=torch.float64)
        else:
            Xtr = torch.tensor([r["feat"][li] for r in tr], dtype=torch.float64)
            Xva = torch.tensor([r["feat"][li] for r in va], dtype=torch.float64)
        # lambda and the cross-validated train scores, 5 folds
        folds = torch.arange(len(tr)) % 5
        best = None
        for lam in (1e1, 1e2, 1e3, 1e4):
            cv = torch.empty(len(tr), dtype=torch.float64)
            for f in range(5):
                m = ridge(Xtr[folds != f], ytr[folds != f], lam)
                cv[folds == f] = m(Xtr[folds == f])
            r2 = 1 - ((cv - ytr) ** 2).mean() / ytr.var()
            if best is None or r2 > best[0]:
                best = (float(r2), lam, cv)
        r2, lam, cv = best
        pred_va = ridge(Xtr, ytr, lam)(Xva)
        r2_va = float(1 - ((pred_va - yva) ** 2).mean() / yva.var())
        out = {"lambda": lam, "cv_r2_train": r2, "r2_val": r2_va, "points": []}
        # the same features, two yes/no questions a budget router needs answered: does the base plan answer,
        # and does the voted k = 3 plan keep that answer (ridge score, lambda from train cross-validation above)
        for name, f in (("base_correct", lambda r: r["correct"][0]),
                        ("keeps_voted_k3", lambda r: r["correct"][0] and all(r["reward"][1:4]))):
            y = torch.tensor([float(f(r)) for r in tr], dtype=torch.float64)
            out[f"auc_val_{name}"] = auc(ridge(Xtr, y, lam)(Xva), [f(r) for r in va])
        for mb in (1, 2, 3, 4, 5):
            edges, ks = allocate(cv, vtr, mb, args.bins, K)
            if ks is None:
                continue
            kv = apply(pred_va, torch.quantile(pred_va, torch.linspace(0, 1, args.bins + 1,
                                                                        dtype=torch.float64)[1:-1]), ks)
            acc = float(cva[torch.arange(len(va)), kv].mean())
            out["points"].append({"mean_budget_target": mb, "bin_budgets": ks,
                                  "val_mean_budget": float(kv.float().mean()), "val_acc": acc,
                                  "static_val_acc": static[mb]})
        res["by_layer"][str(layer)] = out
        print(layer, json.dumps(out))
    res["val_base"] = static[0]
    res["seconds"] = round(time.time() - t0, 1)
    res["command"] = "python " + " ".join(sys.argv)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
