"""Search: packed/prefix-cached evaluator vs full forwards, MCTS tree logic, resume, shards, determinism, optuna."""

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retrofit.core.plans import plan_passes, plan_unique_layers
from retrofit.search.evaluator import PlanEvaluator, naive_scores
from retrofit.search.mcts import MCTSConfig, budget_passes, mcts_search
from retrofit.search.run import merge_files, read_records, search_examples, summarize
from retrofit.search.tasks import Example
from retrofit.testing import tiny_model
from retrofit.testing.search_toys import CharTokenizer, toy_examples

REPO = Path(__file__).resolve().parents[1]
ACTS = ("skip", "execute", "repeat")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    m = tiny_model("llama", seed=0, initializer_range=0.5)  # larger weights: plans change the answers
    return m, CharTokenizer(m.config.vocab_size)


def _strip_time(recs):
    out = []
    for r in recs:
        r = json.loads(json.dumps(r))
        r["stats"].pop("seconds")
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------- evaluator
@pytest.mark.parametrize("family", ["llama", "qwen3", "olmoe"])
def test_packed_prefix_cached_scores_equal_full_forwards(family):
    m = tiny_model(family, seed=1)
    tok = CharTokenizer(m.config.vocab_size)
    params = {k: v.clone() for k, v in m.state_dict().items()}
    ev = PlanEvaluator(m, tok)
    rng = random.Random(0)
    L = ev.L
    plans = [tuple(["execute"] * L), tuple(["skip"] * L), tuple(["repeat"] * L)]
    plans += [tuple(rng.choice(ACTS) for _ in range(L)) for _ in range(9)]
    for ex in toy_examples(3):
        ev.set_example(ex)
        got = ev.evaluate(plans[:6]) + ev.evaluate(plans[6:])  # two batches: the second reuses cached prefixes
        for p, r in zip(plans, got):
            ref = naive_scores(m, tok, ex, p)
            assert r.scores == pytest.approx(ref, abs=1e-4), (p, r.scores, ref)
            assert r.pred == max(range(len(ref)), key=ref.__getitem__)
            assert r.correct == (r.pred == ex.gold)
    for k, v in m.state_dict().items():  # the base model is frozen
        assert torch.equal(v, params[k]), k


def test_all_execute_plan_is_the_base_model(tiny):
    m, _ = tiny
    ev = PlanEvaluator(m, tiny[1])
    ids = torch.tensor([[5, 9, 17, 33, 60, 7]])
    ref = m(ids).logits
    got = ev.run_plan(ids, ["execute"] * ev.L)
    assert torch.allclose(got, ref, atol=1e-5)
    # skipping every layer leaves the embeddings: logits = head(embed)
    inner = m.model
    assert torch.allclose(ev.run_plan(ids, ["skip"] * ev.L), m.lm_head(inner.norm(inner.embed_tokens(ids))),
                          atol=1e-6)


def test_prefix_cache_reruns_only_the_layers_after_the_first_difference(tiny):
    m, tok = tiny
    ev = PlanEvaluator(m, tok)
    ev.set_example(toy_examples(1)[0])
    E, S, R = "execute", "skip", "repeat"
    ev.evaluate([(E, E, E, E)])
    assert ev.stats["block_passes"] == 4
    ev.evaluate([(E, E, E, R)])  # differs at layer 3: layer 3 twice
    assert ev.stats["block_passes"] == 6
    ev.evaluate([(E, S, E, E)])  # differs at layer 1: skip costs nothing, layers 2 and 3 rerun
    assert ev.stats["block_passes"] == 8
    ev.evaluate([(E, S, E, E)])  # already scored: nothing runs
    assert ev.stats["block_passes"] == 8 and ev.stats["configs"] == 3
    # a batch: the shared parent of execute and repeat at layer 0 runs once; repeat adds one second pass
    ev2 = PlanEvaluator(m, tok)
    ev2.set_example(toy_examples(1)[0])
    ev2.evaluate([(E, S, S, S), (R, S, S, S), (S, S, S, S)])
    assert ev2.stats["block_passes"] == 2


