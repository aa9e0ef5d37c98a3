"""RoMA's optuna study (retrofit.methods.roma.tune): it never reads test items, its validation split is carved
from the training data and disjoint from what trials train on, the paper's settings are its first trial, plain
finetuning keeps λ = 0, and a second call on the same storage does not redo finished trials."""

import contextlib
import re

import pytest
import torch

pytest.importorskip("optuna")

from retrofit.methods.roma import train as roma_train  # noqa: E402
from retrofit.methods.roma import tune  # noqa: E402
from retrofit.testing import tiny_model  # noqa: E402

from test_roma import TOK, _examples  # noqa: E402  the same character tokenizer as the other RoMA tests


TRAIN = _examples(15, 0, prefix="train-")
TEST = _examples(8, 1, prefix="test-")  # a held-out split: the study is never given it
EMB = torch.randn(len(TRAIN), 16, generator=torch.Generator().manual_seed(2))


def _model(family="mixtral"):
    m = tiny_model(family, num_hidden_layers=6)  # 6 MoE layers: the four layer choices give 5 / 2 / 3 / 6
    m.requires_grad_(False)
    return m


class Spy:
    """Records every example read by RoMA's scoring / training code (``train._requests`` is where each
    example becomes tokens), which phase read it, and what each trainer call was given."""

    def __init__(self, monkeypatch):
        self.phase = "other"
        self.reads = {"train": set(), "val": set(), "other": set()}
        self.train_calls = []  # (ids, cfg) per train_roma call
        self.val_calls = 0
        real_requests, real_train, real_score = roma_train._requests, tune.train_roma, tune.score_example

        def requests(tok, ex):
            self.reads[self.phase].add(ex.id)
            return real_requests(tok, ex)

        def train_roma(model, tok, examples, cfg, **kw):
            self.train_calls.append(([ex.id for ex in examples], cfg))
            with self.in_phase("train"):
                return real_train(model, tok, examples, cfg, **kw)

        def score_example(model, tok, ex, handle=None):
            self.val_calls += 1
            with self.in_phase("val"):
                return real_score(model, tok, ex, handle)

        def no_embedder(*a, **k):
            raise AssertionError("the embedder ran although embeddings were given (or λ = 0)")

        monkeypatch.setattr(roma_train, "_requests", requests)
        monkeypatch.setattr(tune, "train_roma", train_roma)
        monkeypatch.setattr(tune, "score_example", score_example)
        monkeypatch.setattr(tune, "embed_texts", no_embedder)

    @contextlib.contextmanager
    def in_phase(self, phase):
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old


def _study(m, tmp_path, **kw):
    kw.setdefault("n_trials", 2)
    return tune.roma_study(m, TOK, TRAIN, storage=str(tmp_path / "study.db"), embeddings=EMB,
                           exclude_ids=[ex.id for ex in TEST], progress=False, **kw)


