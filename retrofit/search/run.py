"""Running the per-example search over a task: sharding, append-and-flush JSONL, resume, merge, summary."""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

from retrofit.core.data import read_search_records as read_records
from retrofit.core.data import repair_search_file
from retrofit.core.plans import plan_letters

from .evaluator import PlanEvaluator
from .mcts import MCTSConfig, budget_passes, mcts_search
from .reward import RewardRule, gold_probability
from .tasks import Example

__all__ = ["parse_shard", "shard_indices", "read_records", "search_examples", "merge_files", "summarize",
           "format_summary", "output_lock", "SearchLockedError", "repair_search_file"]

_RUN_KEYS = ("seed", "budget_passes", "simulations", "num_layers", "search", "reward_rule")


def parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard {shard!r}: write it as i/n, e.g. 0/4 (shards 0..n-1)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {shard!r}: need n >= 1 and 0 <= i < n")
    return i, n


def shard_indices(n_examples: int, shard: tuple[int, int]) -> list[int]:
    i, n = shard
    return [k for k in range(n_examples) if k % n == i]


def search_examples(model, tokenizer, examples: list[Example], out: str | Path, *, cfg: MCTSConfig | None = None,
                    budget=None, seed: int = 0, shard: tuple[int, int] = (0, 1), progress: bool = True,
                    task: str = "", split: str | None = None, stop_after: int | None = None,
                    evaluator: PlanEvaluator | None = None, reward: RewardRule | None = None,
                    repair: bool = False) -> list[dict]:
    """Search a plan for every example of this shard; append one JSONL record per example (flushed, fsynced).

    Examples already in ``out`` (same index and id) are skipped, so a killed run resumes with nothing lost or
    duplicated; a resume with other search or reward settings is refused (they are stored in every record).
    ``reward`` decides which plans count as correct (default: ``RewardRule()``, the confident rule).
    ``stop_after`` stops after that many new examples (used by tests to simulate a kill).
    The run holds a lock on ``out`` (``<out>.lock``): a second search on the same file is refused
    (:class:`SearchLockedError`) instead of writing every example twice. ``repair`` first drops damaged lines
    (:func:`retrofit.core.data.repair_search_file`: kept in ``<out>.dropped``); their examples are searched again.
    Returns the records of this shard, in example order.
    """
    cfg = cfg or MCTSConfig()
    reward = reward or RewardRule()
    ev = evaluator or PlanEvaluator(model, tokenizer)
    L = ev.L
    bp = budget_passes(budget, L)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if repair:
            repair_search_file(out)
        return _search_locked(ev, examples, out, cfg, reward, L, bp, seed, shard, progress, task, split, stop_after)


