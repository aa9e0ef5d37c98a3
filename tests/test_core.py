"""retrofit.core: plans, data helpers and hooks, each defined once and used everywhere."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from retrofit.core import data as D
from retrofit.core import hooks as H
from retrofit.core import plans as P
from retrofit.testing import tiny_model
from retrofit.testing.search_toys import CharTokenizer


# --------------------------------------------------------------------------------------------------- plans
def test_plan_parsing_validation_and_cost(tmp_path):
    assert P.parse_plan("eSr") == ["execute", "skip", "repeat"]
    assert P.parse_plan(["skip", 1, 2]) == ["skip", "execute", "repeat"]
    assert P.parse_plan('["skip", "execute"]') == ["skip", "execute"]
    assert P.parse_plan(None) is None
    with pytest.raises(ValueError, match="one letter per layer"):
        P.parse_plan("exq")
    with pytest.raises(ValueError, match="3 entries but the model has 4 decoder layers"):
        P.parse_plan("eee", 4)
    with pytest.raises(ValueError, match="allow_repeat"):
        P.parse_plan("er", allow_repeat=False)
    with pytest.raises(ValueError, match="unknown plan actions"):
        P.validate_plan(["execute", "jump"])
    with pytest.raises(ValueError, match="a plan is a list"):
        P.validate_plan("ee")
    f = tmp_path / "plan.json"
    f.write_text(json.dumps({"plan": ["skip", "execute"]}))
    assert P.parse_plan(str(f), allow_files=True) == ["skip", "execute"]
    art = tmp_path / "art"
    art.mkdir()
    (art / "retrofit.json").write_text(json.dumps({"config": {"plan": ["execute", "skip"]}}))
    assert P.parse_plan(art, allow_files=True) == ["execute", "skip"]
    with pytest.raises(ValueError):  # request arguments never read files
        P.parse_plan(str(f))
    plan = ["skip", "execute", "repeat", "execute"]
    assert P.plan_passes(plan) == 4 and P.plan_fraction(plan) == 1.0 and P.plan_unique_layers(plan) == 3
    assert P.plan_codes(plan) == [0, 1, 2, 1] and P.plan_letters(plan) == "sere"
    assert [P.action_passes(a) for a in P.ACTIONS] == [P.SKIP, P.EXECUTE, P.REPEAT] == [0, 1, 2]


# --------------------------------------------------------------------------------------------------- data
def test_data_dir_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROFIT_DATA", str(tmp_path))
    assert D.data_dir() == tmp_path.resolve()
    assert D.data_dir(tmp_path / "x") == (tmp_path / "x").resolve()  # an explicit folder wins
    monkeypatch.delenv("RETROFIT_DATA")
    assert D.data_dir().name == "data" and D.data_dir().parent.name == "shared"


def test_search_records_torn_line_repair_and_gzip(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"prompt": "a", "plan": ["execute"]}\n{"prompt": "b", "pl')
    assert [r["prompt"] for r in D.read_search_records(p)] == ["a"]
    assert p.read_text().endswith("pl")  # not repaired unless asked
    D.read_search_records(p, repair=True)
    assert p.read_text() == '{"prompt": "a", "plan": ["execute"]}\n'
    z = tmp_path / "s.jsonl.gz"
    z.write_bytes(gzip.compress(b'{"prompt": "a", "plan": ["skip"]}\n{"prompt": "b", "plan": ["execute"]}'))
    assert [r["plan"] for r in D.read_searches([z])] == [["skip"], ["execute"]]
    assert D.read_search_records(tmp_path / "missing.jsonl") == []
    with pytest.raises(FileNotFoundError):
        D.read_searches([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "plan": ["execute"]}\n\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: record lacks \['plan'\]"):
        D.read_searches([bad])


def test_tokenize_pad_and_continuation_scores_match_a_full_forward():
    tok = CharTokenizer()
    model = tiny_model("llama", vocab_size=tok.vocab_size)
    pairs = [("Question: ab\nAnswer:", " cd"), ("Question: abc \nAnswer: ", "x"), ("q", " yz")]
    reqs = [D.tokenize_request(tok, c, x) for c, x in pairs]
    assert reqs[1][1][0] == tok(" ", add_special_tokens=False)["input_ids"][0]  # trailing space moved over
    ids, mask = D.pad_right([c + x for c, x in reqs], pad=0)
    assert ids.shape == mask.shape and mask.sum(1).tolist() == [len(c) + len(x) for c, x in reqs]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    want = []
    for b, (c, x) in enumerate(reqs):
        lp = torch.log_softmax(logits[b].float(), -1)
        want.append(sum(float(lp[len(c) + k - 1, t]) for k, t in enumerate(x)))
    got = [float(v.sum()) for v in D.continuation_logprobs(logits, reqs)]
    assert got == pytest.approx(want, abs=1e-5)
    assert D.score_continuations(model, tok, pairs, batch=2) == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------------------------------- hooks
def test_request_tracker_by_cache_identity():
    class Out:
        def __init__(self, pkv):
            self.past_key_values = pkv

    class Cache:
        pass

    t = H.RequestTracker()
    a, b = Cache(), Cache()
    assert t.start(a) and t.finish() and not t.start(a) and not t.finish()  # prefill, then a decode step
    assert t.start(b)  # another cache: another request
    assert t.start(None)  # no cache: always new ...
    t.finish(Out(a))  # ... and a cache made inside the forward is adopted
    assert not t.start(a)
    assert t.start(a, force=True)
    t.reset()
    assert t.start(a)
    # a forward that started a request and raised (no finish) leaves no request: the retry on the same cache
    # starts a new one instead of passing for its decode step
    t = H.RequestTracker()
    assert t.start(a) and t.start(a) and t.finish() and not t.start(a)


def test_patch_forward_restores_exactly_and_snapshot_rolls_back():
    m = torch.nn.Linear(2, 2)
    before = H.ModelSnapshot(m)
    p = H.patch_forward(m, lambda x: x * 0)
    assert "forward" in m.__dict__ and float(m(torch.ones(1, 2)).abs().sum()) == 0
    p.restore()
    p.restore()  # idempotent
    assert "forward" not in m.__dict__
    own = lambda x: x + 1  # an instance forward someone else put there stays
    m.forward = own
    q = H.patch_forward(m, lambda self, x: self.weight.sum() * x, bind=True)
    assert q.original is own
    q.restore()
    assert m.forward is own
    del m.forward
    assert before.changes() == []
    m.requires_grad_(False)
    m.register_forward_pre_hook(lambda mod, args: None)
    H.patch_forward(m, lambda x: x)
    m.extra_attr = 1
    assert before.changes()
    before.restore()
    assert before.changes() == [] and "forward" not in m.__dict__ and not hasattr(m, "extra_attr")
    assert all(p.requires_grad for p in m.parameters()) and not m._forward_pre_hooks


def test_snapshot_names_each_kind_of_change_and_restores_each_exactly():
    """Every kind of change attach() could make is named with its module, and restore() undoes exactly it."""
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    m[0].register_forward_hook(lambda *a: None)  # a hook that was there before stays
    lin, w, keep = m[0], m[0].weight, dict(m[0].__dict__)
    snap = H.ModelSnapshot(m)
    assert snap.changes() == []
    other = torch.nn.Linear(2, 2)
    edits = {
        "grad": (lambda: w.requires_grad_(False), ["requires_grad"]),
        "added": (lambda: setattr(lin, "extra", 1), ["0: added ['extra'], changed [], hooks []"]),
        "changed": (lambda: setattr(lin, "in_features", 3), ["0: added [], changed ['in_features'], hooks []"]),
        "root": (lambda: setattr(m, "note", "x"), ["<model>: added ['note'], changed [], hooks []"]),
        "hook": (lambda: lin.register_forward_pre_hook(lambda *a: None),
                 ["0: added [], changed [], hooks ['_forward_pre_hooks']"]),
        "param": (lambda: setattr(lin, "weight", torch.nn.Parameter(torch.zeros(2, 2))), ["0: parameters changed"]),
        "buffer": (lambda: lin.register_buffer("scale", torch.ones(1)), ["0: buffers changed"]),
        "child": (lambda: m.__setitem__(1, other), ["<model>: modules changed"]),
    }
    for name, (edit, want) in edits.items():
        edit()
        assert snap.changes() == want, name
        snap.restore()
        assert snap.changes() == [], name
        assert m[0] is lin and m[0].weight is w and w.requires_grad and m[1] is not other, name
        assert lin.__dict__.keys() == keep.keys() and all(lin.__dict__[k] is v for k, v in keep.items()), name
        assert len(lin._forward_hooks) == 1 and not lin._forward_pre_hooks and "scale" not in lin._buffers, name
