"""A resumed search is a resume, not a deterministic re-run (issue 15, weak tests).

The kill-and-resume test in test_search.py compares the finished file with an uninterrupted run; a search that
ignored the file and searched everything again (deterministically) would pass that comparison. Here the resumed
run must search only the examples that are missing and leave the lines already written byte for byte.
"""

import json

from retrofit.search.evaluator import PlanEvaluator
from retrofit.search.mcts import MCTSConfig
from retrofit.search.run import search_examples
from retrofit.testing import tiny_model
from retrofit.testing.search_toys import CharTokenizer, toy_examples


def _strip_seconds(recs):
    recs = json.loads(json.dumps(recs))
    for r in recs:
        r["stats"].pop("seconds", None)
    return recs


def test_resume_searches_only_the_missing_examples(tmp_path):
    m = tiny_model("llama", seed=0, initializer_range=0.5)
    tok = CharTokenizer(m.config.vocab_size)
    exs = toy_examples(5)
    cfg = MCTSConfig(simulations=8, batch=4)
    kw = dict(cfg=cfg, budget=1.0, seed=3, progress=False, task="toy")
    out = tmp_path / "s.jsonl"
    first = search_examples(m, tok, exs, out, stop_after=2, **kw)  # as if killed after two examples
    assert [r["index"] for r in first] == [0, 1]
    written = out.read_text()
    ev = PlanEvaluator(m, tok)
    seen = []
    orig = ev.set_example

    def counting(ex):
        seen.append(ex.id)
        return orig(ex)

    ev.set_example = counting
    resumed = search_examples(m, tok, exs, out, evaluator=ev, **kw)
    assert seen == [ex.id for ex in exs[2:]]  # only the three missing examples were searched
    assert out.read_text().startswith(written)  # the two finished lines are untouched (timings included)
    assert [r["index"] for r in resumed] == list(range(5)) and out.read_text().count("\n") == 5
    seen.clear()
    again = search_examples(m, tok, exs, out, evaluator=ev, **kw)  # nothing left to do
    assert seen == [] and again == resumed
    ref = search_examples(m, tok, exs, tmp_path / "ref.jsonl", **kw)
    assert _strip_seconds(resumed) == _strip_seconds(ref)
