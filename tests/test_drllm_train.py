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
