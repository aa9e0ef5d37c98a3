"""optuna studies with RDB storage: one static (per-task) layer plan, and a generic objective hook.

``run_study(objective, ...)`` is the generic hook (router-training hyperparameters plug in here: the objective
gets an ``optuna.Trial`` and returns a float). Storage is any SQLAlchemy URL; ``sqlite:///path.db`` by default,
so that several processes or machines can share one study (``load_if_exists``).

``static_plan_study`` searches ONE plan for a whole task: a categorical skip / execute / repeat per layer,
objective = accuracy over the examples, constraint = block passes within the budget (TPE with
``constraints_func``; infeasible trials never win). The all-execute plan is enqueued as the first trial, so the
study never reports less than the base model. This is the baseline that per-example MCTS is compared with.
"""

from __future__ import annotations

from typing import Callable

from retrofit.core.plans import ACTIONS, plan_passes
from retrofit.core.storage import open_storage, storage_url  # storage_url re-exported: defined once in core

from .evaluator import PlanEvaluator
from .mcts import budget_passes
from .tasks import Example

__all__ = ["run_study", "static_plan_study", "static_skip_study", "evaluate_static_plan", "storage_url"]


def run_study(objective: Callable, *, study_name: str, storage: str | None = None, n_trials: int = 30,
              direction: str = "maximize", seed: int = 0, sampler=None, enqueue: list[dict] | None = None,
              constraints_func: Callable | None = None, show_progress_bar: bool = False):
    """Create or resume an optuna study in RDB storage and run ``n_trials`` more trials of ``objective``."""
    import optuna

    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler is None:
        with warnings.catch_warnings():  # optuna 5 deprecates constraints_func but keeps it working
            warnings.simplefilter("ignore", FutureWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, constraints_func=constraints_func)
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url(storage)), direction=direction,
                                sampler=sampler, load_if_exists=True)
    if enqueue and len(study.trials) == 0:
        for params in enqueue:
            study.enqueue_trial(params)
    study.optimize(objective, n_trials=n_trials, show_progress_bar=show_progress_bar)
    return study


def evaluate_static_plan(evaluator: PlanEvaluator, examples: list[Example], plan) -> float:
    """Accuracy of one plan applied to every example."""
    if not examples:
        raise ValueError("no examples to score")
    ok = 0
    for ex in examples:
        evaluator.set_example(ex)
        ok += evaluator.evaluate([tuple(plan)])[0].correct
    return ok / len(examples)


def static_plan_study(model, tokenizer, examples: list[Example], *, budget=1.0, n_trials: int = 30,
                      storage: str | None = None, study_name: str = "static-plan", seed: int = 0,
                      allow_repeat: bool = True) -> dict:
    """Best single plan for all ``examples`` under the budget, by an optuna (TPE) study."""
    ev = PlanEvaluator(model, tokenizer)
    L = ev.L
    bp = budget_passes(budget, L)
    choices = list(ACTIONS) if allow_repeat else ["skip", "execute"]

    def plan_of(params) -> tuple:
        return tuple(params[f"layer_{i}"] for i in range(L))

    def objective(trial):
        plan = tuple(trial.suggest_categorical(f"layer_{i}", choices) for i in range(L))
        compute = plan_passes(plan)
        trial.set_user_attr("compute", compute)
        trial.set_user_attr("constraint", [float(compute - bp)])  # <= 0 is feasible
        return evaluate_static_plan(ev, examples, plan)

    base = {f"layer_{i}": "execute" for i in range(L)}
    study = run_study(objective, study_name=study_name, storage=storage, n_trials=n_trials, seed=seed,
                      enqueue=[base], constraints_func=lambda t: t.user_attrs["constraint"])
    done = [t for t in study.trials if t.value is not None]
    feasible = [t for t in done if t.user_attrs["constraint"][0] <= 0]
    base_trials = [t for t in done if plan_of(t.params) == tuple(base.values())]
    best = max(feasible, key=lambda t: (t.value, -t.user_attrs["compute"]), default=None)
    return {
        "study_name": study_name, "storage": storage_url(storage), "n_trials": len(done),
        "n_examples": len(examples), "budget_passes": bp, "num_layers": L,
        "base_acc": base_trials[0].value if base_trials else None,
        "best_acc": best.value if best else None,
        "best_compute": best.user_attrs["compute"] if best else None,
        "best_layer_fraction": best.user_attrs["compute"] / L if best else None,
        "best_plan": list(plan_of(best.params)) if best else None,
    }


def static_skip_study(model, tokenizer, examples: list[Example], *, skips: int, n_trials: int = 40,
                      storage: str | None = None, study_name: str = "static-skips", seed: int = 0,
                      start_plans: list | None = None, progress: bool = False) -> dict:
    """Best single plan that skips (at most) ``skips`` layers, by an optuna (TPE) study over *which* layers.

    The per-layer categorical space of :func:`static_plan_study` spends nearly every trial on plans that skip a
    third of the layers when the budget allows only a few skips; here a trial picks ``skips`` layer indices
    (a repeated index skips fewer layers), so every trial is a plan at the budget. ``start_plans`` (e.g. the
    ShortGPT plan) are enqueued first, so the study never reports less than they score on ``examples``.
    """
    ev = PlanEvaluator(model, tokenizer)
    L = ev.L
    if not 0 < skips < L:
        raise ValueError(f"skips={skips}: need 0 < skips < {L}")

    def plan_of(idx) -> tuple:
        return tuple("skip" if i in set(idx) else "execute" for i in range(L))

    def objective(trial):
        idx = [trial.suggest_int(f"skip_{j}", 0, L - 1) for j in range(skips)]
        plan = plan_of(idx)
        trial.set_user_attr("compute", plan_passes(plan))
        return evaluate_static_plan(ev, examples, plan)

    enqueue = []
    for p in start_plans or []:
        idx = [i for i, a in enumerate(p) if a == "skip"][:skips]
        idx += idx[-1:] * (skips - len(idx)) if idx else [L - 1] * skips
        enqueue.append({f"skip_{j}": i for j, i in enumerate(idx)})
    study = run_study(objective, study_name=study_name, storage=storage, n_trials=n_trials, seed=seed,
                      enqueue=enqueue, show_progress_bar=progress)
    done = [t for t in study.trials if t.value is not None]
    best = max(done, key=lambda t: (t.value, -t.user_attrs["compute"]))
    plan = plan_of([best.params[f"skip_{j}"] for j in range(skips)])
    return {"study_name": study_name, "storage": storage_url(storage), "n_trials": len(done),
            "n_examples": len(examples), "skips": skips, "num_layers": L, "best_acc": best.value,
            "best_compute": plan_passes(plan), "best_layer_fraction": plan_passes(plan) / L, "best_plan": list(plan)}
