"""Label diagnostics: what a search's labels say before any router is trained on them.

``retrofit search`` prints these at the end and saves them beside the run (``<out>.labels.json`` and a heatmap
``<out>.labels.png``):

* per-layer action shares of the labels (skip / execute / repeat), also split by whether the base model
  already answers the question: labels that skip the same early layers for every question describe the
  search, not the questions;
* the mean number of layers the labels save, the share of questions with a label;
* agreement between two runs (other seeds) on the same questions: exact plans, per-layer actions, and the
  per-layer agreement two independent draws with the same shares would reach (chance);
* the single static plan the labels vote for (skip the ``round(mean layers saved)`` layers the labels skip most)
  and its accuracy on held-out questions next to the base model's.

Labels are the records whose search found a rewarded plan (``found``), the ones router training uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrofit.core.plans import ACTIONS, plan_passes

__all__ = ["label_diagnostics", "label_shares", "voted_plan", "seed_agreement", "save_diagnostics",
           "format_diagnostics", "plot_label_shares"]


def label_shares(records: list[dict]) -> list[list[float]]:
    """[L][3] share of the labels taking each action (skip, execute, repeat) at each layer."""
    if not records:
        return []
    L = len(records[0]["plan"])
    return [[sum(r["plan"][i] == a for r in records) / len(records) for a in ACTIONS] for i in range(L)]


def voted_plan(shares: list[list[float]], layers_saved: float) -> list[str]:
    """Skip the ``round(layers_saved)`` layers with the highest skip share; execute the rest."""
    L = len(shares)
    k = max(0, min(L, round(layers_saved)))
    order = sorted(range(L), key=lambda i: (-shares[i][0], i))
    skip = set(order[:k])
    return ["skip" if i in skip else "execute" for i in range(L)]


def seed_agreement(records: list[dict], other: list[dict]) -> dict:
    """Agreement of the labels of two runs on the questions both labelled."""
    by_id = {r["id"]: r for r in other if r.get("found")}
    pairs = [(r["plan"], by_id[r["id"]]["plan"]) for r in records if r.get("found") and r["id"] in by_id]
    if not pairs:
        return {"n_common": 0}
    L = len(pairs[0][0])
    per_layer = sum(sum(x == y for x, y in zip(a, b)) for a, b in pairs) / (len(pairs) * L)
    sa = label_shares([{"plan": a} for a, _ in pairs])
    sb = label_shares([{"plan": b} for _, b in pairs])
    chance = sum(sum(p * q for p, q in zip(sa[i], sb[i])) for i in range(L)) / L

    def skips(p):
        return {i for i, x in enumerate(p) if x == "skip"}

    jac = [len(skips(a) & skips(b)) / len(skips(a) | skips(b)) if skips(a) | skips(b) else 1.0 for a, b in pairs]
    return {"n_common": len(pairs), "exact_plan": sum(a == b for a, b in pairs) / len(pairs),
            "per_layer": per_layer, "per_layer_chance": chance, "skip_jaccard": sum(jac) / len(jac)}


def label_diagnostics(records: list[dict], evaluator=None, heldout=(), other: list[dict] | None = None) -> dict:
    """Every statistic above as one JSON-ready dict. ``evaluator`` (a ``PlanEvaluator``) and ``heldout``
    (examples none of the records holds) score the voted plan; ``other`` is a second run for agreement."""
    n = len(records)
    labels = [r for r in records if r.get("found")]
    out: dict = {"n_questions": n, "n_labels": len(labels), "label_rate": len(labels) / n if n else 0.0}
    if not labels:
        return out
    L = len(labels[0]["plan"])
    shares = label_shares(labels)
    saved = sum(L - plan_passes(r["plan"]) for r in labels) / len(labels)
    out.update(num_layers=L, mean_layers_saved=saved, label_layer_fraction=1 - saved / L,
               label_skip_share=[s[0] for s in shares], label_repeat_share=[s[2] for s in shares],
               base_kept_share=sum(all(a == "execute" for a in r["plan"]) for r in labels) / len(labels))
    for key, keep in (("base_correct", True), ("base_wrong", False)):
        sub = [r for r in labels if bool(r.get("base_correct")) == keep]
        out[f"label_skip_share_{key}"] = [s[0] for s in label_shares(sub)] if sub else None
        out[f"n_labels_{key}"] = len(sub)
    plan = voted_plan(shares, saved)
    out["voted_plan"] = "".join(a[0] for a in plan)
    if other is not None:
        out["seed_agreement"] = seed_agreement(records, other)
    heldout = list(heldout)
    if evaluator is not None and heldout:
        seen = {r["id"] for r in records}
        heldout = [ex for ex in heldout if ex.id not in seen]
        base = ("execute",) * L
        ok = {"base": 0, "voted": 0}
        for ex in heldout:
            evaluator.set_example(ex)
            rb, rv = evaluator.evaluate([base, tuple(plan)])
            ok["base"] += rb.correct
            ok["voted"] += rv.correct
        m = len(heldout)
        out["heldout"] = {"n": m, "base_acc": ok["base"] / m, "voted_plan_acc": ok["voted"] / m,
                          "voted_layer_fraction": plan_passes(plan) / L}
    return out


def format_diagnostics(d: dict) -> str:
    if not d.get("n_labels"):
        return f"labels: none of {d.get('n_questions', 0)} questions has a rewarded plan"
    L = d["num_layers"]
    lines = [f"labels: {d['n_labels']} of {d['n_questions']} questions ({d['label_rate']:.1%}); "
             f"mean layers saved {d['mean_layers_saved']:.2f} of {L}; base plan kept in {d['base_kept_share']:.1%}",
             "skip share per layer: " + " ".join(f"{s:.2f}" for s in d["label_skip_share"])]
    top = sorted(range(L), key=lambda i: -d["label_skip_share"][i])[:5]
    lines.append("most skipped layers: " + ", ".join(f"{i} ({d['label_skip_share'][i]:.2f})" for i in top))
    if "seed_agreement" in d and d["seed_agreement"].get("n_common"):
        a = d["seed_agreement"]
        lines.append(f"agreement with the other run ({a['n_common']} common): exact plan {a['exact_plan']:.2f}, "
                     f"per layer {a['per_layer']:.3f} (chance {a['per_layer_chance']:.3f}), "
                     f"skip-set Jaccard {a['skip_jaccard']:.2f}")
    if "heldout" in d:
        h = d["heldout"]
        lines.append(f"voted static plan {d['voted_plan']} on {h['n']} held-out questions: "
                     f"acc {h['voted_plan_acc']:.3f} at {h['voted_layer_fraction']:.3f} of the layers "
                     f"(base {h['base_acc']:.3f})")
    return "\n".join(lines)


def plot_label_shares(d: dict, path: Path, title: str = "") -> Path | None:
    """Heatmap of the labels' action shares per layer (rows: skip / execute / repeat; plus skip share split by
    base-correct and base-wrong questions)."""
    if not d.get("n_labels"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = d["num_layers"]
    skip, rep = d["label_skip_share"], d["label_repeat_share"]
    rows = [skip, [1 - s - r for s, r in zip(skip, rep)], rep]
    names = ["skip", "execute", "repeat"]
    for key in ("base_correct", "base_wrong"):
        if d.get(f"label_skip_share_{key}"):
            rows.append(d[f"label_skip_share_{key}"])
            names.append(f"skip ({key.replace('_', ' ')}, n={d[f'n_labels_{key}']})")
    fig, ax = plt.subplots(figsize=(max(6, L * 0.32), 0.55 * len(rows) + 1.4))
    im = ax.imshow(rows, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(rows)), names)
    ax.set_xticks(range(L))
    ax.set_xlabel("decoder layer")
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}"[1:] if v < 1 else "1", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.5 else "black")
    ax.set_title(title or f"label action shares: {d['n_labels']} labels, {d['mean_layers_saved']:.2f} layers saved")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def save_diagnostics(d: dict, out: str | Path) -> list[Path]:
    """``<out>.labels.json`` (+ ``<out>.labels.png``) beside the search results ``out``."""
    out = Path(out)
    base = out.with_name(out.name.removesuffix(".gz").removesuffix(".jsonl"))
    jp = base.with_name(base.name + ".labels.json")
    jp.write_text(json.dumps(d, indent=1) + "\n")
    png = plot_label_shares(d, base.with_name(base.name + ".labels.png"))
    return [jp] + ([png] if png else [])
