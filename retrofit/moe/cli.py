"""`retrofit moefy`: build the MoE testbed (SmolLM2-135M split into a Qwen2-MoE from its own weights, then its
experts and gates distilled toward the dense model)."""

from __future__ import annotations

from pathlib import Path

import typer

from retrofit.moe.distill import DEFAULT_SOURCES
from retrofit.moe.moefy import MoefyConfig


def register(app: typer.Typer) -> None:
    @app.command("moefy")
    def moefy(
        experts: int = typer.Option(8, "--experts", "-e", help="experts per layer (divides the MLP width 1536)"),
        top_k: int = typer.Option(MoefyConfig.top_k, "--top-k", "-k",
                                  help="experts active per token (< experts so routing matters)"),
        shared: int = typer.Option(768, help="neurons of the always-on shared expert (Qwen2-MoE); 0 with "
                                   "--arch mixtral"),
        arch: str = typer.Option("qwen2_moe", help="qwen2_moe (shared + routed experts) or mixtral (routed only)"),
        tokens: int = typer.Option(8192, help="calibration tokens (ARC-Easy train + a Shakespeare slice)"),
        steps: int = typer.Option(200, help="Adam steps of each layer's gate fit"),
        cluster: str = typer.Option("coact", help="neuron split: coact (co-activation k-means), weights, random"),
        out: Path = typer.Option(None, "--out", help="output folder (default <cache>/moe/smollm2-moe-e{E}k{k})"),
        force: bool = typer.Option(False, "--force", help="rebuild even if the folder already holds a testbed"),
        seed: int = typer.Option(0),
        threads: int = typer.Option(None, help="torch CPU threads"),
        distill: bool = typer.Option(True, "--distill/--no-distill",
                                     help="after the gate fit, distil experts + gates toward the dense model (KL on "
                                     "next-token logits); --no-distill saves the gate-only build"),
        distill_steps: int = typer.Option(200, help="distillation steps (a rerun with more steps continues)"),
        distill_batch: int = typer.Option(4, help="sequences per distillation step"),
        distill_seq_len: int = typer.Option(256, help="tokens per distillation sequence"),
        distill_lr: float = typer.Option(2e-4, help="AdamW learning rate (linear warm-up, then constant)"),
        distill_sources: str = typer.Option(",".join(DEFAULT_SOURCES),
                                            help="comma-separated distillation texts (none is scored by a bench); "
                                                 "add arc_easy_train_qa for ARC-Easy train questions with their "
                                                 "answers in the evaluation's format"),
        checkpoint_every: int = typer.Option(10, help="save a resumable distillation checkpoint every N steps"),
    ):
        """Convert the default dense model into an MoE (Qwen2-MoE: a shared expert of the most important neurons +
        routed experts clustered from the rest, a gate fitted per layer), distil its experts and gates toward the
        dense model (resumable: kill and rerun to continue) and save it with its tokenizer and report
        (moefy.json); an existing one is reused."""
        import json

        import torch

        from retrofit.moe.distill import DistillConfig
        from retrofit.moe.moefy import MoefyConfig, _complete, build_testbed, read_report, testbed_dir

        if threads:
            torch.set_num_threads(threads)
        try:
            cfg = MoefyConfig(experts=experts, top_k=top_k, shared=shared, arch=arch, tokens=tokens, steps=steps,
                              cluster=cluster, seed=seed)
            cfg.validate(1536)
            dcfg = DistillConfig(steps=distill_steps, batch=distill_batch, seq_len=distill_seq_len, lr=distill_lr,
                                 sources=tuple(s.strip() for s in distill_sources.split(",") if s.strip()),
                                 checkpoint_every=checkpoint_every, seed=seed) if distill else None
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        path = Path(out) if out is not None else testbed_dir(experts, top_k, shared, arch, distilled=distill)
        reused = _complete(path, distilled=distill) and not force
        path = build_testbed(cfg, out=path, force=force, distill=dcfg)
        rep = read_report(path)
        typer.echo(("reused " if reused else "built ") + f"{path}")
        c = rep["config"]
        typer.echo(f"{rep.get('architecture')}: E={c['experts']} top_k={c['top_k']} shared={c.get('shared', 0)} "
                   f"cluster={c['cluster']}; per-token relative MLP error, mean over layers, held-out calibration "
                   "tokens: "
                   + json.dumps(rep["mean"]))
        if "distill" in rep:
            d = rep["distill"]
            typer.echo(f"distilled {d['steps_done']} steps ({d['tokens_seen']} tokens, {d['seconds']} s): KL to the "
                       f"dense model on held-out distillation text {d['val_kl_before']} -> {d['val_kl_after']}")
