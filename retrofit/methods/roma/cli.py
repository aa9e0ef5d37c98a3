"""`retrofit roma`: router-only finetuning with routing manifold alignment."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("roma")
    def roma(
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
        device: str = typer.Option("cpu", help="cpu or cuda"),
    ):
        """Finetune only the MoE gates (last --num-layers layers) with task loss + λ·manifold term (RoMA)."""
        from retrofit.methods.roma import RomaConfig
        from retrofit.methods.roma.train import train_roma
        from retrofit.core.data import load_task

        layer_list = [int(x) for x in layers.split(",") if x.strip()] if layers else None
        try:
            cfg = RomaConfig(num_layers=num_layers, layers=layer_list, lam=lam, k=k, sigma=sigma, lr=lr,
                             epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, embedder=embedder,
                             seed=seed)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        m, tok = _load(model)
        m.to(device)
        examples = load_task(train, split=split, limit=limit)
        handle, rep = train_roma(m, tok, examples, cfg, out_dir=out, log=typer.echo)
        handle.detach()
        last = rep["history"][-1]
        typer.echo(f"RoMA on {rep['examples']} examples ({rep['successful']} answered correctly by the base model), "
                   f"layers {rep['layers']}, {len(rep['history'])} epochs in {rep['seconds']} s; final loss "
                   f"{last['loss']:.4f} (task CE {last['task_ce']:.4f}, manifold {last['manifold']:.5f})")
        typer.echo(f"routers saved to {out}")


def _load(name: str):
    if name == "testbed":
        from retrofit.moe.moefy import load_testbed

        return load_testbed()
    from retrofit.models import load_model

    return load_model(name)