def test_prefix_cache_off_costs_full_forwards(tiny):
    m, tok = tiny
    ev = PlanEvaluator(m, tok, prefix_cache=False)
    ev.set_example(toy_examples(1)[0])
    ev.evaluate([("execute",) * 4])
    ev.evaluate([("execute",) * 3 + ("skip",)])
    assert ev.stats["block_passes"] == 7


def test_bad_plans_are_refused(tiny):
    ev = PlanEvaluator(*tiny)
    ev.set_example(toy_examples(1)[0])
    with pytest.raises(ValueError, match="one action per decoder layer"):
        ev.evaluate([("execute",) * 3])
    with pytest.raises(ValueError, match="unknown plan actions"):
        ev.evaluate([("execute", "jump", "execute", "execute")])


# ----------------------------------------------------------------------------------------- tree logic
def _oracle(fn, calls):
    def evaluate(plans):
        calls.append(list(plans))
        return [fn(p) for p in plans]
    return evaluate


def _brute_best(L, fn, budget):
    best = None
    for p in itertools.product(ACTS, repeat=L):
        if fn(p) and plan_passes(p) <= budget:
            key = (plan_passes(p), plan_unique_layers(p))
            best = key if best is None or key < best else best
    return best


def test_mcts_finds_the_known_best_plan():
    # correct iff layers 0, 3, 4 run (execute or repeat): the best plan runs exactly those, once each
    need = {0, 3, 4}
    fn = lambda p: all(p[i] != "skip" for i in need)  # noqa: E731
    res = mcts_search(_oracle(fn, []), 6, MCTSConfig(simulations=400), random.Random(0))
    assert res.found and res.reward == 1.0
    assert res.plan == ("execute", "skip", "skip", "execute", "execute", "skip")
    assert res.compute == 3


def test_mcts_ties_go_to_fewer_unique_layers():
    # correct iff at least 4 block passes: shortest = 4 passes; fewest unique layers = two repeats
    fn = lambda p: plan_passes(p) >= 4  # noqa: E731
    res = mcts_search(_oracle(fn, []), 4, MCTSConfig(simulations=400), random.Random(1))
    assert (res.compute, plan_unique_layers(res.plan)) == _brute_best(4, fn, 4) == (4, 2)
    assert sorted(res.plan) == ["repeat", "repeat", "skip", "skip"]


def test_mcts_respects_the_budget_and_flags_unsolved():
    fn = lambda p: all(a == "execute" for a in p)  # noqa: E731  only the base plan is correct
    res = mcts_search(_oracle(fn, []), 5, MCTSConfig(simulations=20), random.Random(0), budget=4)
    assert not res.found and res.reward == 0.0 and res.base_correct
    assert res.plan == ("execute",) * 5  # unsolved examples keep the base plan
    res = mcts_search(_oracle(fn, []), 5, MCTSConfig(simulations=20), random.Random(0), budget=5)
    assert res.found and res.plan == ("execute",) * 5


def test_mcts_batches_and_counts_simulations():
    calls = []
    res = mcts_search(_oracle(lambda p: False, calls), 8, MCTSConfig(simulations=50, batch=8), random.Random(0))
    assert res.simulations == 50
    assert len(calls) == 1 + 7  # the base plan, then ceil(50 / 8) rounds
    assert res.configs == len({p for c in calls for p in c})
    assert not res.found and res.plan == ("execute",) * 8


def test_mcts_without_repeat_never_repeats():
    seen = []
    mcts_search(_oracle(lambda p: seen.append(p) or False, []), 6,
                MCTSConfig(simulations=60, allow_repeat=False, rollout_repeat=0.5), random.Random(0))
    assert seen and all("repeat" not in p for p in seen)


