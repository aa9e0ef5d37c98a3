"""The repeat probe (:mod:`retrofit.search.repeats`) and the repeat layers it gives task routers."""

import json
import re

import pytest
import torch

from retrofit.methods.drllm.train import TrainConfig, passes_fraction, task_centers, train_from_searches
from retrofit.search.evaluator import PlanEvaluator
from retrofit.search.repeats import KIND, probe_repeats, read_probe, repeat_layers
from retrofit.search.reward import gold_probability
from retrofit.testing import tiny_model
from retrofit.testing.search_toys import CharTokenizer, toy_examples

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tok(CharTokenizer):
    """CharTokenizer that also answers ``return_tensors="pt"`` (router training reads prompts that way)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        d = super().__call__(text, add_special_tokens)
        if return_tensors == "pt":
            return type("E", (), {"input_ids": torch.tensor([d["input_ids"]])})()
        return d


def _probe(task, base, rep, i):
    """A hand-made probe record: base correctness, per-layer (correct, gold prob) of each repeat."""
    return {"index": i, "id": f"q{i}", "task": task, "kind": KIND, "num_layers": len(rep),
            "base_correct": base, "base_gold_prob": 0.5,
            "repeat_correct": [c for c, _ in rep], "repeat_gold_prob": [p for _, p in rep]}


def _records(n=200, L=4, seed=0):
    """Layer 1's repeat turns a third of the wrong answers right (and raises the gold probability); layer 2 flips
    answers both ways at random (no gain); layer 3 gains a little accuracy but lowers the gold probability."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        base = bool(i % 2)
        u = torch.rand(3, generator=g).tolist()
        rep = [(base, 0.5),
               (base or u[0] < 0.34, 0.6),
               (not base if u[1] < 0.2 else base, 0.5),
               (base or u[2] < 0.3, 0.4)]
        out.append(_probe("mc", base, rep, i))
    return out


def test_repeat_layers_keep_a_clear_gain_and_refuse_noise_and_a_falling_gold_probability():
    rep = repeat_layers(_records(), 4)
    v = rep["mc"]
    assert v["layers"] == [1]
    assert v["n"] == 200
    assert v["gain"][0] == 0.0 and v["se"][0] == 0.0
    assert v["gain"][1] > 3 * v["se"][1] > 0
    assert abs(v["gain"][2]) < 3 * v["se"][2]  # random flips both ways
    assert v["gain"][3] > 3 * v["se"][3] and v["prob_gain"][3] < 0  # more right answers, less sure of them
    assert v["prob_gain"][1] == pytest.approx(0.1)
    # z = 0 lets layer 2 through only if its mean happens to be positive; max_repeats caps the count
    assert repeat_layers(_records(), 4, z=0.0, max_repeats=1)["mc"]["layers"] == [1]
    assert repeat_layers(_records(), 4, max_repeats=0)["mc"]["layers"] == []


def test_repeat_layers_refuse_too_few_questions_wrong_depths_and_other_records():
    with pytest.raises(ValueError, match="fewer than 30; probe more"):
        repeat_layers(_records(n=10), 4)
    with pytest.raises(ValueError, match="a probe of 4 layers, the model has 5"):
        repeat_layers(_records(), 5)
    with pytest.raises(ValueError, match="not a repeat probe"):
        repeat_layers([{"id": "x", "kind": "lm"}], 4)


def test_task_centres_repeat_the_probed_layers_at_every_budget():
    L = 6
    recs = [{"id": i, "task": "mc", "prompt": "p", "found": True,
             "plan": ["skip" if j in (2, 3) else "execute" for j in range(L)]} for i in range(3)]
    names, centers, _ = task_centers(recs, L, {"mc": [4]})
    assert centers[0, 4, 2] == L / 2 and centers[0, :4, 2].tolist() == [-float(L)] * 4
    for b, skips in ((-1.0, []), (0.5, [2]), (1.5, [2, 3])):
        acts = (centers[0] + torch.tensor([b, 0.0, 0.0])).argmax(-1)
        assert (acts == 0).nonzero().flatten().tolist() == skips
        assert (acts == 2).nonzero().flatten().tolist() == [4]
        assert passes_fraction(acts) == pytest.approx((L - len(skips) + 1) / L)
    with pytest.raises(ValueError, match="which no training record has"):
        task_centers(recs, L, {"text": [1]})
    with pytest.raises(ValueError, match="outside the model's 6 layers"):
        task_centers(recs, L, {"mc": [6]})


