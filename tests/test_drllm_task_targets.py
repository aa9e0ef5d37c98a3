"""Task-level router targets (``TrainConfig(target="task")``) and the text records they mix with
(:mod:`retrofit.search.lm`)."""

import json
import re

import pytest
import torch

import retrofit
from retrofit.artifacts import fingerprint
from retrofit.methods.drllm.router import RouterBank
from retrofit.methods.drllm.train import (TrainConfig, task_centers, task_gate_routers, task_orders,
                                          train_from_searches)
from retrofit.search.evaluator import PlanEvaluator
from retrofit.search.lm import layer_loss_increase, lm_records, write_lm_records
from retrofit.testing import tiny_model


def _search_rec(task, plan_skips, L, i=0):
    return {"id": i, "task": task, "prompt": "p", "found": True,
            "plan": ["skip" if j in plan_skips else "execute" for j in range(L)]}


def _lm_rec(task, inc, i=0):
    return {"id": i, "task": task, "prompt": "p", "found": True, "plan": ["execute"] * len(inc),
            "layer_loss_increase": inc}


def test_task_orders_rank_search_votes_and_text_losses_separately():
    L = 5
    recs = [_search_rec("mc", {3}, L, 0), _search_rec("mc", {3, 1}, L, 1), _search_rec("mc", {1, 4}, L, 2),
            _lm_rec("text", [0.5, 0.1, 0.9, 0.2, 0.3]), _lm_rec("text", [0.7, 0.3, 0.5, 0.0, 0.5])]
    orders = task_orders(recs, L)
    # votes: layer 1 and 3 twice (tie -> lower layer first), 4 once, then 0 and 2 (never voted, lower first)
    assert orders["mc"] == [1, 3, 4, 0, 2]
    # mean increases 0.6, 0.2, 0.7, 0.1, 0.4
    assert orders["text"] == [3, 1, 4, 0, 2]


def test_task_centers_rank_each_tasks_layers_and_put_the_largest_task_first():
    L = 4
    recs = [_search_rec("mc", {2}, L, 0), _lm_rec("text", [0.0, 0.3, 0.2, 0.1], 1), _search_rec("mc", {2}, L, 2)]
    names, centers, idx = task_centers(recs, L)
    assert names == ["mc", "text"]  # two mc records, one text record
    assert idx.tolist() == [0, 1, 0]
    # mc order 2, 0, 1, 3; text order 0, 3, 2, 1: skip logit -rank, execute 0, repeat -L
    assert centers[0, :, 0].tolist() == [-1.0, -2.0, 0.0, -3.0]
    assert centers[1, :, 0].tolist() == [0.0, -3.0, -2.0, -1.0]
    assert float(centers[..., 1].abs().sum()) == 0.0
    assert centers[..., 2].unique().tolist() == [-4.0]


def test_task_gate_routers_give_each_task_its_centre_exactly():
    """Window features of two tasks that differ along one direction: every router returns its task's centre
    logits, held-out examples included."""
    g = torch.Generator().manual_seed(0)
    L, W, d, N = 3, 4, 16, 80
    task = torch.arange(N) % 2
    feats = torch.randn(N, L, W, d, generator=g)
    feats[..., 0] += torch.where(task == 1, 3.0, -3.0).view(N, 1, 1)
    valid = torch.ones(N, L, W, dtype=torch.bool)
    valid[::7, :, 3] = False  # short prompts: a window without tokens
    centers = torch.tensor([[[-1.0, 0, -3], [0.0, 0, -3], [-2.0, 0, -3]],
                            [[0.0, 0, -3], [-2.0, 0, -3], [-1.0, 0, -3]]])
    bank = RouterBank(L, d, bottleneck=4)
    rep = task_gate_routers(bank, feats, valid, task, centers, val_fraction=0.25)
    assert min(rep["val_accuracy"]) == 1.0 and min(rep["train_accuracy"]) == 1.0
    with torch.no_grad():
        out = bank(feats, valid)  # [N, L, 3]
    torch.testing.assert_close(out, centers[task], atol=0.25, rtol=0)  # the skip logits are 1 apart
    for b in (0.5, 1.5, 2.5):  # every budget in the middle of its interval: the task centre's decisions
        bias = torch.tensor([b, 0.0, 0.0])
        assert torch.equal((out + bias).argmax(-1), (centers[task] + bias).argmax(-1))
    # every unit beyond the two of the one gate is zero
    assert float(bank[0].fc1.weight[2:].detach().abs().sum()) == 0.0
    with pytest.raises(ValueError, match="bottleneck of at least 4"):
        task_gate_routers(RouterBank(L, d, bottleneck=3), feats, valid, task % 3 + (task == 0) * 2,
                          torch.cat([centers, centers[:1]]))


