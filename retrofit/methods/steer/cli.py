"""`retrofit steer fit`: fit multilingual routing steering (task experts of the middle MoE layers) and save it."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    steer_app = typer.Typer(no_args_is_help=True, help="Multilingual routing steering of MoE experts.")

    @steer_app.command("fit")
    def fit(
        task_data: list[Path] = typer.Option(..., "--task-data",
                                             help="English task texts: mgsm/mgsm_en.tsv, xcopa/data-gmt/<l>/*.jsonl, "
                                                  "a .txt (one text a line); repeatable"),
        general_data: list[Path] = typer.Option(..., "--general-data",
                                                help="English general texts, e.g. flores_sib200/eng_Latn/dev.tsv; "
                                                     "repeatable"),
        out: Path = typer.Option(..., "--out", help="folder for the steering artifact"),
        model: str = typer.Option("testbed", "--model",
                                  help="'testbed' (the SmolLM2 MoE from `retrofit moefy`) or a local MoE model folder"),
        tau: float = typer.Option(0.3, help="Delta threshold for task experts"),
        layers: str = typer.Option(None, help="comma-separated MoE layer indices (overrides --layer-range)"),
        layer_range: str = typer.Option("1/3,2/3", help="fractions lo,hi of the decoder depth to steer "
                                                              "(MoE layers l with lo*L <= l < hi*L)"),
        mode: str = typer.Option("soft", help="soft (z += lam*std(z)) or hard (z = max(z)+eps)"),
        lam: float = typer.Option(0.5, "--lambda", help="soft steering strength"),
        eps: float = typer.Option(0.01, help="hard steering margin"),
        limit: int = typer.Option(None, help="at most this many texts per file"),
        batch_size: int = typer.Option(8),
        max_length: int = typer.Option(256, help="tokens per text"),
    ):
        """Find the experts English task inputs use more than English general text (Delta > tau) in the middle
        MoE layers, and save them as a `steer` artifact (attach with retrofit.attach(model, "steer", routers=OUT))."""
        from retrofit.methods.steer import attach_fit, fit_steering, load_texts

        if model == "testbed":
            from retrofit.moe.moefy import load_testbed

            m, tok = load_testbed(build=False)
        else:
            from retrofit.models import load_model

            m, tok = load_model(model)
        task = [t for p in task_data for t in load_texts(p, limit)]
        gen = [t for p in general_data for t in load_texts(p, limit)]
        lay = [int(x) for x in layers.split(",")] if layers else None
        from fractions import Fraction

        rng = tuple(float(Fraction(x.strip())) for x in layer_range.split(","))
        res = fit_steering(m, tok, task, gen, tau=tau, layers=lay, layer_range=rng, batch_size=batch_size,
                           max_length=max_length, progress=True)
        h = attach_fit(m, res, mode=mode, lam=lam, eps=eps)
        h.save(out)
        h.detach()
        typer.echo(f"{len(task)} task texts, {len(gen)} general texts; tau={tau}; layers {res.layers}")
        for l in res.layers:
            d = res.deltas[l]
            typer.echo(f"  layer {l}: task experts {res.experts[l]} (max Delta {float(d.max()):.3f})")
        typer.echo(f"steering saved to {out}")

    app.add_typer(steer_app, name="steer")