def test_probe_scores_equal_the_evaluator_and_a_killed_probe_resumes_to_the_same_file(tmp_path):
    m = tiny_model("llama", seed=0, initializer_range=0.5)
    tok = CharTokenizer(m.config.vocab_size)
    exs = toy_examples(5)
    full = probe_repeats(m, tok, exs, tmp_path / "full.jsonl", task="toy", progress=False)
    part = tmp_path / "part.jsonl"
    assert len(probe_repeats(m, tok, exs, part, task="toy", progress=False, stop_after=2)) == 2
    again = probe_repeats(m, tok, exs, part, task="toy", progress=False)
    assert again == full == read_probe(part)
    assert part.read_text() == (tmp_path / "full.jsonl").read_text()
    ev = PlanEvaluator(m, tok)
    L = ev.L
    changed = 0
    for ex, r in zip(exs, full):
        ev.set_example(ex)
        for i in (0, L - 1):
            plan = ["execute"] * L
            plan[i] = "repeat"
            res = ev.evaluate([tuple(plan)])[0]
            assert r["repeat_gold_prob"][i] == pytest.approx(gold_probability(res.scores, res.gold), abs=1e-5)
            assert r["repeat_correct"][i] == bool(res.correct)
            changed += r["repeat_gold_prob"][i] != r["base_gold_prob"]
    assert changed > 0  # the repeats do change the scores: the probe is not reading the base plan twice
    # the same file with other data or another depth is refused
    other = [type(e)(**{**e.__dict__, "id": e.id + "x"}) for e in exs]
    with pytest.raises(ValueError, match="belongs to other data"):
        probe_repeats(m, tok, other, part, progress=False)
    with pytest.raises(ValueError, match="plain JSONL"):
        probe_repeats(m, tok, exs, tmp_path / "p.jsonl.gz", progress=False)
    (tmp_path / "lm.jsonl").write_text(json.dumps({"id": "w", "kind": "lm"}) + "\n")
    with pytest.raises(ValueError, match="not a repeat probe"):
        read_probe(tmp_path / "lm.jsonl")


def test_task_routers_repeat_the_probed_layer_and_other_targets_refuse_probes(tmp_path):
    m = tiny_model("llama", seed=0, num_hidden_layers=4)
    tok = _Tok(m.config.vocab_size)
    L = 4
    search = tmp_path / "search.jsonl"
    with open(search, "w") as f:
        for i in range(30):
            f.write(json.dumps({"id": i, "task": "mc", "prompt": f"question {i} ?", "found": True,
                                "plan": ["skip" if j == 2 else "execute" for j in range(L)]}) + "\n")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(r) + "\n" for r in _records(n=60, L=L)))
    rep = train_from_searches(m, tok, [search], tmp_path / "r", TrainConfig(target="task", layer_fraction=1.0),
                              progress=False, repeat_probes=[probe])
    assert rep["repeats"]["mc"]["layers"] == [1]
    # one skip (layer 2) and one repeat (layer 1): all four passes, the budget asked for
    assert rep["calibrated"]["layer_fraction"] == 1.0
    assert rep["plans_equal_task_center"] == 1.0
    import retrofit

    h = retrofit.load(m, tmp_path / "r")
    try:
        m(input_ids=torch.tensor([tok("question 99 ?")["input_ids"]]), use_cache=False)
        assert h.last_plans[0] == ["execute", "repeat", "skip", "execute"]
    finally:
        h.detach()
    with pytest.raises(ValueError, match="target='task' only"):
        train_from_searches(m, tok, [search], tmp_path / "s", TrainConfig(target="safety"), progress=False,
                            repeat_probes=[probe])


def test_cli_search_repeats_refuses_the_test_split_and_train_refuses_probes_for_other_targets(tmp_path):
    from typer.testing import CliRunner

    from retrofit.cli import app

    r = CliRunner().invoke(app, ["search-repeats", "--task", "arc_easy", "--split", "test",
                                 "--out", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 2 and "probe training or validation data" in r.output
    assert not (tmp_path / "p.jsonl").exists()
    search = tmp_path / "s.jsonl"
    search.write_text(json.dumps({"id": 0, "prompt": "p", "plan": ["execute"] * 4, "found": True}) + "\n")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(r) + "\n" for r in _records(n=40)))
    r = CliRunner().invoke(app, ["train", "--searches", str(search), "--out", str(tmp_path / "r"),
                                 "--target", "safety", "--repeat-probes", str(probe)])
    assert r.exit_code == 2 and "--target task only" in r.output
    r = CliRunner().invoke(app, ["train", "--searches", str(search), "--out", str(tmp_path / "r"),
                                 "--target", "task", "--repeat-probes", str(tmp_path / "missing.jsonl")])
    text = re.sub(r"[│╭╮╰╯─\s]+", " ", r.output)
    assert r.exit_code == 2 and "not found (write it with `retrofit search-repeats`)" in text
