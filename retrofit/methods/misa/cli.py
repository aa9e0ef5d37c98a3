"""``retrofit misa ...``: distil the SmolLM2 lightning indexer, run the MISA benchmark."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    misa = typer.Typer(help="MISA: indexer-head routing for DeepSeek Sparse Attention.", no_args_is_help=True)

    @misa.command("distill")
    def distill(
        out: Path = typer.Option(None,
                                 help="artifact folder (default: <retrofit cache>/misa/smollm2-lightning-indexer)"),
        data: Path = typer.Option(None, help="the shared evaluation data folder (default: $RETROFIT_DATA, else "
                                  "../shared/data beside the repository)"),
        layers: str = typer.Option("4,12,20", help="comma-separated decoder layers"),
        steps: int = typer.Option(120, help="optimiser steps per layer"),
        seq_len: int = typer.Option(512, help="training window length"),
        n_heads: int = typer.Option(64, help="indexer heads"),
        head_dim: int = typer.Option(64, help="indexer head dim"),
    ):
        """Distil a DSA lightning indexer onto the default model from its own attention (KL warm-up)."""
        import torch

        from retrofit.core.data import data_dir
        from retrofit.methods.misa.distill import (DistillConfig, IndexerConfig, default_indexer_path,
                                                   distill_indexers, save_indexers)
        from retrofit.models import load_model

        data = data_dir(data)
        missing = [p for p in (data / "tinyshakespeare" / "input.txt", data / "kv_retrieval") if not p.exists()]
        if missing:
            raise typer.BadParameter(f"{missing[0]} not found: set RETROFIT_DATA (or --data) to the shared data "
                                     "folder (the one with tinyshakespeare/ and kv_retrieval/)")

        torch.set_num_threads(max(1, torch.get_num_threads()))
        model, tok = load_model("default")
        before = {n: p.clone() for n, p in model.named_parameters()}
        cfg = DistillConfig(layers=tuple(int(x) for x in layers.split(",")), steps=steps, seq_len=seq_len,
                            indexer=IndexerConfig(n_heads=n_heads, head_dim=head_dim))
        indexers, metrics = distill_indexers(model, tok, data, cfg, log=typer.echo)
        if not all(torch.equal(p, before[n]) for n, p in model.named_parameters()):
            raise RuntimeError("the base model's weights changed during indexer distillation")
        path = save_indexers(out or default_indexer_path(), model, indexers, cfg, metrics)
        typer.echo(f"saved {path}")

    app.add_typer(misa, name="misa")