def test_study_never_reads_test_items_and_validates_on_a_disjoint_split(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    res = _study(_model(), tmp_path, n_trials=2)
    train_ids, test_ids = {ex.id for ex in TRAIN}, {ex.id for ex in TEST}
    fit, val = set(res.fit_ids), set(res.val_ids)
    # the split: carved from the training examples, disjoint, covering them, the documented fraction
    assert not fit & val and fit | val == train_ids
    assert len(val) == round(0.2 * len(TRAIN)) == res.n_val and res.n_fit == len(TRAIN) - len(val)
    # no test item is read anywhere, in any phase
    everything = set().union(*spy.reads.values())
    assert everything and not everything & test_ids
    assert everything <= train_ids
    # trials train on the fit part only (every call gets exactly it), and are scored on the validation part only
    assert len(spy.train_calls) == 2
    assert all(set(ids) == fit and len(ids) == len(fit) for ids, _ in spy.train_calls)
    assert spy.reads["train"] == fit
    assert spy.reads["val"] == val
    assert spy.reads["other"] <= fit  # the base pass and frozen prefix before training: fit part only
    assert spy.val_calls == 3 * len(val)  # two trials + the base model's validation accuracy
    # the split is deterministic for a seed and depends on it
    assert tune.split_train_val(TRAIN, 0.2, 0) == tune.split_train_val(TRAIN, 0.2, 0)
    assert [ex.id for ex in tune.split_train_val(TRAIN, 0.2, 0)[1]] == res.val_ids
    assert tune.split_train_val(TRAIN, 0.2, 1)[1] != tune.split_train_val(TRAIN, 0.2, 0)[1]
    # training data that contains a held-out item is refused before anything runs
    n = len(spy.train_calls)
    with pytest.raises(ValueError, match="exclude_ids"):
        tune.roma_study(_model(), TOK, TRAIN + TEST[:1], n_trials=1, storage=str(tmp_path / "x.db"),
                        exclude_ids=test_ids, progress=False)
    assert len(spy.train_calls) == n
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="val_fraction"):
            tune.split_train_val(TRAIN, bad)
    with pytest.raises(ValueError, match="at least 2"):
        tune.split_train_val(TRAIN[:1])


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_paper_settings_are_the_first_trial(tmp_path, monkeypatch, family):
    import optuna

    spy = Spy(monkeypatch)
    res = _study(_model(family), tmp_path, n_trials=2)
    ids, cfg = spy.train_calls[0]
    assert (cfg.lr, cfg.lam, cfg.k, cfg.num_layers, cfg.epochs) == (7e-5, 0.8, 3, 5, 3)
    assert cfg.layers is None and cfg.sigma == 0.4 and cfg.batch_size == 8
    study = optuna.load_study(study_name=res.study_name, storage=res.storage)
    assert study.trials[0].params == tune.PAPER_PARAMS == res.trials[0]["params"]
    assert res.paper_val_acc == study.trials[0].value
    # the second trial is TPE's own (not the paper's again)
    assert spy.train_calls[1][1] != cfg
    assert res.best_val_acc == max(t.value for t in study.trials)
    assert res.storage == f"sqlite:///{tmp_path / 'study.db'}"