def test_budget_parsing():
    assert budget_passes(None, 30) == 30
    assert budget_passes(1.0, 30) == 30 and budget_passes("0.9", 30) == 27 and budget_passes("27", 30) == 27
    assert budget_passes(27, 30) == 27 and budget_passes(1.5, 30) == 45
    with pytest.raises(ValueError):
        budget_passes("abc", 30)
    with pytest.raises(ValueError):
        budget_passes(0, 30)


def test_search_on_a_tiny_model_finds_the_brute_force_best():
    """Gold is chosen so that the base model is wrong; the best plan is known by enumerating all 81 plans."""
    m = tiny_model("llama", seed=0, initializer_range=0.5)  # larger weights: plans change the answer
    tok = CharTokenizer(m.config.vocab_size)
    ex = toy_examples(1)[0]
    preds = {p: max(range(4), key=naive_scores(m, tok, ex, p).__getitem__)
             for p in itertools.product(ACTS, repeat=4)}
    base_pred = preds[("execute",) * 4]
    # the choice (other than the base answer) reachable by the most plans
    counts = {c: sum(v == c for v in preds.values()) for c in range(4) if c != base_pred}
    gold = max(counts, key=lambda c: (counts[c], -c))
    assert counts[gold] > 0
    ex = Example(ex.id, ex.prompt, ex.choices, gold)
    want = _brute_best(4, lambda p: preds[p] == gold, 4)
    ev = PlanEvaluator(m, tok)
    ev.set_example(ex)
    res = mcts_search(lambda ps: [r.correct for r in ev.evaluate(ps)], 4, MCTSConfig(simulations=150),
                      random.Random(0))
    assert res.found and not res.base_correct
    assert (res.compute, plan_unique_layers(res.plan)) == want
    assert preds[res.plan] == gold


# ----------------------------------------------------------------------------------------- runs
def test_same_seed_same_results_and_records(tiny, tmp_path):
    m, tok = tiny
    exs = toy_examples(4)
    cfg = MCTSConfig(simulations=16, batch=4)
    a = search_examples(m, tok, exs, tmp_path / "a.jsonl", cfg=cfg, seed=3, progress=False)
    b = search_examples(m, tok, exs, tmp_path / "b.jsonl", cfg=cfg, seed=3, progress=False)
    assert _strip_time(a) == _strip_time(b)
    c = search_examples(m, tok, exs, tmp_path / "c.jsonl", cfg=cfg, seed=4, progress=False)
    # another seed explores in another order (the small toy's best plans may coincide)
    assert [r["good_plans"] for r in c] != [r["good_plans"] for r in a]
    r = a[0]
    for k in ("id", "prompt", "choices", "gold", "plan", "reward", "compute", "layer_fraction", "base_correct",
              "correct", "stats"):
        assert k in r
    assert r["compute"] == plan_passes(r["plan"]) and r["layer_fraction"] == r["compute"] / 4
    assert set(r["stats"]) == {"simulations", "configs", "seconds"}
    assert read_records(tmp_path / "a.jsonl") == a
    s = summarize(a)
    assert s["searched_acc"] >= s["base_acc"]


def test_shards_merge_to_the_unsharded_run(tiny, tmp_path):
    m, tok = tiny
    exs = toy_examples(5)
    cfg = MCTSConfig(simulations=10, batch=5)
    full = search_examples(m, tok, exs, tmp_path / "full.jsonl", cfg=cfg, seed=0, progress=False)
    s0 = search_examples(m, tok, exs, tmp_path / "s0.jsonl", cfg=cfg, seed=0, shard=(0, 2), progress=False)
    s1 = search_examples(m, tok, exs, tmp_path / "s1.jsonl", cfg=cfg, seed=0, shard=(1, 2), progress=False)
    assert [r["index"] for r in s0] == [0, 2, 4] and [r["index"] for r in s1] == [1, 3]
    merged = merge_files([tmp_path / "s1.jsonl", tmp_path / "s0.jsonl", tmp_path / "s0.jsonl"], tmp_path / "m.jsonl")
    assert _strip_time(merged) == _strip_time(full)
    other = search_examples(m, tok, exs[:1], tmp_path / "o.jsonl", cfg=cfg, seed=1, progress=False)
    assert other
    with pytest.raises(ValueError, match="other settings"):
        merge_files([tmp_path / "s0.jsonl", tmp_path / "o.jsonl"], tmp_path / "bad.jsonl")


