"""retrofit.eval: the lm-eval model, offline tasks, static pruning, plots."""

import json
import math
from pathlib import Path

import pytest
import torch

from retrofit.testing import tiny_model


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from retrofit.models import default_model_dir

    try:
        path = default_model_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def _tiny_lm(tok, **kw):
    from retrofit.eval.lm_eval_model import RetrofitLM

    model = tiny_model("llama", vocab_size=len(tok)).eval()
    return model, RetrofitLM(pretrained=(model, tok), batch_size=3, **kw)


def _instances(pairs, task="t"):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i, metadata=(task, 0, 1))
            for i, p in enumerate(pairs)]


PAIRS = [
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in?\nAnswer:", " oxygen"),
    ("Question: Which gas do plants take in?\nAnswer:", " helium from the sun and the moon"),
    ("Question: What is 2+2?\nAnswer:", " 4"),
    ("Question: What is 2+2?\nAnswer:", " five hundred"),
    ("The cat sat on the", " mat"),
    ("A much longer context, so that rows in one batch have quite different lengths and get padded:", " yes"),
]


def _reference(model, tok, context, cont):
    """Log-likelihood of ``cont`` after ``context`` with the plain HF model, one unpadded sequence."""
    whole = tok(context + cont, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    tgt = ids[0, n_ctx:]
    lp = logp[n_ctx - 1:-1].gather(-1, tgt[:, None]).sum().item()
    greedy = bool((logp[n_ctx - 1:-1].argmax(-1) == tgt).all())
    return lp, greedy


def test_loglikelihood_equals_plain_hf_model(smol_tok):
    """Must-show: through lm-eval (batched, right-padded, sorted), every request's log-likelihood equals the plain
    HF model's on the same tokens."""
    model, lm = _tiny_lm(smol_tok)
    got = lm.loglikelihood(_instances(PAIRS))
    for (ctx, cont), (lp, greedy) in zip(PAIRS, got):
        ref_lp, ref_greedy = _reference(model, smol_tok, ctx, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4), (ctx, cont)
        assert greedy == ref_greedy
    # the log-likelihoods are not all equal (a broken pipeline returning constants would fail above anyway)
    assert len({round(x[0], 3) for x in got}) == len(PAIRS)
    m = lm.compute_metrics("t")
    assert m["prompts"] == 4 and m["mean_layers_executed"] == 4.0 and m["layer_fraction"] == 1.0
    assert m["action_counts"] == [[0, 4, 0]] * 4


def _plan_logprob(model, tok, context, cont, plan):
    """Reference log-likelihood with the decoder layers run one by one under ``plan`` (no KV cache)."""
    from retrofit.arch import get_adapter

    a = get_adapter(model)
    whole = tok(context + cont, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        h, kw = a.prepare(model, ids)
        for layer, act in zip(a.layers(model), plan):
            for _ in range({"skip": 0, "execute": 1, "repeat": 2}[act]):
                h = a.call_layer(layer, h, kw)
        logp = torch.log_softmax(a.head(model, h)[0].double(), -1)
    return logp[n_ctx - 1:-1].gather(-1, ids[0, n_ctx:, None]).sum().item()


def test_drllm_all_execute_equals_plain_model(smol_tok):
    """drllm attached without routers (every layer executes) gives the plain model's log-likelihoods."""
    import copy

    model, _ = _tiny_lm(smol_tok)
    ref = copy.deepcopy(model)
    from retrofit.eval.lm_eval_model import RetrofitLM

    lm = RetrofitLM(pretrained=(model, smol_tok), method="drllm", batch_size=3)
    got = lm.loglikelihood(_instances(PAIRS))
    for (ctx, cont), (lp, _) in zip(PAIRS, got):
        assert lp == pytest.approx(_reference(ref, smol_tok, ctx, cont)[0], abs=1e-4)
    assert lm.compute_metrics()["mean_layers_executed"] == 4.0


def test_close_detaches_so_configurations_can_follow_on_one_model(smol_tok):
    """The pipeline evaluates base, routers and a static plan one after the other on one model object."""
    import copy

    from retrofit.eval.lm_eval_model import RetrofitLM

    model = tiny_model("llama", vocab_size=len(smol_tok)).eval()
    ref = copy.deepcopy(model)
    with RetrofitLM(pretrained=(model, smol_tok), method="drllm", plan="ssee", batch_size=3) as lm:
        skipped = lm.loglikelihood(_instances(PAIRS[:1]))[0][0]
    assert lm.handle is None
    lm.close()  # idempotent
    with RetrofitLM(pretrained=(model, smol_tok), method="drllm", batch_size=3) as lm2:  # attaching again works
        full = lm2.loglikelihood(_instances(PAIRS[:1]))[0][0]
    ctx, cont = PAIRS[0]
    assert full == pytest.approx(_reference(ref, smol_tok, ctx, cont)[0], abs=1e-4)
    assert skipped != pytest.approx(full, abs=1e-3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_drllm_static_plan_matches_layer_by_layer(smol_tok):
    import copy

    from retrofit.eval.lm_eval_model import RetrofitLM

    model = tiny_model("llama", vocab_size=len(smol_tok)).eval()
    ref = copy.deepcopy(model)
    lm = RetrofitLM(pretrained=(model, smol_tok), method="drllm", plan="esre", batch_size=3)
    got = lm.loglikelihood(_instances(PAIRS))
    for (ctx, cont), (lp, _) in zip(PAIRS, got):
        assert lp == pytest.approx(_plan_logprob(ref, smol_tok, ctx, cont, ["execute", "skip", "repeat", "execute"]),
                                   abs=1e-4)
        assert lp != pytest.approx(_reference(ref, smol_tok, ctx, cont)[0], abs=1e-3)
    m = lm.compute_metrics("t")
    assert m["mean_layers_executed"] == 4.0 and m["action_counts"][1] == [4, 0, 0] and m["action_counts"][2] == [0, 0, 4]


def test_drllm_routers_decide_from_the_prompt_per_row(smol_tok):
    """With routers, each question's plan comes from its context alone, every answer choice is scored under that
    plan (per-row plans inside lm-eval's batches), and the compute metrics count those plans."""
    import copy

    from retrofit.eval.lm_eval_model import RetrofitLM

    model = tiny_model("llama", vocab_size=len(smol_tok)).eval()
    ref = copy.deepcopy(model)
    lm = RetrofitLM(pretrained=(model, smol_tok), method="drllm", batch_size=3)
    torch.manual_seed(3)
    bank = lm.handle.init_routers(seed=3)
    with torch.no_grad():  # make the random routers disagree between prompts: scale up their logits
        for p in bank.parameters():
            p.mul_(40.0)
    contexts = list(dict.fromkeys(c for c, _ in PAIRS))
    plans = {}
    for c in contexts:
        ids = torch.tensor([smol_tok(c, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            model(input_ids=ids)
        plans[c] = lm.handle.last_plans[0]
    assert len({tuple(p) for p in plans.values()}) > 1, plans  # the routers really route differently per prompt
    got = lm.loglikelihood(_instances(PAIRS))
    for (ctx, cont), (lp, _) in zip(PAIRS, got):
        assert lp == pytest.approx(_plan_logprob(ref, smol_tok, ctx, cont, plans[ctx]), abs=1e-4), (ctx, plans[ctx])
    m = lm.compute_metrics("t")
    from retrofit.core.plans import plan_passes as plan_cost

    assert m["prompts"] == len(contexts)
    assert m["mean_layers_executed"] == pytest.approx(sum(plan_cost(p) for p in plans.values()) / len(contexts))


def test_unknown_model_args_are_clear_errors(smol_tok):
    from retrofit.eval.lm_eval_model import RetrofitLM, parse_plan

    model = tiny_model("llama", vocab_size=len(smol_tok))
    with pytest.raises(TypeError, match="unknown model_args"):
        RetrofitLM(pretrained=(model, smol_tok), skip_bias=0.5)
    with pytest.raises(ValueError, match="method="):
        RetrofitLM(pretrained=(model, smol_tok), routers="somewhere")
    assert parse_plan("eSre") == ["execute", "skip", "repeat", "execute"]
    with pytest.raises(ValueError, match="decoder layers"):
        parse_plan("ees", num_layers=4)
    with pytest.raises(ValueError, match="one letter per layer"):
        parse_plan("exq")


def test_static_prune_finds_identity_layer(smol_tok):
    from retrofit.eval.static_prune import block_influence, plan_from_scores

    model = tiny_model("llama", vocab_size=len(smol_tok)).eval()
    with torch.no_grad():
        layer = model.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    texts = ["Question: Which gas do plants take in?\nAnswer: carbon dioxide", "The cat sat on the mat."]
    bi = block_influence(model, smol_tok, texts, progress=False)
    assert bi.shape == (4,)
    assert abs(bi[2].item()) < 1e-9  # layer 2 is an identity by construction: cos(x, x) = 1
    assert (bi[[0, 1, 3]] > 1e-4).all()
    assert plan_from_scores(bi.tolist(), 1) == ["execute", "execute", "skip", "execute"]
    plan2 = plan_from_scores(bi.tolist(), 2)
    assert plan2.count("skip") == 2 and plan2[2] == "skip"


def test_plan_from_scores_ties_and_bounds():
    from retrofit.eval.static_prune import StaticPruneConfig, plan_from_scores

    assert plan_from_scores([0.3, 0.1, 0.1, 0.5], 1) == ["execute", "execute", "skip", "execute"]
    assert plan_from_scores([0.3, 0.1, 0.2], 0) == ["execute"] * 3
    with pytest.raises(ValueError):
        plan_from_scores([0.1], 2)
    with pytest.raises(ValueError, match="calib"):
        StaticPruneConfig(calib="pg19")


def _run(name, layers, acc, L=30):
    counts = [[0, 1, 0] for _ in range(L)]
    return {"run": name, "tasks": {"retrofit_arc_easy": {"acc": acc, "mean_layers_executed": layers,
                                                         "action_counts": counts}}}


def test_accuracy_plot_has_one_point_per_run(tmp_path):
    from retrofit.eval.plots import accuracy_figure, plot_accuracy_vs_layers, plot_runs

    runs = [_run("base", 30.0, 0.52), _run("static_k5", 25.0, 0.40), _run("drllm_skip_bias0.0", 29.1, 0.53),
            _run("drllm_skip_bias0.5", 26.0, 0.51), _run("drllm_skip_bias1.0", 24.5, 0.47)]
    fig = accuracy_figure(runs, "retrofit_arc_easy")
    xs = [x for line in fig.axes[0].get_lines() for x in line.get_xdata()]
    ys = [y for line in fig.axes[0].get_lines() for y in line.get_ydata()]
    assert len(xs) == 5 and sorted(xs) == [24.5, 25.0, 26.0, 29.1, 30.0]
    assert sorted(ys) == sorted([0.52, 0.40, 0.53, 0.51, 0.47])
    assert len(fig.axes[0].get_lines()) == 3  # base, static, and one line joining the three drllm knob settings
    png = plot_accuracy_vs_layers(runs, "retrofit_arc_easy", tmp_path / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = plot_runs(runs, tmp_path / "all")
    assert len(written) == 1 + 5  # one accuracy plot + a heatmap per run
    with pytest.raises(ValueError, match="no run"):
        accuracy_figure(runs, "retrofit_piqa")


def test_action_heatmap_png(tmp_path):
    import matplotlib.image as mpimg

    from retrofit.eval.plots import plot_action_heatmap

    counts = [[i, 10 - i, 0] for i in range(10)]
    out = plot_action_heatmap(counts, tmp_path / "h.png")
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    with pytest.raises(ValueError, match=r"\[L, 3\]"):
        plot_action_heatmap([[1, 2]], tmp_path / "bad.png")


def test_tasks_render_and_load_offline(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    from retrofit.eval.tasks import render_tasks, resolve_task_names

    d = render_tasks(tmp_path / "tasks", data=shared_data)
    text = (d / "retrofit_arc_easy.yaml").read_text()
    assert str(Path(shared_data).resolve()) in text and "@DATA@" not in text
    assert resolve_task_names("arc_easy,piqa") == ["retrofit_arc_easy", "retrofit_piqa"]
    with pytest.raises(ValueError, match="unknown task"):
        resolve_task_names("arc_hard")
    tm = TaskManager(include_path=str(d))
    loaded = tm.load(["retrofit_arc_challenge", "retrofit_piqa"])
    tasks = loaded["tasks"] if isinstance(loaded, dict) and "tasks" in loaded else loaded
    objs = {t.config.task: t for t in (tasks.values() if isinstance(tasks, dict) else tasks)}
    arc = objs["retrofit_arc_challenge"]
    docs = list(arc.test_docs())
    assert len(docs) == 1172
    d0 = docs[0]
    assert arc.doc_to_text(d0).startswith("Question: An astronomer observes")
    assert arc.doc_to_choice(d0)[arc.doc_to_target(d0)] == "Planetary days will become shorter."
    piqa = objs["retrofit_piqa"]
    pdocs = list(piqa.validation_docs())
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    assert len(pdocs) == 1838 and [p["label"] for p in pdocs[:50]] == [int(x) for x in labels[:50]]


@pytest.mark.slow
def test_eval_runner_writes_results_and_resumes(shared_data, smollm2, tmp_path):
    """Two ARC-Easy validation questions through the real runner with SmolLM2; the record has accuracy and compute."""
    from retrofit.eval.lm_eval_model import RetrofitLM
    from retrofit.eval.runner import evaluate

    lm = RetrofitLM(pretrained=smollm2, batch_size=8)
    rec = evaluate("arc_easy_val", limit=2, out=tmp_path, name="base", data=shared_data, lm=lm, progress=False)
    t = rec["tasks"]["retrofit_arc_easy_val"]
    # acc = the plain HF model's answers scored by hand on the same two questions (limit=2: the first two)
    model, tok = smollm2
    docs = [json.loads(x) for x in (shared_data / "arc_easy" / "validation.jsonl").read_text().splitlines()[:2]]
    hits = []
    for d in docs:
        ctx = f"Question: {d['question']}\nAnswer:"
        lls = [_reference(model, tok, ctx, " " + c)[0] for c in d["choices"]["text"]]
        hits.append(max(range(len(lls)), key=lls.__getitem__) == d["choices"]["label"].index(d["answerKey"]))
    assert t["n"] == 2 and t["acc"] == sum(hits) / 2 and t["mean_layers_executed"] == 30.0
    assert t["results"]["layer_fraction,none"] == 1.0 and len(t["action_counts"]) == 30
    on_disk = json.loads((tmp_path / "base.json").read_text())
    assert on_disk["tasks"]["retrofit_arc_easy_val"]["acc"] == t["acc"]

    class MustNotRun:  # a resume reads the finished task from the file; a re-run would call the model
        def __getattr__(self, name):
            raise AssertionError(f"the resumed evaluation used the model ({name})")

    again = evaluate("arc_easy_val", limit=2, out=tmp_path, name="base", data=shared_data, lm=MustNotRun(),
                     progress=False)
    assert again["tasks"] == on_disk["tasks"]  # resumed: not re-run
    assert math.isfinite(t["acc_norm"])