def _search_locked(ev, examples, out, cfg, reward, L, bp, seed, shard, progress, task, split, stop_after):
    existing = read_records(out, repair=True)
    run_info = {"seed": seed, "budget_passes": bp, "simulations": cfg.simulations, "num_layers": L,
                "search": asdict(cfg), "reward_rule": reward.to_dict()}
    done = {}
    for r in existing:
        if not isinstance(r.get("index"), int) or "id" not in r:
            raise ValueError(f"{out}: a record without 'index' / 'id' ({str(r)[:80]}): not `retrofit search` output; "
                             "use another --out")
        for k in _RUN_KEYS:
            if r.get(k) != run_info[k]:
                raise ValueError(f"{out} holds results of another run ({k}={r.get(k)!r}, this run {run_info[k]!r}); "
                                 "use another --out or the same settings to resume")
        done[r["index"]] = r
    todo = [k for k in shard_indices(len(examples), shard) if k not in done]
    for k in done:
        if k < len(examples) and done[k]["id"] != examples[k].id:
            raise ValueError(f"{out}: record {k} has id {done[k]['id']!r} but example {k} is {examples[k].id!r}; "
                             "the file belongs to other data")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="search", unit="ex", dynamic_ncols=True)
    t0, n_cfg, n_new = time.perf_counter(), 0, 0
    with open(out, "a", encoding="utf-8") as f:
        for k in todo:
            if stop_after is not None and n_new >= stop_after:
                break
            ex = examples[k]
            ev.set_example(ex)
            rng = random.Random(f"{seed}:{k}:{ex.id}")
            base_res = ev.evaluate([("execute",) * L])[0]
            evaluated: dict[tuple, object] = {}

            def judge(plans):
                results = ev.evaluate(plans)
                for r in results:
                    evaluated[r.plan] = r
                return [reward.correct(r, base_res) for r in results]

            # nothing can earn the reward here (the base plan is wrong and flips do not count): no tree
            search_cfg = cfg if reward.searchable(base_res) else replace(cfg, simulations=0)
            res = mcts_search(judge, L, search_cfg, rng, budget=bp)
            chosen = ev.evaluate([res.plan])[0]
            conf = {}
            if chosen.scores is not None:
                conf = {"base_gold_prob": _gold_prob(base_res), "gold_prob": _gold_prob(chosen)}
            rec = {
                "index": k, "id": ex.id, "task": task or ex.task, "split": split, "prompt": ex.prompt,
                "choices": ex.choices, "gold": ex.gold, **({"contexts": ex.contexts} if ex.contexts else {}),
                "plan": list(res.plan), "reward": res.reward, "compute": res.compute,
                "layer_fraction": res.compute / L, "base_correct": bool(base_res.correct),
                "base_rewarded": res.base_correct, "correct": chosen.correct,
                "found": res.found, **conf, "good_plans": [plan_letters(p) for p in res.good_plans],
                # every plan the search evaluated, as [letters, gold choice probability (null: generative), correct]
                # so that other reward rules can be applied to the same search afterwards (label ablations)
                "evaluated": [[plan_letters(p), _gold_prob(r), bool(r.correct)] for p, r in evaluated.items()],
                "stats": {"simulations": res.simulations, "configs": res.configs, "seconds": round(res.seconds, 3)},
                **run_info,
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done[k] = rec
            n_new += 1
            n_cfg += res.configs
            if bar is not None:
                dt = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix({"ex/s": f"{n_new / dt:.3f}", "cfg/s": f"{n_cfg / dt:.1f}"})
    if bar is not None:
        bar.close()
    return [done[k] for k in sorted(done)]


class SearchLockedError(ValueError):
    """Another search is writing the same output file."""


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on ``<out>.lock`` (``fcntl.flock``, released when the process ends, also when it is
    killed) while this process appends to ``out``; on systems without ``fcntl`` nothing is locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    f = open(out.with_name(out.name + ".lock"), "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise SearchLockedError(f"another `retrofit search` (pid {holder}) is writing {out} now; wait for it to "
                                    "finish (it resumes, so nothing is lost) or give this run another --out "
                                    "(parallel shards: --shard i/n, one --out each)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _gold_prob(result) -> float | None:
    return None if result.scores is None else round(gold_probability(result.scores, result.gold), 5)


def summarize(records: list[dict]) -> dict:
    n = len(records)
    if n == 0:
        return {"n_examples": 0}
    return {
        "n_examples": n,
        "base_acc": sum(r["base_correct"] for r in records) / n,
        "searched_acc": sum(r["correct"] for r in records) / n,
        "found_rate": sum(r["found"] for r in records) / n,
        "mean_layer_fraction": sum(r["layer_fraction"] for r in records) / n,
        "mean_compute": sum(r["compute"] for r in records) / n,
        "configs_evaluated": sum(r["stats"]["configs"] for r in records),
        "search_seconds": sum(r["stats"]["seconds"] for r in records),
    }


def format_summary(s: dict) -> str:
    if not s.get("n_examples"):
        return "no examples"
    return (f"examples {s['n_examples']}\n"
            f"                 base (all layers)   searched plans\n"
            f"accuracy         {s['base_acc']:>17.3f}   {s['searched_acc']:.3f}\n"
            f"layer fraction   {1.0:>17.3f}   {s['mean_layer_fraction']:.3f}\n"
            f"(no correct plan found for {1 - s['found_rate']:.1%} of the examples; they keep the base plan)")


def merge_files(inputs: list[str | Path], out: str | Path) -> list[dict]:
    """Join shard files into one, ordered by example index; duplicates must agree; mixed runs are refused."""
    by_index: dict[int, dict] = {}
    run_info = None
    for p in inputs:
        for r in read_records(p):
            info = {k: r.get(k) for k in _RUN_KEYS}
            if run_info is None:
                run_info = info
            elif info != run_info:
                raise ValueError(f"{p}: made with other settings ({info}) than the first file ({run_info})")
            k = r["index"]
            if k in by_index and by_index[k] != r:
                raise ValueError(f"{p}: example {k} ({r['id']}) differs from the copy in another file")
            by_index[k] = r
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for k in sorted(by_index):
            f.write(json.dumps(by_index[k], ensure_ascii=False) + "\n")
    tmp.replace(out)
    return [by_index[k] for k in sorted(by_index)]

