"""RoMA's hyperparameters by an optuna study on a validation split carved from the training data.

``roma_study(model, tok, train_examples, n_trials=20, storage="sqlite:///runs/roma_optuna.db")``:

* **Split.** The study sees only ``train_examples``. They are split once, deterministically (``seed``), into a
  *fit* part (trials train their gate deltas on it) and a *validation* part (``val_fraction``, 0.2 by default,
  at least one example; trials are scored on it). The two are disjoint by position and by example id
  (duplicate ids are refused). ``exclude_ids`` (e.g. the test split's ids) makes the study refuse training
  data that contains any of them, so a caller's test set cannot enter the study even by mistake.
* **Space** (:data:`SPACE`): ``lr`` log-uniform 1e-5 .. 3e-3, ``lam`` (λ) log-uniform 0.05 .. 5, ``k``
  1 .. 10, ``layers`` one of ``last_5`` (the paper's last five MoE layers), ``last_third``, ``last_half``,
  ``all`` (the last ceil(n/3), ceil(n/2) or all n MoE layers; becomes ``RomaConfig.num_layers``), ``epochs``
  1 .. 5. σ, batch size and weight decay stay at the given ``base`` config (the paper's σ 0.4, batch 8, 0.01).
* **The paper's settings are the first trial** (lr 7e-5, λ 0.8, k 3, last 5 layers, 3 epochs), enqueued when
  the study is created, so the study never reports less than them on the validation part.
* **Plain gate finetuning** (``plain=True``): λ is fixed at 0 (not searched; k is then meaningless and not
  searched either); lr, layers and epochs come from the same ranges with the same trial budget, the same split
  and the same seed, so the baseline is tuned exactly as RoMA is.
* **Objective**: accuracy (lm-eval ``acc``) on the validation part, maximised (TPE, seeded). The best trial is
  the one with the highest accuracy; ties go to the higher mean probability of the gold choice (softmax over
  the choices' log-likelihoods), then to the earlier trial (the paper's settings first).
* **Storage and resuming**: any SQLAlchemy URL; a bare path is SQLite. ``n_trials`` is the study's *total*
  number of finished trials: a second call with the same storage and study name runs only the trials still
  missing (none when it is complete). Finished = complete or pruned (a trial whose loss diverged is pruned).
  The study remembers what it was made for (plain or RoMA, the split's example ids, the split seed, the base
  model's fingerprint, the search space) and refuses to resume with anything else. A trial left running by a
  killed process is failed after the heartbeat's grace period (3 min) and retried once with the same
  parameters. TPE's random state is not stored: a resumed study samples other points than an uninterrupted
  one would, but finished trials are never run again.

The study returns the best configuration; training it on *all* the training examples (fit + validation) is
the caller's next step (``retrofit roma --tune N`` and ``bench/bench_roma.py --tune N`` do that).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch

from retrofit.core.storage import open_storage, storage_url
from retrofit.methods.roma.config import RomaConfig
from retrofit.methods.roma.train import base_pass, embed_texts, frozen_prefix, score_example, train_roma

__all__ = ["SPACE", "PAPER_PARAMS", "LAYER_CHOICES", "DEFAULT_STORAGE", "split_train_val", "layers_for",
           "roma_study", "RomaStudyResult"]

DEFAULT_STORAGE = "sqlite:///runs/roma_optuna.db"
LAYER_CHOICES = ("last_5", "last_third", "last_half", "all")
SPACE = {
    "lr": (1e-5, 3e-3),       # log-uniform
    "lam": (0.05, 5.0),       # log-uniform; RoMA only
    "k": (1, 10),             # integer; RoMA only
    "layers": LAYER_CHOICES,  # categorical -> num_layers
    "epochs": (1, 5),         # integer
}
# The paper's settings (arXiv 2511.07419 as in PAPERS.md): AdamW lr 7e-5, λ 0.8, k 3, last 5 layers, 3 epochs.
PAPER_PARAMS = {"lr": 7e-5, "lam": 0.8, "k": 3, "layers": "last_5", "epochs": 3}
_PLAIN_KEYS = ("lr", "layers", "epochs")
_DIVERGED = "diverged"


def split_train_val(examples: list, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Deterministic disjoint split of ``examples`` into (fit, validation): a seeded shuffle of the positions,
    the first ``max(1, round(val_fraction * n))`` are the validation part; both keep the input order."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    n = len(examples)
    if n < 2:
        raise ValueError(f"need at least 2 training examples to carve a validation split, got {n}")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_pos = set(order[:n_val])
    fit = [ex for i, ex in enumerate(examples) if i not in val_pos]
    val = [ex for i, ex in enumerate(examples) if i in val_pos]
    return fit, val


def layers_for(choice: str, n_moe: int) -> int:
    """``RomaConfig.num_layers`` for a layer choice on a model with ``n_moe`` MoE layers."""
    if n_moe < 1:
        raise ValueError("the model has no MoE layers")
    table = {"last_5": min(5, n_moe), "last_third": math.ceil(n_moe / 3), "last_half": math.ceil(n_moe / 2),
             "all": n_moe}
    if choice not in table:
        raise ValueError(f"unknown layer choice {choice!r}; choices: {', '.join(LAYER_CHOICES)}")
    return table[choice]


@dataclass
class RomaStudyResult:
    """What :func:`roma_study` found. ``config`` is the best trial's full RomaConfig (train it on all the
    training data next); ``trials`` one summary per finished trial."""

    study_name: str
    storage: str
    plain: bool
    n_trials: int
    new_trials: int
    best_trial: int
    best_params: dict
    best_val_acc: float
    best_val_gold_prob: float
    config: RomaConfig
    paper_val_acc: float | None
    base_val_acc: float
    n_fit: int
    n_val: int
    val_fraction: float
    seed: int
    fit_ids: list[str] = field(repr=False)
    val_ids: list[str] = field(repr=False)
    trials: list[dict] = field(repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d


def _ids_hash(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _score_val(model, tok, examples) -> tuple[float, float, list[bool]]:
    """(accuracy, mean gold-choice probability, per-example correct) of ``model`` as attached."""
    correct, gold_p = [], []
    for ex in examples:
        scores, _ = score_example(model, tok, ex)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == ex.gold)
        gold_p.append(float(torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)[ex.gold]))
    return sum(correct) / len(correct), sum(gold_p) / len(gold_p), correct


def _paper_params(plain: bool) -> dict:
    return {k: PAPER_PARAMS[k] for k in (_PLAIN_KEYS if plain else PAPER_PARAMS)}


def _finished(study):
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _best(trials):
    done = [t for t in trials if t.value is not None]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, t.user_attrs.get("val_gold_prob", 0.0), -t.number))


def roma_study(model, tokenizer, train_examples: list, *, n_trials: int = 20, storage: str | None = None,
               study_name: str | None = None, plain: bool = False, seed: int = 0, val_fraction: float = 0.2,
               base: RomaConfig | None = None, embeddings: torch.Tensor | None = None,
               exclude_ids=None, progress: bool = True, log=None) -> RomaStudyResult:
    """Tune RoMA (or, with ``plain=True``, plain gate finetuning: λ = 0) on a validation split of
    ``train_examples``; see the module docstring for the split, the space, the objective and resuming.

    ``n_trials``: total finished trials the study should hold (a resumed study runs only the missing ones).
    ``storage``: SQLAlchemy URL or path (default ``sqlite:///runs/roma_optuna.db``). ``study_name``: default
    ``roma-<plain|lam>-<n>-<hash of the ids>``. ``base``: the config whose untuned fields (σ, batch size,
    weight decay, embedder) every trial keeps (default RomaConfig()). ``embeddings`` [N, d]: task embeddings
    aligned with ``train_examples`` (else computed with ``base.embedder`` on the fit part when λ > 0).
    ``exclude_ids``: ids that must not be among the training examples (the test split's); refused if any is.
    The model is left as found (every trial's handle is detached).
    """
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    import retrofit
    from retrofit.arch import get_adapter
    from retrofit.artifacts import fingerprint

    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    base = base or RomaConfig()
    ids = [str(ex.id) for ex in train_examples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"training examples have duplicate ids ({dup}): the split is checked by id")
    if exclude_ids is not None:
        leaked = sorted(set(ids) & {str(i) for i in exclude_ids})
        if leaked:
            raise ValueError(f"{len(leaked)} training examples are in exclude_ids (the held-out set), e.g. "
                             f"{leaked[:5]}: the study must never see them")
    if embeddings is not None and embeddings.shape[0] != len(train_examples):
        raise ValueError(f"{embeddings.shape[0]} embeddings for {len(train_examples)} training examples")
    fit, val = split_train_val(train_examples, val_fraction, seed)
    fit_ids, val_ids = [str(ex.id) for ex in fit], [str(ex.id) for ex in val]
    assert not set(fit_ids) & set(val_ids)
    n_moe = len(get_adapter(model).moe_gates(model))
    if n_moe == 0:
        raise ValueError(f"{type(model).__name__} has no MoE gates: RoMA needs an MoE model")
    pos = {ex_id: i for i, ex_id in enumerate(ids)}
    # without given embeddings they are computed on first need (a resumed, complete study needs none)
    emb_fit = None if embeddings is None else embeddings[[pos[i] for i in fit_ids]]

    url = storage_url(storage, DEFAULT_STORAGE)
    key = {"plain": bool(plain), "fit_ids": _ids_hash(fit_ids), "val_ids": _ids_hash(val_ids), "seed": seed,
           "n_moe": n_moe, "model": fingerprint(model)["weights_sha256"], "space": repr(SPACE)}
    if base.task_loss != "continuation":  # (studies made before the option existed keep their key)
        key["task_loss"] = base.task_loss
    name = study_name or f"roma-{'plain' if plain else 'lam'}-{len(ids)}-{_ids_hash(ids)[:8]}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # heartbeat / retry callback are marked experimental in some versions
        warnings.simplefilter("ignore")
        rdb = open_storage(
            url, heartbeat_interval=60, grace_period=180,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(study_name=name, storage=rdb, direction="maximize", sampler=sampler,
                                load_if_exists=True)
    made_for = study.user_attrs.get("made_for")
    if made_for is None:
        if study.trials:
            raise ValueError(f"study {name!r} in {url} has trials but was not made by roma_study")
        study.set_user_attr("made_for", key)
        study.enqueue_trial(_paper_params(plain))
    elif made_for != key:
        diff = sorted(k for k in key if made_for.get(k) != key[k])
        raise ValueError(f"study {name!r} in {url} was made for other settings (differs in: {', '.join(diff)}); "
                         f"use another --study-name or storage")

    caches: dict[int, tuple] = {}

    def cached(nl: int):
        """(base pass, frozen prefix) of the fit part for the last ``nl`` MoE layers, computed once."""
        if nl not in caches:
            h = retrofit.attach(model, "roma", **{**asdict(base), "num_layers": nl, "layers": None})
            try:
                caches[nl] = (base_pass(h, tokenizer, fit, progress=False),
                              frozen_prefix(h, tokenizer, fit, progress=False, task_loss=base.task_loss))
            finally:
                h.detach()
        return caches[nl]

    def objective(trial):
        nonlocal emb_fit
        p = {"lr": trial.suggest_float("lr", *SPACE["lr"], log=True)}
        if not plain:
            p["lam"] = trial.suggest_float("lam", *SPACE["lam"], log=True)
            p["k"] = trial.suggest_int("k", *SPACE["k"])
        p["layers"] = trial.suggest_categorical("layers", SPACE["layers"])
        p["epochs"] = trial.suggest_int("epochs", *SPACE["epochs"])
        nl = layers_for(p["layers"], n_moe)
        cfg = replace(base, lr=p["lr"], lam=0.0 if plain else p["lam"], k=base.k if plain else p["k"],
                      num_layers=nl, layers=None, epochs=p["epochs"], seed=seed)
        trial.set_user_attr("config", asdict(cfg))
        if cfg.lam > 0 and emb_fit is None:
            emb_fit = embed_texts([ex.prompt for ex in fit], cfg.embedder, progress=progress)
        bp, prefix = cached(nl)
        t0 = time.time()
        try:
            h, rep = train_roma(model, tokenizer, fit, cfg, embeddings=emb_fit if cfg.lam > 0 else None, base=bp,
                                prefix=prefix, progress=False)
        except FloatingPointError as e:
            trial.set_user_attr(_DIVERGED, str(e))
            raise optuna.TrialPruned(str(e)) from None
        try:
            acc, gold_p, _ = _score_val(model, tokenizer, val)
        finally:
            h.detach()
        trial.set_user_attr("val_gold_prob", gold_p)
        trial.set_user_attr("train_loss", rep["history"][-1]["loss"])
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        if log:
            log(f"trial {trial.number}: {p} -> val acc {acc:.4f} (gold p {gold_p:.4f}), "
                f"{time.time() - t0:.0f} s")
        return acc

    done0 = len(_finished(study))
    todo = max(0, n_trials - done0)
    bar = tqdm(total=n_trials, initial=min(done0, n_trials), disable=not progress,
               desc=f"{'plain ft' if plain else 'RoMA'} study ({name})")

    def on_done(study_, trial):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            bar.update(1)
            b = _best(_finished(study_))
            if b is not None:
                bar.set_postfix(best_val_acc=f"{b.value:.4f}")

    if todo:
        study.optimize(objective, n_trials=todo, callbacks=[
            on_done, optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))])
    bar.close()

    finished = _finished(study)
    best = _best(finished)
    if best is None:
        raise RuntimeError(f"study {name!r}: every trial diverged ({len(finished)} pruned); lower the lr range")
    paper = _paper_params(plain)
    paper_trials = [t for t in finished if t.value is not None and t.params == paper]
    base_acc, _, _ = _score_val(model, tokenizer, val)  # zero deltas = the base model (nothing attached)
    return RomaStudyResult(
        study_name=name, storage=url, plain=bool(plain), n_trials=len(finished), new_trials=len(finished) - done0,
        best_trial=best.number, best_params=dict(best.params), best_val_acc=best.value,
        best_val_gold_prob=best.user_attrs.get("val_gold_prob"), config=RomaConfig(**best.user_attrs["config"]),
        paper_val_acc=paper_trials[0].value if paper_trials else None, base_val_acc=base_acc, n_fit=len(fit),
        n_val=len(val), val_fraction=float(val_fraction), seed=seed, fit_ids=fit_ids, val_ids=val_ids,
        trials=[{"number": t.number, "state": t.state.name, "params": dict(t.params), "val_acc": t.value,
                 "val_gold_prob": t.user_attrs.get("val_gold_prob"), "seconds": t.user_attrs.get("seconds"),
                 **({_DIVERGED: t.user_attrs[_DIVERGED]} if _DIVERGED in t.user_attrs else {})}
                for t in finished],
    )
