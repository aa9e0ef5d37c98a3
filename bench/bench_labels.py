"""Label statistics of the Dr.LLM searches on ARC-Easy train, old against new (no model needed).

* old: the layer-prefix tree with the binary reward (``search_arc_easy_train_full_h100.jsonl.gz``);
* new: Dr.LLM's path tree with the confident no-flip reward (seed 0), its agreement with a second seed on the
  same questions, and next to them labels re-derived from the *same* evaluated plans under other rules
  (binary: the gold wins; confident with flips), from a path-tree run that searched every question
  (``--flips``): which plans a rule accepts is recomputed from each record's ``evaluated`` list.

    python bench/bench_labels.py --old bench/results/search_arc_easy_train_full_h100.jsonl.gz \\
        --new bench/results/search_arc_easy_train_path.jsonl.gz --seed1 runs/search_path_s1_300.jsonl \\
        --flips runs/search_path_flips_s0.jsonl --out bench/results/drllm_labels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from retrofit.core.plans import LETTERS, plan_passes, plan_unique_layers
from retrofit.search.diagnostics import format_diagnostics, label_diagnostics, plot_label_shares, seed_agreement
from retrofit.search.run import read_records

KEYS = ("n_questions", "n_labels", "label_rate", "mean_layers_saved", "label_layer_fraction", "base_kept_share",
        "label_skip_share", "label_skip_share_base_correct", "label_skip_share_base_wrong", "n_labels_base_correct",
        "n_labels_base_wrong", "voted_plan", "seed_agreement")


def relabel(records: list[dict], accept) -> list[dict]:
    """Records whose label is the shortest evaluated plan that ``accept(letters, p_gold, gold_wins, record)``
    accepts (ties: fewer unique layers, then the order evaluated)."""
    out = []
    for r in records:
        L = len(r["plan"])
        best = None
        for j, (letters, p, ok) in enumerate(r["evaluated"]):
            plan = [LETTERS[c] for c in letters]
            if plan_passes(plan) <= L and accept(letters, p, ok, r):
                key = (plan_passes(plan), plan_unique_layers(plan), j)
                best = key + (plan,) if best is None or key < best[:3] else best
        found = best is not None
        out.append({**r, "plan": best[3] if found else ["execute"] * L, "found": found})
    return out


def safety_agreement(records: list[dict], other: list[dict]) -> dict:
    """Per question, the correlation over layers of the two runs' safety targets (how often skipping a layer
    kept the answer; ``retrofit train --target safety``), averaged over the questions both labelled."""
    import torch

    from retrofit.methods.drllm.train import safety_targets

    by_id = {r["id"]: r for r in other if r.get("found")}
    cs = []
    for r in records:
        if r.get("found") and r["id"] in by_id:
            a = safety_targets(r, len(r["plan"]))[:, 0]
            b = safety_targets(by_id[r["id"]], len(r["plan"]))[:, 0]
            if a.std() > 0 and b.std() > 0:
                cs.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
    return {"n_common": len(cs), "mean_layer_correlation": sum(cs) / len(cs) if cs else None}


def stats(records, other=None):
    d = label_diagnostics(records, other=other)
    return {k: d[k] for k in KEYS if k in d}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--seed1", required=True)
    ap.add_argument("--flips", required=True)
    ap.add_argument("--out", default="bench/results/drllm_labels.json")
    args = ap.parse_args()
    old, new, s1, fl = (read_records(p) for p in (args.old, args.new, args.seed1, args.flips))
    ids1 = {r["id"] for r in s1}
    res = {
        "old_prefix_tree_binary": stats(old),
        "new_path_tree_confident": stats(new, other=s1),
        "new_seed1_same_questions": stats(s1),
        "new_seed0_on_seed1_questions": stats([r for r in new if r["id"] in ids1], other=s1),
        "ablation_same_plans": {
            "n_questions": len(fl),
            "binary": stats(relabel(fl, lambda s, p, ok, r: ok)),
            "confident_flips": stats(relabel(fl, lambda s, p, ok, r: ok and p >= 0.5
                                             and p >= r["base_gold_prob"] - 0.1)),
            "confident_no_flips": stats(relabel(fl, lambda s, p, ok, r: ok and r["base_correct"] and p >= 0.5
                                                and p >= r["base_gold_prob"] - 0.1)),
        },
        "files": {"old": args.old, "new": args.new, "seed1": args.seed1, "flips": args.flips},
        "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
    }
    res["seed_agreement"] = seed_agreement(new, s1)
    res["safety_target_agreement"] = safety_agreement(new, s1)
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1) + "\n")
    for name, recs in (("old", old), ("new", new)):
        d = label_diagnostics(recs)
        plot_label_shares(d, out.with_name(f"{out.stem}_{name}.png"),
                          title=f"{name} labels: {d.get('n_labels')} labels, "
                                f"{d.get('mean_layers_saved', 0):.2f} layers saved")
    for k in ("old_prefix_tree_binary", "new_path_tree_confident"):
        print(f"== {k}\n{format_diagnostics({**res[k], 'num_layers': len(res[k]['label_skip_share'])})}")
    for k, v in res["ablation_same_plans"].items():
        if isinstance(v, dict):
            print(f"ablation {k}: {v['n_labels']} labels of {v['n_questions']}, saved {v.get('mean_layers_saved')}, "
                  f"skip share layers 0-4 {[round(x, 2) for x in (v.get('label_skip_share') or [])[:5]]}")
    print("seed agreement:", res["seed_agreement"])
    print("safety-target agreement:", res["safety_target_agreement"])


if __name__ == "__main__":
    main()