def test_plain_study_keeps_lambda_zero(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    res = _study(_model(), tmp_path, n_trials=4, plain=True)
    assert len(spy.train_calls) == 4
    assert all(cfg.lam == 0.0 for _, cfg in spy.train_calls)
    assert all(set(t["params"]) == {"lr", "layers", "epochs"} for t in res.trials)
    assert res.config.lam == 0.0 and res.plain
    first = spy.train_calls[0][1]
    assert (first.lr, first.num_layers, first.epochs) == (7e-5, 5, 3)  # the paper's settings, λ = 0
    # the same budget and seed with plain=False searches λ > 0 (so the check above is not vacuous)
    spy.train_calls.clear()
    _study(_model(), tmp_path, n_trials=2, plain=False)
    assert spy.train_calls and all(cfg.lam > 0 for _, cfg in spy.train_calls)


def test_study_resumes_without_redoing_trials(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    m = _model()
    r1 = _study(m, tmp_path, n_trials=3, study_name="s")
    assert len(spy.train_calls) == 3 and r1.n_trials == 3 and r1.new_trials == 3
    r2 = _study(m, tmp_path, n_trials=3, study_name="s")  # complete: nothing to do
    assert len(spy.train_calls) == 3 and r2.n_trials == 3 and r2.new_trials == 0
    assert (r2.best_trial, r2.best_params, r2.config) == (r1.best_trial, r1.best_params, r1.config)
    r3 = _study(m, tmp_path, n_trials=4, study_name="s")  # one more trial, not four
    assert len(spy.train_calls) == 4 and r3.n_trials == 4 and r3.new_trials == 1
    assert [t["number"] for t in r3.trials] == [0, 1, 2, 3]
    assert [t["params"] for t in r3.trials[:3]] == [t["params"] for t in r1.trials]
    # a study made for other settings is refused, not mixed
    with pytest.raises(ValueError, match="other settings.*plain"):
        _study(m, tmp_path, n_trials=4, study_name="s", plain=True)
    with pytest.raises(ValueError, match="other settings.*seed"):
        _study(m, tmp_path, n_trials=4, study_name="s", seed=1)
    other = tiny_model("mixtral", seed=1, num_hidden_layers=6)  # same shapes, other weights
    with pytest.raises(ValueError, match="other settings.*model"):
        _study(other, tmp_path, n_trials=4, study_name="s")
    assert len(spy.train_calls) == 4


def test_layer_choices_and_bad_input(tmp_path):
    assert [tune.layers_for(c, 30) for c in tune.LAYER_CHOICES] == [5, 10, 15, 30]
    assert [tune.layers_for(c, 2) for c in tune.LAYER_CHOICES] == [2, 1, 1, 2]
    with pytest.raises(ValueError, match="unknown layer choice"):
        tune.layers_for("first_half", 6)
    m = _model()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_trials"):
            tune.roma_study(m, TOK, TRAIN, n_trials=bad, storage=str(tmp_path / "b.db"), progress=False)
    with pytest.raises(ValueError, match="duplicate ids"):
        tune.roma_study(m, TOK, TRAIN + TRAIN[:1], n_trials=1, storage=str(tmp_path / "b.db"), progress=False)
    with pytest.raises(ValueError, match="embeddings"):
        tune.roma_study(m, TOK, TRAIN, n_trials=1, storage=str(tmp_path / "b.db"), embeddings=EMB[:3],
                        progress=False)
    with pytest.raises(ValueError, match="no MoE gates"):
        tune.roma_study(tiny_model("llama"), TOK, TRAIN, n_trials=1, storage=str(tmp_path / "b.db"),
                        progress=False)


def _flat(text: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def test_cli_tune(tmp_path):
    """`retrofit roma --tune N` on a tiny MoE saved with SmolLM2's tokenizer (skipped without it): clear errors
    for what contradicts --tune, then a plain (--lam 0) study, the best settings trained on all the data."""
    import json

    import typer
    from typer.testing import CliRunner

    import retrofit
    from retrofit.methods.roma.cli import register
    from retrofit.models import cache_dir

    src = cache_dir() / "smollm2-135m-instruct"
    if not (src / "tokenizer.json").is_file():
        pytest.skip("the default model's tokenizer is not converted here")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = tiny_model("mixtral", vocab_size=len(tok), num_hidden_layers=6)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": ex.prompt.split("\n")[0][len("Question: "):],
                                        "choices": ex.choices, "answer": ex.gold}) + "\n" for ex in TRAIN[:10]))
    (tmp_path / "one.jsonl").write_text(data.read_text().splitlines()[0] + "\n")
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    register(app)
    base = ["roma", "--train", str(data), "--out", str(tmp_path / "art"), "--model", str(tmp_path / "m"),
            "--storage", str(tmp_path / "s.db")]
    run = CliRunner().invoke
    for extra, msg in ((["--tune", "0"], "greater than or equal to 1"),
                       (["--tune", "2", "--lr", "1e-3"], "--lr: chosen by the study"),
                       (["--tune", "2", "--epochs", "2", "--k", "4"], "--k, --epochs: chosen by the study"),
                       (["--tune", "2", "--lam", "0.5"], "--lam 0 .plain"),
                       (["--tune", "2", "--split", "test"], "never the test set"),
                       (["--tune", "2", "--val-fraction", "1"], "strictly between 0 and 1")):
        res = run(app, base + extra)
        assert res.exit_code == 2, (extra, res.output)
        assert re.search(msg, _flat(res.output)), (extra, res.output)
    res = run(app, base[:2] + [str(tmp_path / "one.jsonl")] + base[3:] + ["--tune", "2"])
    assert res.exit_code == 2 and "at least 2 training examples" in _flat(res.output)
    assert not (tmp_path / "art").exists()
    res = run(app, base + ["--tune", "2", "--lam", "0"])
    assert res.exit_code == 0, res.output
    study = json.loads((tmp_path / "art" / "study.json").read_text())
    assert study["plain"] and study["n_trials"] == 2 and study["config"]["lam"] == 0.0
    assert study["n_val"] == 2 and study["n_fit"] == 8 and study["storage"] == f"sqlite:///{tmp_path / 's.db'}"
    rep = json.loads((tmp_path / "art" / "training_report.json").read_text())
    assert rep["examples"] == 10 and rep["config"] == study["config"]  # the best settings, on all the data
    h = retrofit.attach(model, "roma", routers=tmp_path / "art")
    assert h.config.lam == 0.0 and h.config.lr == study["config"]["lr"]
    h.detach()
