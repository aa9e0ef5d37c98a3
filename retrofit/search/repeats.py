"""Which decoder layers a task gains from running twice: every single-layer repeat, scored per question.

Dr.LLM's routers may *repeat* a block as well as skip it, and the paper credits repeats with part of its
accuracy gains. The search rarely labels one (a repeat costs a pass, the reward only asks for a correct answer,
and the length penalty prefers shorter plans), so the labels cannot say where a repeat pays. This probe asks
directly: for each question it scores the all-execute plan and the L plans that repeat one layer (one
prefix-cached call, the plans share everything below the repeated layer). :func:`repeat_layers` then keeps the
layers whose repeat raises the task's accuracy on these questions by more than ``z`` standard errors (paired,
question by question) and raises the gold choice's mean probability too; task routers (``retrofit train
--target task --repeat-probes FILE``) repeat them in that task's centre.

Records (one JSON line per question, appended and flushed, so a killed probe resumes): ``index``, ``id``,
``task``, ``split``, ``kind`` ("repeat_probe"), ``num_layers``, ``base_correct``, ``base_gold_prob``,
``repeat_correct`` (L bools) and ``repeat_gold_prob`` (L floats), entry l for the plan that repeats layer l.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from retrofit.core.repeat_probe import KIND, read_probe, repeat_layers

__all__ = ["KIND", "probe_repeats", "read_probe", "repeat_layers"]


def _plans(L: int) -> list[tuple[str, ...]]:
    base = ("execute",) * L
    return [base] + [base[:i] + ("repeat",) + base[i + 1:] for i in range(L)]


def probe_repeats(model, tokenizer, examples, out, *, task: str = "", split: str | None = None,
                  evaluator=None, progress: bool = True, stop_after: int | None = None) -> list[dict]:
    """Score the all-execute plan and every single-layer repeat on each example; append a record per example to
    ``out`` (plain JSONL). Examples already there (same index and id) are kept, so a killed run resumes; a file
    of other data or another model depth is refused. Returns the records in example order."""
    from retrofit.search.evaluator import PlanEvaluator
    from retrofit.search.reward import gold_probability
    from retrofit.search.run import output_lock, read_records

    out = Path(out)
    if out.suffix == ".gz":
        raise ValueError(f"{out}: a probe is written (and resumed) as plain JSONL; gzip it when it is done")
    ev = evaluator or PlanEvaluator(model, tokenizer)
    L = ev.L
    plans = _plans(L)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        done = {}
        for r in read_records(out, repair=True) if out.is_file() else []:
            if r.get("kind") != KIND or r.get("num_layers") != L:
                raise ValueError(f"{out} holds other results (kind {r.get('kind')!r}, {r.get('num_layers')} layers; "
                                 f"this probe: {KIND!r}, {L} layers); use another --out")
            k = r["index"]
            if k >= len(examples) or examples[k].id != r["id"]:
                raise ValueError(f"{out}: record {k} has id {r['id']!r}, which is not example {k} of this data; "
                                 "the file belongs to other data")
            done[k] = r
        todo = [k for k in range(len(examples)) if k not in done]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="repeat probe", unit="q", dynamic_ncols=True)
        with open(out, "a", encoding="utf-8") as f:
            for n, k in enumerate(todo):
                if stop_after is not None and n >= stop_after:
                    break
                ex = examples[k]
                ev.set_example(ex)
                res = ev.evaluate(plans)
                if res[0].scores is None:
                    raise ValueError(f"example {ex.id!r} is generative: the repeat probe scores multiple-choice "
                                     "tasks (gold choice probability)")
                p = [gold_probability(r.scores, r.gold) for r in res]
                rec = {"index": k, "id": ex.id, "task": task or ex.task, "split": split, "kind": KIND,
                       "num_layers": L, "base_correct": bool(res[0].correct), "base_gold_prob": round(p[0], 5),
                       "repeat_correct": [bool(r.correct) for r in res[1:]],
                       "repeat_gold_prob": [round(v, 5) for v in p[1:]]}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[k] = rec
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    return [done[k] for k in sorted(done)]