def test_task_orders_refuse_a_task_mixing_record_kinds():
    with pytest.raises(ValueError, match="mixes text records"):
        task_orders([_search_rec("a", {0}, 3), _lm_rec("a", [0.1, 0.2, 0.3])], 3)
    with pytest.raises(ValueError, match="hold 2 layers, the model 3"):
        task_orders([_lm_rec("a", [0.1, 0.2])], 3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layer_loss_increase_equals_full_runs_with_one_layer_skipped(family):
    model = tiny_model(family)
    L = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    base, inc = layer_loss_increase(model, ids, batch=2)
    ev = PlanEvaluator(model, None)

    def loss(plan):
        logits = ev.run_plan(ids, plan)[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    full = loss(["execute"] * L)
    torch.testing.assert_close(base, full, atol=1e-5, rtol=1e-5)
    for skip in range(L):
        plan = ["execute"] * L
        plan[skip] = "skip"
        torch.testing.assert_close(inc[:, skip], loss(plan) - full, atol=1e-5, rtol=1e-5)
    assert float(inc.abs().max()) > 1e-3  # a random model's layers do change the loss
    with pytest.raises(ValueError, match="at least 2 tokens"):
        layer_loss_increase(model, ids[:, :1])


class _Tok:
    """Whitespace tokenizer over 't<id>' words, enough for the tiny model."""

    def __call__(self, text, return_tensors="pt"):
        ids = [int(w[1:]) for w in text.split()]
        return type("E", (), {"input_ids": torch.tensor([ids])})()

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_task_routers_skip_each_kind_of_input_its_own_layers(tmp_path):
    """Two kinds of input (words of two vocabularies, tokens 7-12: 'questions', 100-105: 'text'), each with its
    own safe layer: task routers skip layer 1 on unseen questions and layer 3 on unseen text at a one-skip
    budget."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=4)
    L = 4
    g = torch.Generator().manual_seed(1)
    tok = _Tok()
    search = tmp_path / "search.jsonl"
    with open(search, "w") as f:
        for i in range(40):
            toks = torch.randint(7, 13, (12,), generator=g).tolist()
            skips = {1} if i % 4 else {1, 2}
            f.write(json.dumps({**_search_rec("mc", skips, L, i), "prompt": tok.decode(toks)}) + "\n")
    texts = torch.randint(100, 106, (40, 12), generator=g)
    recs = lm_records(model, tok, texts, task="text", progress=False)
    for r in recs:  # text: layer 3 the safest, then 0, 2, 1 (the measured increases are replaced by design)
        r["layer_loss_increase"] = [0.2, 0.9, 0.5, 0.0]
    lm = write_lm_records(recs, tmp_path / "text.jsonl.gz")
    before = fingerprint(model)
    rep = train_from_searches(model, tok, [search, lm], tmp_path / "routers",
                              TrainConfig(target="task", layer_fraction=0.75), progress=False)
    assert fingerprint(model) == before
    # one skip: the middle of the biases (0, 1] that skip one layer
    assert rep["calibrated"]["skip_bias"] == pytest.approx(0.5, abs=1e-3)
    assert rep["calibrated"]["layer_fraction"] == 0.75
    assert rep["tasks"] == ["mc", "text"] and rep["task_orders"]["text"] == [3, 0, 2, 1]
    assert rep["plans_equal_task_center"] == 1.0
    assert min(rep["gate_val_accuracy"]) == 1.0
    h = retrofit.load(model, tmp_path / "routers")
    try:
        for lo, hi, want in ((7, 13, 1), (100, 106, 3)):
            ids = torch.randint(lo, hi, (1, 12), generator=g)
            model(input_ids=ids, use_cache=False)
            plan = h.last_plans[0]
            assert [i for i, a in enumerate(plan) if a == "skip"] == [want], (lo, plan)
    finally:
        h.detach()


def test_cli_search_text_refuses_unknown_sources_and_an_existing_out(tmp_path):
    from typer.testing import CliRunner

    from retrofit.cli import app

    def run(args):  # rich wraps the error box at the terminal width, which depends on the tmp path's length
        r = CliRunner().invoke(app, args, env={"COLUMNS": "250"}, terminal_width=250)
        return r.exit_code, " ".join(re.sub(r"[\u2500-\u257f]", " ", r.output).split())

    code, out = run(["search-text", "--out", str(tmp_path / "t.jsonl"), "--source", "arc_easy_test"])
    assert code == 2 and "unknown text source(s) ['arc_easy_test']" in out
    (tmp_path / "t.jsonl").write_text("")
    code, out = run(["search-text", "--out", str(tmp_path / "t.jsonl")])
    assert code == 2 and "exists; delete it" in out


def test_text_windows_name_the_source_of_every_window(tmp_path):
    """The names follow the interleaving of distill_sequences, also when a short source runs out."""
    from retrofit.moe import distill as D

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("\n".join(
        json.dumps({"question": f"q{i} " * 30, "answer": "a #### 1"}) for i in range(20)))
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("x " * 200)

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    from retrofit.search.lm import text_windows

    old = D.SHAKESPEARE_HEAD
    D.SHAKESPEARE_HEAD = (0, 100)  # 50 words: 3 windows of 16, then this source is done
    try:
        ids, names = text_windows(Tok(), ["gsm8k_train", "shakespeare_head"], 10, seq_len=16, seed=0,
                                  data=tmp_path)
    finally:
        D.SHAKESPEARE_HEAD = old
    assert ids.shape == (10, 16)
    assert names == ["gsm8k_train", "shakespeare_head"] * 3 + ["gsm8k_train"] * 4
    assert all(int(ids[i, 0]) == 1 for i, n in enumerate(names) if n == "shakespeare_head")  # 'x' words
