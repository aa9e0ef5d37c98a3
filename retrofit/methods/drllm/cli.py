"""`retrofit train`: Dr.LLM routers from search results."""

from __future__ import annotations

import glob
from pathlib import Path

import typer

from retrofit.methods.drllm.train import TrainConfig


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        searches: list[str] = typer.Option(..., "--searches", help="search JSONL files or globs (retrofit search)"),
        out: Path = typer.Option(..., "--out", help="folder for the router artifact"),
        model: str = typer.Option("default", "--model", help="'default' (SmolLM2-135M-Instruct) or a local folder"),
        epochs: int = typer.Option(25, help="maximum epochs (early stopping on the validation loss)"),
        lr: float = typer.Option(1e-3),
        batch_size: int = typer.Option(16),
        gamma: float = typer.Option(2.0, help="focal-loss gamma"),
        windows: int = typer.Option(8, help="pooling windows per prompt"),
        bottleneck: int = typer.Option(128, help="router MLP width"),
        seed: int = typer.Option(0),
        target: str = typer.Option(TrainConfig.target, help="'shortest': the search's shortest rewarded plan (the "
                                   "paper); 'soft': per layer, the share of the search's rewarded plans per action; "
                                   "'safety': per layer, how often the search's plans that skip it were rewarded; "
                                   "'task': routers that tell the tasks of the files apart and skip each task's "
                                   "safest layers (mix search files with `retrofit search-text` records)"),
        unlabeled: str = typer.Option(TrainConfig.unlabeled, help="questions with no rewarded plan: 'drop' (the "
                                      "paper) or 'execute' (taught the all-execute plan)"),
        shrink: float = typer.Option(TrainConfig.shrink, help="after training, scale each router's per-question "
                                     "deviation from its mean logits by this factor in [0, 1] (1: as trained, the "
                                     "paper; 0: the static plan the mean logits choose)"),
        center: str = typer.Option(TrainConfig.center, help="what --shrink pulls toward: 'routers' (their own mean "
                                   "logits) or 'labels' (the labels' per-layer action shares; at --shrink 0 the "
                                   "labels' voted static plan)"),
        layer_fraction: float = typer.Option(None, "--layer-fraction", help="set the artifact's default skip_bias "
                                             "so that the routers execute this share of the block passes on the "
                                             "training prompts (e.g. 0.9); default: skip_bias 0"),
        device: str = typer.Option("cpu", help="where features are collected and routers trained (cpu, cuda)"),
        repeat_probes: list[str] = typer.Option(None, "--repeat-probes", help="--target task: files of `retrofit "
                                                "search-repeats`; each task's centre repeats the layers whose repeat "
                                                "raised its probed accuracy by more than --repeat-z standard errors"),
        repeat_z: float = typer.Option(TrainConfig.repeat_z, help="--repeat-probes: the paired standard errors a "
                                       "repeat's accuracy gain must clear"),
        max_repeats: int = typer.Option(TrainConfig.max_repeats, help="--repeat-probes: most layers repeated per "
                                        "task (single repeats are probed, not their combinations)"),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="continue a killed run from OUT/"
                                    "training_checkpoint.pt (written every epoch); --no-resume starts over"),
    ):
        """Train per-layer Dr.LLM routers on searched plans (focal loss, class-balanced, teacher forcing)."""
        from retrofit.core.data import read_searches
        from retrofit.methods.drllm.train import CheckpointError, train_from_searches
        from retrofit.models import load_model
        from retrofit.core.repeat_probe import read_probe

        files = sorted({f for pat in searches for f in (glob.glob(pat) or [pat])})
        try:
            cfg = TrainConfig(lr=lr, batch_size=batch_size, epochs=epochs, gamma=gamma, seed=seed, target=target,
                              unlabeled=unlabeled, shrink=shrink, layer_fraction=layer_fraction,
                              center=center, repeat_z=repeat_z, max_repeats=max_repeats)
            read_searches(files)  # damaged lines / missing files named now, not after the model loads
            probes = sorted({f for pat in repeat_probes or [] for f in (glob.glob(pat) or [pat])})
            if probes and target != "task":
                raise ValueError("--repeat-probes is read by --target task only")
            for p in probes:
                read_probe(p)
        except (ValueError, FileNotFoundError) as e:
            raise typer.BadParameter(str(e)) from None
        m, tok = load_model(model)
        m.to(device)
        try:
            rep = train_from_searches(m, tok, files, out, cfg, num_windows=windows, bottleneck=bottleneck,
                                      resume=resume, repeat_probes=probes)
        except (CheckpointError, ValueError) as e:
            raise typer.BadParameter(str(e)) from None
        if rep["resumed_from_epoch"]:
            typer.echo(f"resumed from the checkpoint after epoch {rep['resumed_from_epoch']}")
        if target == "task":
            held = [a for a in rep["gate_val_accuracy"] if a is not None]
            typer.echo(f"task routers for {rep['task_examples']}; gate accuracy on held-out records per layer: "
                       f"min {min(held, default=float('nan')):.3f}; {rep['plans_equal_task_center']:.3f} of the "
                       "training prompts get their task's plan")
            for t, order in rep["task_orders"].items():
                typer.echo(f"  {t}: safest layers {order[:8]}")
            for t, v in rep["repeats"].items():
                best = max(range(len(v["gain"])), key=lambda i: v["gain"][i] - repeat_z * v["se"][i])
                typer.echo(f"  {t}: repeats {v['layers'] or 'none'} (best single repeat on {v['n']} probed questions: "
                           f"layer {best}, {v['gain'][best]:+.3f} +- {v['se'][best]:.3f} accuracy)")
        else:
            last = rep["history"][-1]
            typer.echo(f"trained on {rep['train_examples']} examples ({rep['val_examples']} validation), "
                       f"{len(rep['history'])} epochs; best epoch {rep['best_epoch']}; "
                       f"final train loss {last['train_loss']:.4f}, val loss {last['val_loss']}; "
                       f"predicted layer fraction {rep['predicted_layer_fraction']:.3f} "
                       f"(labels {rep['label_layer_fraction']:.3f})")
        if rep.get("calibrated"):
            c = rep["calibrated"]
            typer.echo(f"default skip_bias {c['skip_bias']:.3f}: layer fraction {c['layer_fraction']:.3f} on the "
                       "training prompts")
        typer.echo(f"routers saved to {out}")
