"""`retrofit pipeline`: the main job end to end on the embedded default model.

MCTS search on an ARC-Easy training slice -> Dr.LLM router training -> lm-eval on an ARC-Easy test slice for
the base model, the Dr.LLM routers and static pruning at equal compute -> a table and plots. Every stage
writes its results into ``--workdir`` as it goes and a re-run resumes (the search skips finished examples,
training is redone only when its artifact is missing, evaluation skips finished runs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import typer


def run_pipeline(workdir: Path, train_examples: int = 32, test_examples: int = 100, simulations: int = 50,
                 seed: int = 0, task: str = "arc_easy", eval_task: str = "arc_easy", epochs: int = 25,
                 model_name: str = "default", batch_size: int = 16, layer_fraction: float = 0.9,
                 shrink: float = 0.0, target: str = "safety", center: str = "labels", text_windows: int = 16) -> dict:
    from retrofit.eval.plots import plot_action_heatmap, plot_accuracy_vs_layers
    from retrofit.eval.runner import RunExistsError
    from retrofit.eval.runner import evaluate
    from retrofit.eval.static_prune import plan_from_scores, block_influence, calibration_texts
    from retrofit.methods.drllm.train import TrainConfig, train_from_searches
    from retrofit.models import load_model
    from retrofit.search.mcts import MCTSConfig
    from retrofit.search.run import format_summary, search_examples, summarize
    from retrofit.core.data import load_task

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load_model(model_name)
    L = model.config.num_hidden_layers

    typer.echo(f"[1/4] MCTS search: {train_examples} {task} train questions, {simulations} simulations each")
    examples = load_task(task, split="train", limit=train_examples)
    records = search_examples(model, tok, examples, workdir / "search.jsonl", cfg=MCTSConfig(simulations=simulations),
                              seed=seed, task=task, split="train")
    typer.echo(format_summary(summarize(records)))

    files = [workdir / "search.jsonl"]
    if target == "task":  # the text records that let the routers tell running text from questions
        from retrofit.moe.distill import DEFAULT_SOURCES
        from retrofit.search.lm import lm_records, text_windows as windows_of, write_lm_records

        text = workdir / "text.jsonl.gz"
        if text.is_file():
            from retrofit.search.run import read_records

            have = len(read_records(text))
            if have != text_windows:
                raise RunExistsError(f"{text} holds {have} text windows, not {text_windows}; delete it and "
                                     f"{workdir / 'routers'} to redo them")
        else:
            typer.echo(f"      {text_windows} text windows: single-layer skips (retrofit search-text)")
            ids, names = windows_of(tok, DEFAULT_SOURCES, text_windows, seq_len=128, seed=seed + 1)
            tmp = write_lm_records(lm_records(model, tok, ids, task=names), workdir / "text.tmp.jsonl.gz")
            tmp.replace(text)  # a killed run leaves no half file that a re-run would take as done
        files.append(text)

    routers = workdir / "routers"
    typer.echo("[2/4] training Dr.LLM routers on the searched plans")
    # safety targets, pulled toward the labels' per-layer shares and calibrated to the budget (the labels' voted
    # static plan): the default, because the task routers' gates (target="task", the benchmark's recipe,
    # docs/drllm.md) need more than the slice's few questions to recognise unseen ones (with 6 questions and 4
    # text windows, test questions ran 0.97 of the layers instead of 0.90); target="shortest", shrink=1,
    # layer_fraction=None is the paper's
    cfg = TrainConfig(epochs=epochs, seed=seed, target=target, shrink=shrink, layer_fraction=layer_fraction,
                      center=center)
    if not (routers / "retrofit.json").is_file():
        rep = train_from_searches(model, tok, files, routers, cfg)
    else:
        rep = json.loads((routers / "training_report.json").read_text())
        old = {**dataclasses.asdict(TrainConfig()), **rep.get("config", {})}
        if old != dataclasses.asdict(cfg):
            changed = sorted(k for k in old if old[k] != dataclasses.asdict(cfg).get(k))
            raise RunExistsError(f"{routers} holds routers trained with other settings ({', '.join(changed)}); "
                                 f"delete {routers} and {workdir / 'eval'} to retrain")
    if target == "task":
        typer.echo(f"      task routers for {rep['task_examples']}; {rep['plans_equal_task_center']:.3f} of the "
                   "training prompts get their task's plan")
    else:
        typer.echo(f"      {rep['train_examples']} train / {rep['val_examples']} val examples, "
                   f"{len(rep['history'])} epochs, label layer fraction {rep['label_layer_fraction']:.3f}")

    ev_dir = workdir / "eval"
    common = dict(tasks=[eval_task], model=model_name, limit=test_examples, batch_size=batch_size, out=ev_dir)
    typer.echo(f"[3/4] lm-eval on {test_examples} {eval_task} test questions: base, Dr.LLM, static pruning")
    from retrofit.eval.lm_eval_model import RetrofitLM

    def run(name, method=None, routers=None, config=None, **lm_kw):
        # one configuration at a time on the same model object: the context manager detaches the method again
        with RetrofitLM(pretrained=(model, tok), method=method, routers=routers, batch_size=batch_size,
                        **lm_kw) as lm:
            return evaluate(**common, method=method, routers=routers, config=config, name=name, lm=lm)

    base = run("base")
    drllm = run("drllm", method="drllm", routers=str(routers))
    task_key = next(iter(drllm["tasks"]))
    d = drllm["tasks"][task_key]
    k = max(1, round(L - d["mean_layers_executed"]))
    texts = calibration_texts(num_samples=32, seed=seed)
    plan = plan_from_scores(block_influence(model, tok, texts, progress=False), k)
    static = run(f"static_prune_{k}", method="drllm", config={"plan": plan}, plan=plan)
    runs = [base, static, drllm]

    typer.echo("[4/4] report")
    plots = [plot_accuracy_vs_layers(runs, task_key, workdir / "accuracy_vs_layers.png"),
             plot_action_heatmap(d["action_counts"], workdir / "drllm_actions.png",
                                 title=f"Dr.LLM actions per layer on {task_key}")]
    rows = []
    for r in runs:
        e = r["tasks"][task_key]
        rows.append({"run": r["run"], "acc": e.get("acc"), "acc_norm": e.get("acc_norm"),
                     "mean_layers_executed": e["mean_layers_executed"], "layer_fraction": e["layer_fraction"],
                     "n": e.get("n")})
    lines = [f"{'run':<22}{'acc':>8}{'acc_norm':>10}{'layers':>9}{'fraction':>10}{'n':>6}"]
    for r in rows:
        lines.append(f"{r['run']:<22}{r['acc']:>8.3f}{r['acc_norm']:>10.3f}{r['mean_layers_executed']:>9.2f}"
                     f"{r['layer_fraction']:>10.3f}{r['n']:>6}")
    table = "\n".join(lines)
    typer.echo(table)
    summary = {"task": task_key, "rows": rows, "plots": [str(p) for p in plots],
               "search": summarize(records), "seconds": round(time.time() - t0, 1)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"plots: {', '.join(map(str, plots))}; summary: {workdir / 'summary.json'} "
               f"({summary['seconds']:.0f} s)")
    return summary


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline(
        workdir: Path = typer.Option(Path("runs/pipeline"), help="results folder (a re-run resumes)"),
        train_examples: int = typer.Option(32, help="ARC-Easy training questions searched"),
        test_examples: int = typer.Option(100, help="ARC-Easy test questions evaluated"),
        simulations: int = typer.Option(50, help="MCTS simulations per question (the paper's 50)"),
        seed: int = typer.Option(0),
        model: str = typer.Option("default", help="'default' (SmolLM2-135M-Instruct) or a local folder"),
        layer_fraction: float = typer.Option(0.9, help="the routers' budget: share of the block passes executed "
                                             "on the training prompts (sets the artifact's skip_bias)"),
        shrink: float = typer.Option(0.0, help="scale of the routers' per-question deviation from their mean "
                                     "logits (0: the labels' static plan, 1: as trained)"),
        target: str = typer.Option("safety", help="router labels: 'safety', 'task' (questions and running text each "
                                   "skip their own safest layers; needs a few hundred questions), 'shortest' (the "
                                   "paper) or 'soft'"),
        text_windows: int = typer.Option(16, min=4, help="text windows scored for task routers (4 sources)"),
        center: str = typer.Option("labels", help="what shrink pulls toward: 'labels' (their per-layer action "
                                   "shares) or 'routers' (their own mean logits)"),
    ):
        """Search -> train -> evaluate Dr.LLM routers on the default model and a slice of ARC-Easy (minutes)."""
        from retrofit.eval.runner import RunExistsError
        from retrofit.methods.drllm.train import TrainConfig

        try:
            TrainConfig(target=target, shrink=shrink, layer_fraction=layer_fraction, center=center)
        except ValueError as e:  # a bad training option, named by TrainConfig
            raise typer.BadParameter(str(e)) from None
        try:
            run_pipeline(workdir, train_examples, test_examples, simulations, seed, model_name=model,
                         layer_fraction=layer_fraction, shrink=shrink, target=target, center=center,
                         text_windows=text_windows)
        except RunExistsError as e:  # an earlier run's results with other settings: never replaced silently
            raise typer.BadParameter(f"{e} (or use another --workdir)") from None
