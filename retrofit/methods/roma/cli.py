"""`retrofit roma`: router-only finetuning with routing manifold alignment."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("roma")
    def roma(
        ctx: typer.Context,
        train: str = typer.Option(..., "--train", help="task name (e.g. arc_easy, see `retrofit search --help`) or a "
                                                       "JSONL file with question/choices/answer"),
        out: Path = typer.Option(..., "--out", help="folder for the router artifact (+ training_report.json)"),
        model: str = typer.Option("default", "--model", help="'default' (SmolLM2-135M-Instruct; dense, so it has "
                                                             "no gates), 'testbed' (retrofit moefy's MoE) or a local "
                                                             "folder of an MoE model"),
        split: str = typer.Option("train", help="split of --train"),
        limit: int = typer.Option(None, help="first N training examples"),
        lam: float = typer.Option(0.8, "--lam", help="λ, weight of the manifold term (0 = plain router finetuning)"),
        k: int = typer.Option(3, help="successful neighbours per sample"),
        sigma: float = typer.Option(0.4, help="kernel width"),
        lr: float = typer.Option(7e-5),
        epochs: int = typer.Option(3),
        batch_size: int = typer.Option(8),
        weight_decay: float = typer.Option(0.01),
        num_layers: int = typer.Option(5, help="the last N MoE layers' gates train and form r"),
        layers: str = typer.Option(None, help="explicit MoE layer indices, comma separated (instead of --num-layers)"),
        embedder: str = typer.Option("all-MiniLM-L6-v2", help="task embedder: the bundled all-MiniLM-L6-v2 or a "
                                                              "sentence-transformers model folder"),
        seed: int = typer.Option(0),
        task_loss: str = typer.Option("continuation", "--task-loss", help="continuation (the paper's: gold answer "
                                      "tokens' cross-entropy) or choice (cross-entropy of the gold choice over "
                                      "the choices' summed log-likelihoods; about n_choices times the cost)"),
        device: str = typer.Option("cpu", help="cpu or cuda"),
        tune: int = typer.Option(None, "--tune", min=1, help="first run an optuna study of N trials (lr, λ, k, "
                                 "layers, epochs) on a validation split carved from --train, then train the best "
                                 "settings on all of --train; with --lam 0 the study is plain gate finetuning "
                                 "(λ fixed at 0). The searched options may not be given with --tune"),
        storage: str = typer.Option("sqlite:///runs/roma_optuna.db", help="--tune: optuna storage (SQLAlchemy URL "
                                    "or a path for SQLite); the study resumes from it"),
        study_name: str = typer.Option(None, help="--tune: study name (default: from the data and λ = 0 or not)"),
        val_fraction: float = typer.Option(0.2, help="--tune: share of --train held out to score the trials"),
    ):
        """Finetune only the MoE gates (last --num-layers layers) with task loss + λ·manifold term (RoMA).

        With --tune N the hyperparameters come from an optuna study on a validation split of the training data
        (never a test set); the study's result is saved as study.json beside the routers."""
        from retrofit.methods.roma import RomaConfig
        from retrofit.methods.roma.train import train_roma
        from retrofit.core.data import load_task

        plain = False
        if tune is not None:
            plain = _check_tune_options(ctx, lam, split, val_fraction)
        layer_list = [int(x) for x in layers.split(",") if x.strip()] if layers else None
        try:
            cfg = RomaConfig(num_layers=num_layers, layers=layer_list, lam=lam, k=k, sigma=sigma, lr=lr,
                             epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, embedder=embedder,
                             seed=seed, task_loss=task_loss)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        examples = load_task(train, split=split, limit=limit)
        if tune is not None and len(examples) < 2:
            raise typer.BadParameter(f"--tune needs at least 2 training examples to carve a validation split; "
                                     f"--train {train} gave {len(examples)}")
        m, tok = _load(model)
        m.to(device)
        if tune is not None:
            import json

            from retrofit.methods.roma.tune import roma_study

            try:
                res = roma_study(m, tok, examples, n_trials=tune, storage=storage, study_name=study_name,
                                 plain=plain, seed=seed, val_fraction=val_fraction, base=cfg, log=typer.echo)
            except ValueError as e:
                raise typer.BadParameter(str(e)) from e
            typer.echo(f"study {res.study_name} ({res.storage}): {res.n_trials} trials ({res.new_trials} new); "
                       f"best #{res.best_trial} {res.best_params}: validation acc {res.best_val_acc:.4f} on "
                       f"{res.n_val} held-out training items (paper settings {res.paper_val_acc}, base "
                       f"{res.base_val_acc:.4f}); training it on all {len(examples)} examples")
            cfg = res.config
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(out, "study.json").write_text(json.dumps(res.as_dict(), indent=2))
        handle, rep = train_roma(m, tok, examples, cfg, out_dir=out, log=typer.echo)
        handle.detach()
        last = rep["history"][-1]
        typer.echo(f"RoMA on {rep['examples']} examples ({rep['successful']} answered correctly by the base model), "
                   f"layers {rep['layers']}, {len(rep['history'])} epochs in {rep['seconds']} s; final loss "
                   f"{last['loss']:.4f} (task CE {last['task_ce']:.4f}, manifold {last['manifold']:.5f})")
        typer.echo(f"routers saved to {out}")


_SEARCHED = ("lr", "k", "epochs", "num_layers", "layers")


def _check_tune_options(ctx: typer.Context, lam: float, split: str, val_fraction: float) -> bool:
    """Refuse what contradicts --tune; True when the study is plain gate finetuning (--lam 0)."""
    def on_command_line(name):  # by the enum's name: typer vendors its own click
        src = ctx.get_parameter_source(name)
        return src is not None and src.name == "COMMANDLINE"

    given = [n for n in _SEARCHED if on_command_line(n)]
    if given:
        raise typer.BadParameter(f"{', '.join('--' + n.replace('_', '-') for n in given)}: chosen by the study "
                                 f"when --tune is given; drop them (or drop --tune)")
    lam_given = on_command_line("lam")
    if lam_given and lam != 0:
        raise typer.BadParameter(f"--lam {lam:g}: λ is chosen by the study when --tune is given; --lam 0 (plain "
                                 f"gate finetuning, λ fixed at 0) is the only value allowed with --tune")
    if split == "test":
        raise typer.BadParameter("--split test: the study tunes on a validation split carved from the training "
                                 "data; pass the training split, never the test set")
    if not 0 < val_fraction < 1:
        raise typer.BadParameter(f"--val-fraction {val_fraction:g}: must be strictly between 0 and 1")
    return lam_given and lam == 0


def _load(name: str):
    if name == "testbed":
        from retrofit.moe.moefy import load_testbed

        return load_testbed()
    from retrofit.models import load_model

    return load_model(name)