def test_resume_refuses_a_file_of_another_run(tiny, tmp_path):
    m, tok = tiny
    out = tmp_path / "x.jsonl"
    search_examples(m, tok, toy_examples(2), out, cfg=MCTSConfig(simulations=4), seed=0, progress=False)
    with pytest.raises(ValueError, match="another run"):
        search_examples(m, tok, toy_examples(2), out, cfg=MCTSConfig(simulations=4), seed=1, progress=False)


def test_killed_search_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    """A worker process (same model, examples, seed and settings as below) is SIGKILLed mid-run; resuming
    completes the file, which then equals an uninterrupted run."""
    m, tok = tiny
    n = 6
    cfg = MCTSConfig(simulations=12, batch=4)  # as in tests/search_worker.py
    full, killed = tmp_path / "full.jsonl", tmp_path / "killed.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "search_worker.py"), str(killed), str(n), "0.3"],
                            env=env)
    ref = search_examples(m, tok, toy_examples(n), full, cfg=cfg, budget=1.0, seed=7, progress=False, task="toy")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and len(read_records(killed)) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_records(killed)
    assert 2 <= len(partial) < n, "the kill must land mid-run"
    with open(killed, "a") as f:  # and a torn half-written record, as a kill inside write() leaves
        f.write('{"index": 99, "id": "torn')
    resumed = search_examples(m, tok, toy_examples(n), killed, cfg=cfg, budget=1.0, seed=7, progress=False,
                              task="toy")
    assert killed.read_text().count("\n") == n
    assert read_records(killed)[: len(partial)] == partial  # nothing rewritten
    assert _strip_time(read_records(killed)) == _strip_time(resumed) == _strip_time(ref)
    assert len({r["index"] for r in resumed}) == n


# ----------------------------------------------------------------------------------------- optuna
def test_optuna_static_plan_study_in_sqlite(tiny, tmp_path):
    from retrofit.search.optuna_study import evaluate_static_plan, static_plan_study

    m, tok = tiny
    exs = toy_examples(4)
    db = f"sqlite:///{tmp_path}/opt.db"
    res = static_plan_study(m, tok, exs, budget=1.0, n_trials=8, storage=db, study_name="t", seed=0)
    assert res["n_trials"] == 8 and (tmp_path / "opt.db").exists()
    ev = PlanEvaluator(m, tok)
    assert res["base_acc"] == evaluate_static_plan(ev, exs, ("execute",) * 4)
    assert res["best_acc"] >= res["base_acc"]
    assert res["best_compute"] <= 4 and evaluate_static_plan(ev, exs, res["best_plan"]) == res["best_acc"]
    again = static_plan_study(m, tok, exs, budget=1.0, n_trials=2, storage=db, study_name="t", seed=0)
    assert again["n_trials"] == 10  # the study resumes from storage


def test_generic_objective_hook(tmp_path):
    from retrofit.search.optuna_study import run_study

    study = run_study(lambda t: -(t.suggest_float("lr", 1e-4, 1e-1, log=True) - 0.01) ** 2, study_name="hp",
                      storage=str(tmp_path / "hp.db"), n_trials=8, seed=0)
    assert len(study.trials) == 8 and 1e-4 <= study.best_params["lr"] <= 1e-1


