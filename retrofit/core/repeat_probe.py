"""Repeat-probe records (written by :func:`retrofit.search.repeats.probe_repeats`, `retrofit search-repeats`):
reading them and choosing, per task, the layers worth running twice. Here, below both, because router training
(:mod:`retrofit.methods.drllm.train`) reads them and the search writes them.

A record holds ``index``, ``id``, ``task``, ``split``, ``kind`` ("repeat_probe"), ``num_layers``,
``base_correct``, ``base_gold_prob``, ``repeat_correct`` (L bools) and ``repeat_gold_prob`` (L floats), entry l
for the plan that repeats layer l alone.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["KIND", "read_probe", "repeat_layers"]

KIND = "repeat_probe"


def read_probe(path) -> list[dict]:
    """The records of a probe file (plain or .gz JSONL); anything else in it is refused with its line."""
    from retrofit.core.data import read_search_records as read_records

    if not Path(path).is_file():
        raise FileNotFoundError(f"repeat probe {path} not found (write it with `retrofit search-repeats`)")
    recs = read_records(path)
    for n, r in enumerate(recs, 1):
        if r.get("kind") != KIND:
            raise ValueError(f"{path}: record {n} is not a repeat probe (kind {r.get('kind')!r}); write the file "
                             "with `retrofit search-repeats`")
    return recs


def repeat_layers(records: list[dict], L: int, z: float = 3.0, max_repeats: int = 1,
                  min_questions: int = 30) -> dict[str, dict]:
    """Per task, the layers worth repeating: the paired gain in accuracy (repeat minus base, question by question)
    exceeds ``z`` standard errors and the gold choice's mean probability rises. At most ``max_repeats`` layers,
    the largest lower bounds (mean - z se) first: the probe scores single repeats, not their combinations.
    Returns ``{task: {"layers": [...], "gain": [L], "se": [L], "prob_gain": [L], "n": N}}``; a task with fewer
    than ``min_questions`` questions is refused (its standard errors would not mean much)."""
    if z < 0 or max_repeats < 0:
        raise ValueError(f"z ({z}) and max_repeats ({max_repeats}) must be >= 0")
    groups: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind") != KIND:
            raise ValueError(f"record {r.get('id')!r} is not a repeat probe (kind {r.get('kind')!r})")
        if len(r["repeat_correct"]) != L or len(r["repeat_gold_prob"]) != L:
            raise ValueError(f"record {r.get('id')!r}: a probe of {len(r['repeat_correct'])} layers, the model "
                             f"has {L}")
        groups.setdefault(str(r.get("task", "default")), []).append(r)
    out = {}
    for task, recs in groups.items():
        n = len(recs)
        if n < min_questions:
            raise ValueError(f"task {task!r}: {n} probed questions, fewer than {min_questions}; probe more "
                             "(`retrofit search-repeats --limit`)")
        gain, se, pgain = [], [], []
        for i in range(L):
            d = [float(r["repeat_correct"][i]) - float(r["base_correct"]) for r in recs]
            m = sum(d) / n
            var = sum((x - m) ** 2 for x in d) / (n - 1)
            gain.append(m)
            se.append(math.sqrt(var / n))
            pgain.append(sum(r["repeat_gold_prob"][i] - r["base_gold_prob"] for r in recs) / n)
        ok = [i for i in range(L) if gain[i] - z * se[i] > 0 and pgain[i] > 0]
        ok.sort(key=lambda i: (-(gain[i] - z * se[i]), i))
        out[task] = {"layers": sorted(ok[:max_repeats]), "gain": [round(g, 5) for g in gain],
                     "se": [round(s, 5) for s in se], "prob_gain": [round(p, 5) for p in pgain], "n": n}
    return out
