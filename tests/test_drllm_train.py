import json
import math

import pytest
import torch

import retrofit
from retrofit.artifacts import fingerprint
from retrofit.methods.drllm.train import TrainConfig, class_weights, focal_loss, read_searches, train_from_searches
from retrofit.testing import tiny_model


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    w = torch.tensor([0.5, 1.0, 2.0])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = 1 / (1 + math.e + 1)
    expected = (-0.5 * (1 - p0) ** 2 * math.log(p0) - 2.0 * (1 - p1) ** 2 * math.log(p1)) / 2
    assert focal_loss(logits, target, w, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    # gamma 0 and no weights is plain cross-entropy
    assert focal_loss(logits, target, None, gamma=0.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-6)


def test_class_weights_effective_numbers():
    counts = torch.tensor([10, 1000, 0])
    beta = 0.999
    e = [(1 - beta ** 10) / (1 - beta), (1 - beta ** 1000) / (1 - beta)]
    raw = [1 / e[0], 1 / e[1]]
    expected = [2 * raw[0] / sum(raw), 2 * raw[1] / sum(raw), 0.0]
    torch.testing.assert_close(class_weights(counts, beta), torch.tensor(expected))
    assert class_weights(counts, beta)[0] > class_weights(counts, beta)[1]  # rare class weighs more


def _fake_search_file(path, n, L, vocab=128, seed=0):
    """Plans that depend on the prompt (its first token is 5 or 6): learnable by construction."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            toks = torch.randint(7, vocab, (12,), generator=g).tolist()
            toks[0] = 5 + i % 2
            plan = ["execute"] * L
            if toks[0] == 5:
                plan[1] = "skip"
            else:
                plan[2] = "repeat"
            f.write(json.dumps({"id": i, "prompt": " ".join(f"t{t}" for t in toks), "plan": plan, "correct": True}) + "\n")


class _Tok:
    """Whitespace tokenizer over 't<id>' words, enough for the tiny model."""

    def __call__(self, text, return_tensors="pt"):
        ids = [int(w[1:]) for w in text.split()]
        return type("E", (), {"input_ids": torch.tensor([ids])})()


def test_training_reduces_loss_and_keeps_base_frozen(tmp_path):
    model = tiny_model("llama")
    _fake_search_file(tmp_path / "s.jsonl", 64, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=40, lr=1e-2, patience=40, val_fraction=0.0, warmup_steps=5)
    rep = train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "r", cfg, num_windows=4,
                              bottleneck=32, progress=False)
    hist = rep["history"]
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["train_acc"] > 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The saved routers reproduce the learned decisions on the model.
    h = retrofit.load(model, tmp_path / "r")
    recs = read_searches([tmp_path / "s.jsonl"])
    hits = 0
    for r in recs[:16]:
        with torch.no_grad():
            model(_Tok()(r["prompt"]).input_ids)
        hits += h.last_plans[0] == r["plan"]
    assert hits >= 14
    assert json.loads((tmp_path / "r" / "training_report.json").read_text())["examples"] == 64


def test_malformed_search_records_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "plan": ["execute"]}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_searches([p])
    p.write_text('{"prompt": "a", "plan": ["fly"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: plan holds actions"):
        read_searches([p])
    with pytest.raises(ValueError, match="invalid training option"):
        TrainConfig(lr=-1)


def test_soft_focal_loss_equals_the_hard_one_on_one_hot_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g)
    target = torch.randint(0, 3, (7,), generator=g)
    w = torch.tensor([0.7, 1.0, 3.0])
    hard = focal_loss(logits, target, w, gamma=2.0)
    soft = focal_loss(logits, torch.nn.functional.one_hot(target, 3).float(), w, gamma=2.0)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-6)
    # a 50/50 target is the mean of the two one-hot losses
    half = torch.tensor([[0.5, 0.5, 0.0]])
    both = [focal_loss(logits[:1], torch.tensor([c]), None, 2.0).item() for c in (0, 1)]
    assert focal_loss(logits[:1], half, None, 2.0).item() == pytest.approx(sum(both) / 2, rel=1e-6)


def test_safety_and_soft_targets_read_the_searched_plans():
    from retrofit.methods.drllm.train import safety_targets, soft_targets

    # 4 layers; skipping layer 1 or 2 keeps the answer, skipping layer 0 or 3 never does
    evaluated = [["eeee", 0.9, True], ["esee", 0.9, True], ["eese", 0.8, True], ["esse", 0.7, True],
                 ["seee", 0.1, False], ["eees", 0.2, False], ["sese", 0.1, False]]
    rec = {"id": "q", "plan": ["execute", "skip", "skip", "execute"], "evaluated": evaluated,
           "good_plans": ["eeee", "esee", "eese", "esse"]}
    s = safety_targets(rec, 4)
    m = 3 / 6  # rewarded share of the edited plans (the prior)
    assert s[1, 0].item() == pytest.approx((2 + 2 * m) / (2 + 2))  # esee, esse skip layer 1: both rewarded
    assert s[0, 0].item() == pytest.approx((0 + 2 * m) / (2 + 2))  # seee, sese: neither
    assert s[3, 0].item() == pytest.approx((0 + 2 * m) / (1 + 2))
    assert s[1, 0] > s[3, 0] > s[0, 0] and torch.allclose(s.sum(-1), torch.ones(4)) and (s[:, 2] == 0).all()
    soft = soft_targets(rec, 4)
    assert soft[:, 0].tolist() == [0.0, 0.5, 0.5, 0.0] and torch.allclose(soft.sum(-1), torch.ones(4))
    # a record without rewarded plans is taught its own plan
    bare = {"id": "r", "plan": ["execute"] * 4, "evaluated": [["eeee", 0.1, False]], "good_plans": []}
    assert safety_targets(bare, 4)[:, 1].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="target"):
        TrainConfig(target="longest")
    with pytest.raises(ValueError, match="unlabeled"):
        TrainConfig(unlabeled="keep")


def test_unlabeled_questions_are_dropped_or_taught_to_execute(tmp_path):
    model = tiny_model("llama")
    _fake_search_file(tmp_path / "s.jsonl", 16, 4)
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    for i, r in enumerate(lines):  # half the questions have no rewarded plan
        r["found"] = i % 4 != 0
        if not r["found"]:
            r["plan"] = ["skip"] * 4  # must never be taught
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = dict(epochs=1, val_fraction=0.0, warmup_steps=1)
    drop = train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "a", TrainConfig(**cfg),
                               num_windows=4, bottleneck=8, progress=False)
    keep = train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "b",
                               TrainConfig(unlabeled="execute", **cfg), num_windows=4, bottleneck=8, progress=False)
    assert drop["examples"] == 12 and keep["examples"] == 16
    assert keep["label_counts"]["execute"] == drop["label_counts"]["execute"] + 4 * 4
    assert drop["label_counts"]["skip"] == keep["label_counts"]["skip"]


def test_shrink_pulls_logits_toward_their_mean_exactly():
    from retrofit.methods.drllm.router import RouterBank
    from retrofit.methods.drllm.train import shrink_routers

    torch.manual_seed(0)
    L, W, d = 3, 4, 16
    feats = torch.randn(20, L, W, d)
    valid = torch.ones(20, L, W, dtype=torch.bool)
    valid[:5, :, 2:] = False  # short prompts: fewer valid windows
    bank = RouterBank(L, d, bottleneck=8)
    for p in bank.parameters():  # non-zero biases too
        torch.nn.init.normal_(p)
    with torch.no_grad():
        before = bank(feats, valid)
        mean = before.mean(0)
        for alpha in (0.0, 0.3, 1.0):
            b = RouterBank(L, d, bottleneck=8)
            b.load_state_dict(bank.state_dict())
            got_mean = shrink_routers(b, feats, valid, alpha)
            after = b(feats, valid)
            assert torch.allclose(got_mean, mean, atol=1e-5)
            assert torch.allclose(after, mean + alpha * (before - mean), atol=1e-5)
        assert (before.std(0) > 0.1).all()  # the routers did react per example before the shrink
        center = torch.randn(L, 3)
        b = RouterBank(L, d, bottleneck=8)
        b.load_state_dict(bank.state_dict())
        shrink_routers(b, feats, valid, 0.25, center)
        assert torch.allclose(b(feats, valid), center + 0.25 * (before - mean), atol=1e-5)
    with pytest.raises(ValueError, match="shrink"):
        shrink_routers(bank, feats, valid, 1.5)
    with pytest.raises(ValueError, match="shrink"):
        TrainConfig(shrink=-0.1)
    with pytest.raises(ValueError, match="center"):
        TrainConfig(center="mean")


def test_label_center_at_shrink_zero_gives_the_labels_voted_plan():
    from retrofit.methods.drllm.train import label_center
    from retrofit.search.diagnostics import label_shares, voted_plan

    recs = [{"plan": ["skip" if i in s else "execute" for i in range(5)]} for s in
            ({1, 3}, {3}, {3, 4}, {1}, {3, 0})]
    c = label_center(recs, 5)
    assert torch.allclose(c[:, :2].exp().sum(-1), torch.ones(5), atol=1e-3)  # skip share and its complement
    assert c[3, 0] > c[1, 0] > c[0, 0] > c[4, 0] > c[2, 0]  # skip shares 4/5, 2/5, 1/5, 1/5 (tie: lower first), 0
    # every budget is reachable: k = 3 skips layers 3, 1 and 0 (not 4 with it), as the voted plan does
    gap = (c[:, 1] - c[:, 0]).sort().values
    a3 = (c + torch.tensor([float(gap[2] + gap[3]) / 2, 0.0, 0.0])).argmax(-1)
    assert ["skip" if x == 0 else "execute" for x in a3.tolist()] == voted_plan(label_shares(recs), 3)
    assert c[:, 2].max() <= c[:, 0].min() + 1e-3  # repeats never labelled (layer 2: no skip either)
    # a skip bias that lets the two most skipped layers cross: exactly the voted plan for k = 2
    a = (c + torch.tensor([0.9, 0.0, 0.0])).argmax(-1)
    assert ["skip" if x == 0 else "execute" for x in a.tolist()] == voted_plan(label_shares(recs), 2)

    # labels that often repeat a layer: the order still follows the skip share alone (layer 2, skipped by 1 of 6
    # labels and repeated by 4, comes after layer 1, skipped by 2, at every budget)
    recs = [{"plan": ["skip" if i in s else "repeat" if i == 2 and j < 4 else "execute" for i in range(4)]}
            for j, s in enumerate(({0, 1}, {0, 1}, {0, 2}, {0}, {0}, {3}))]
    c = label_center(recs, 4)
    gap = (c[:, 1] - c[:, 0]).sort().values
    for k in range(1, 4):
        a = (c + torch.tensor([float(gap[k - 1] + gap[k]) / 2, 0.0, 0.0])).argmax(-1)
        got = ["skip" if x == 0 else "execute" if x == 1 else "repeat" for x in a.tolist()]
        assert got == voted_plan(label_shares(recs), k), k


def test_layer_fraction_calibrates_the_artifacts_skip_bias(tmp_path):
    from retrofit.methods.drllm.router import RouterBank
    from retrofit.methods.drllm.train import calibrate_skip_bias

    torch.manual_seed(1)
    L, W, d = 6, 4, 16
    feats, valid = torch.randn(40, L, W, d), torch.ones(40, L, W, dtype=torch.bool)
    bank = RouterBank(L, d, bottleneck=8)
    for target in (0.95, 0.8, 0.5):
        b, reached = calibrate_skip_bias(bank, feats, valid, target)
        a = (bank(feats, valid) + torch.tensor([b, 0.0, 0.0])).argmax(-1)
        got = float(((a == 1).sum() + 2 * (a == 2).sum()) / a.numel())
        assert got == pytest.approx(reached) and got >= target
        assert got - target < 0.05  # 240 decisions: the bisection stops within a few decisions of the target
        # the bias sits inside its plateau, not on its edge: a small step either way keeps the decisions
        for step in (-1e-3, 1e-3):
            a2 = (bank(feats, valid) + torch.tensor([b + step, 0.0, 0.0])).argmax(-1)
            assert torch.equal(a2, a)
    with pytest.raises(ValueError, match="layer fraction"):
        calibrate_skip_bias(bank, feats, valid, 2.5)

    # end to end: shrink 0 leaves one static plan, and the saved skip_bias makes it execute >= 0.75 of the passes
    model = tiny_model("llama")
    _fake_search_file(tmp_path / "s.jsonl", 32, 4)
    cfg = TrainConfig(epochs=5, lr=1e-2, warmup_steps=2, layer_fraction=0.75, shrink=0.0)
    rep = train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "r", cfg, num_windows=4,
                              bottleneck=8, progress=False)
    saved = json.loads((tmp_path / "r" / "retrofit.json").read_text())
    assert saved["config"]["skip_bias"] == pytest.approx(rep["calibrated"]["skip_bias"])
    assert rep["calibrated"]["layer_fraction"] >= 0.75 and rep["config"]["shrink"] == 0.0
    h = retrofit.load(model, tmp_path / "r")
    plans = set()
    for r in read_searches([tmp_path / "s.jsonl"])[:8]:
        with torch.no_grad():
            model(_Tok()(r["prompt"]).input_ids)
        plans.add(tuple(h.last_plans[0]))
    assert len(plans) == 1  # shrink 0: the same plan for every prompt
    (plan,) = plans
    assert sum({"skip": 0, "execute": 1, "repeat": 2}[a] for a in plan) / len(plan) == pytest.approx(
        rep["calibrated"]["layer_fraction"])