# ----------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_packed_scores_equal_full_forwards(smollm2, shared_data, monkeypatch):
    from retrofit.search.tasks import load_task

    monkeypatch.setenv("RETROFIT_DATA", str(shared_data))
    m, tok = smollm2
    ex = load_task("arc_easy", "train", limit=1)[0]
    L = m.config.num_hidden_layers
    plans = [("execute",) * L, ("skip",) * 3 + ("execute",) * (L - 4) + ("repeat",)]
    ev = PlanEvaluator(m, tok)
    ev.set_example(ex)
    for p, r in zip(plans, ev.evaluate(plans)):
        assert r.scores == pytest.approx(naive_scores(m, tok, ex, p), abs=2e-3)
    # lm-eval's acc on this question with the full model is wrong (answer 3 of 4), which the search fixes
    assert ev.evaluate(plans[:1])[0].pred == 3 and ex.gold == 1


def test_generative_examples_decode_greedily_under_the_plan(tiny):
    m, tok = tiny
    ex = Example("g/0", "Question: 1+1?\nAnswer:", [], "2", kind="gen")
    ev = PlanEvaluator(m, tok, max_new_tokens=6)
    ev.set_example(ex)
    plan = ("execute", "skip", "repeat", "execute")
    r = ev.evaluate([plan])[0]
    ids = tok(ex.prompt)["input_ids"]
    for _ in range(6):  # reference: greedy decoding by hand with full forwards of the plan
        nxt = int(ev.run_plan(torch.tensor([ids]), plan)[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
        if "\n\n" in tok.decode(ids[len(tok(ex.prompt)["input_ids"]):]):
            break
    want = tok.decode(ids[len(tok(ex.prompt)["input_ids"]):]).split("\n\n")[0].split("Question:")[0]
    assert r.text == want
    assert r.correct == (r.pred is not None and float(r.pred) == 2.0)


# ----------------------------------------------------------------------------------------- Dr.LLM's path tree
def _safe_oracle(safe):
    """Correct iff every skipped layer is in ``safe`` (and nothing is repeated): the best plan skips ``safe``."""
    return lambda p: all(a == "execute" or (a == "skip" and i in safe) for i, a in enumerate(p))


def test_path_tree_finds_late_changes_as_easily_as_early_ones():
    # mirrored problems: the only skippable layers are the first four, or the last four, of 20. The prefix tree
    # decides layer 0 first and leaves late layers to its rollout; the path tree edits every layer alike.
    L, seeds = 20, range(12)

    def saved(safe, tree):
        return [L - mcts_search(_oracle(_safe_oracle(safe), []), L, MCTSConfig(simulations=50, tree=tree),
                                random.Random(s)).compute for s in seeds]

    first, last = saved(set(range(4)), "path"), saved(set(range(L - 4, L)), "path")
    assert sum(first) / len(seeds) >= 2 and sum(last) / len(seeds) >= 2
    assert abs(sum(first) - sum(last)) <= 0.25 * max(sum(first), sum(last))
    prefix_last = saved(set(range(L - 4, L)), "prefix")
    assert sum(last) > 2 * sum(prefix_last)


def test_path_tree_nodes_are_whole_plans_near_the_base_plan():
    calls = []
    res = mcts_search(_oracle(lambda p: False, calls), 10, MCTSConfig(simulations=30, batch=1), random.Random(0))
    plans = [p for c in calls for p in c]
    assert plans[0] == ("execute",) * 10 and len(plans) == len(set(plans)) == 31
    # every node is one Dr.LLM edit of a plan evaluated before it (its parent), anywhere in the plan
    from retrofit.search.mcts import _path_apply, _path_moves

    for k, p in enumerate(plans[1:], 1):
        assert any(p == _path_apply(q, m) for q in plans[:k] for m in _path_moves(q, 10, True)), p
    first_change = {min(i for i, a in enumerate(p) if a != "execute") for p in plans[1:]}
    assert min(first_change) < 3 and max(first_change) > 6  # edits land early and late alike
    assert res.simulations == 30 and res.good_plans == []
    with pytest.raises(ValueError, match="tree"):
        MCTSConfig(tree="chain")


def test_path_tree_respects_the_budget_when_repeating():
    seen = []
    mcts_search(_oracle(lambda p: seen.append(p) or False, []), 6, MCTSConfig(simulations=80), random.Random(0),
                budget=6)
    assert any("repeat" in p for p in seen)  # a repeat after a skip
    assert all(plan_passes(p) <= 6 for p in seen)


# ----------------------------------------------------------------------------------------- the reward rule
def _res(scores, gold):
    from retrofit.search.evaluator import PlanResult

    pred = max(range(len(scores)), key=scores.__getitem__)
    return PlanResult(("execute",), pred, pred == gold, scores, gold=gold)


def test_confident_reward_refuses_a_lucky_low_confidence_win():
    import math

    from retrofit.search.reward import RewardRule, gold_probability

    rule = RewardRule()  # gold must win with p >= 0.5 and lose at most 0.1 of the base plan's p
    lg = math.log
    base = _res([lg(0.7), lg(0.1), lg(0.1), lg(0.1)], 0)
    lucky = _res([lg(0.3), lg(0.25), lg(0.25), lg(0.2)], 0)  # gold wins, but barely: a guess
    sure = _res([lg(0.65), lg(0.15), lg(0.1), lg(0.1)], 0)
    worse = _res([lg(0.55), lg(0.25), lg(0.1), lg(0.1)], 0)  # p 0.55 >= 0.5 but 0.15 below the base's 0.7
    wrong = _res([lg(0.2), lg(0.6), lg(0.1), lg(0.1)], 0)
    assert abs(gold_probability(lucky.scores, 0) - 0.3) < 1e-9
    assert lucky.correct and not rule.correct(lucky, base)
    assert rule.correct(sure, base) and not rule.correct(worse, base) and not rule.correct(wrong, base)
    assert RewardRule(kind="binary").correct(lucky, base)
    # a wrong base plan: by default no plan earns the reward there (a flip is mostly luck on a near-chance model);
    # with flips=True a plan that flips the answer must itself be sure
    base_wrong = _res([lg(0.2), lg(0.6), lg(0.1), lg(0.1)], 0)
    assert not rule.searchable(base_wrong) and rule.searchable(base)
    assert not rule.correct(sure, base_wrong)
    flips = RewardRule(flips=True)
    assert flips.searchable(base_wrong) and flips.correct(sure, base_wrong) and not flips.correct(lucky, base_wrong)
    for bad in (dict(kind="margin"), dict(min_prob=1.5), dict(max_drop=True)):
        with pytest.raises(ValueError):
            RewardRule(**bad)
    with pytest.raises(FloatingPointError):
        gold_probability([float("nan"), 0.0], 0)


def test_resume_refuses_changed_search_or_reward_settings(tiny, tmp_path):
    from retrofit.search.reward import RewardRule

    m, tok = tiny
    exs = toy_examples(3)
    out = tmp_path / "r.jsonl"
    search_examples(m, tok, exs, out, cfg=MCTSConfig(simulations=8), progress=False, stop_after=1)
    for kw in (dict(cfg=MCTSConfig(simulations=8, c=1.0)), dict(cfg=MCTSConfig(simulations=8, tree="prefix")),
               dict(cfg=MCTSConfig(simulations=8), reward=RewardRule(kind="binary"))):
        with pytest.raises(ValueError, match="another run"):
            search_examples(m, tok, exs, out, progress=False, **kw)
    recs = search_examples(m, tok, exs, out, cfg=MCTSConfig(simulations=8), progress=False)
    assert len(recs) == 3 and len(read_records(out)) == 3
    assert all(r["reward"] in (0.0, 1.0) and "good_plans" in r and "base_gold_prob" in r for r in recs)
    # a question the base plan gets wrong is not searched under the default (no-flip) rule
    for r in recs:
        assert (r["stats"]["configs"] == 1) == (not r["base_correct"])
        assert r["found"] <= r["base_correct"]
