"""CLI: ``retrofit eval``, ``retrofit eval-plot``, ``retrofit static-prune``, ``retrofit lm-eval``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def _parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets or []:
        if "=" not in s:
            raise typer.BadParameter(f"--set {s!r}: use key=value, e.g. --set skip_bias=0.5")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _read_method_config(path) -> dict:
    """A YAML mapping of method config options (configs/methods/<key>.yaml); {} for None."""
    if path is None:
        return {}
    import yaml

    obj = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(obj, dict):
        raise typer.BadParameter(f"{path}: a method config is a mapping of option: value")
    return obj


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise typer.BadParameter(f"--threads {n}: give at least 1")
        torch.set_num_threads(n)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        tasks: str = typer.Option("arc_easy", help="comma-separated offline tasks: arc_easy, arc_easy_val, "
                                  "arc_easy_train, arc_challenge, piqa, hellaswag, boolq, openbookqa, copa, mmlu"),
        model: str = typer.Option("default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder"),
        method: Optional[str] = typer.Option(None, help="retrofit method key (drllm, ...); absent = base model"),
        routers: Optional[Path] = typer.Option(None, help="router artifact folder for the method"),
        plan: Optional[str] = typer.Option(None, help="drllm static plan: JSON file (e.g. from static-prune), "
                                           "JSON list, or letters s/e/r per layer"),
        skip_bias: list[float] = typer.Option([], help="drllm budget knob; repeat the option for several runs"),
        set_: list[str] = typer.Option([], "--set", help="method config override key=value (repeatable)"),
        method_config: Optional[Path] = typer.Option(None, help="YAML of method config options (e.g. "
                                                     "configs/methods/misa.yaml); --set wins over it"),
        limit: Optional[float] = typer.Option(None, help="first N documents per task (lm-eval --limit)"),
        batch_size: int = typer.Option(16),
        device: str = typer.Option("cpu"),
        out: Path = typer.Option(Path("runs/eval"), help="folder for <run>.json results and the plots"),
        name: Optional[str] = typer.Option(None, help="run name (default from method and config)"),
        data: Optional[Path] = typer.Option(None, help="shared data folder (default $RETROFIT_DATA or ../shared/data)"),
        plot: bool = typer.Option(True, help="write plots over every run in --out"),
        plot_dir: Optional[Path] = typer.Option(None, help="folder for the plots (default: --out)"),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is much faster on a busy machine)"),
    ):
        """Evaluate the base model or a retrofit method on offline lm-eval tasks; results JSON per run + plots."""
        _threads(threads)
        from retrofit.eval.plots import plot_runs
        from retrofit.eval.runner import evaluate, load_runs

        cfg = {**_read_method_config(method_config), **_parse_sets(set_)}
        if method is None and method_config is not None:
            method = Path(method_config).stem  # configs/methods/<key>.yaml
        if plan is not None:
            if method is None:
                method = "drllm"
            cfg["plan"] = plan
        if (skip_bias or cfg) and method is None:
            raise typer.BadParameter("--skip-bias / --set / --plan need --method (e.g. --method drllm)")
        lim = int(limit) if limit is not None and float(limit).is_integer() and limit >= 1 else limit
        command = "retrofit eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else None
        knobs = skip_bias or [None]
        for sb in knobs:
            c = dict(cfg)
            if sb is not None:
                c["skip_bias"] = sb
            run_name = name if name and len(knobs) == 1 else (f"{name}_skip_bias{sb}" if name else None)
            evaluate(tasks, model=model, method=method, routers=str(routers) if routers else None, config=c,
                     limit=lim, batch_size=batch_size, device=device, out=out, name=run_name, data=data,
                     command=command)
        if plot:
            for p in plot_runs(load_runs([out]), plot_dir or out):
                typer.echo(f"wrote {p}")

    @app.command("eval-plot")
    def eval_plot(runs: list[Path] = typer.Argument(..., help="run result files or folders of them"),
                  out: Path = typer.Option(Path("runs/eval"), help="folder for the PNGs"),
                  metric: str = typer.Option("acc")):
        """Accuracy vs mean layers executed (one point per run) and per-layer action heatmaps."""
        from retrofit.eval.plots import plot_runs
        from retrofit.eval.runner import load_runs

        loaded = load_runs(runs)
        if not loaded:
            raise typer.BadParameter("no retrofit eval result files found in the given paths")
        for p in plot_runs(loaded, out, metric):
            typer.echo(f"wrote {p}")

    from retrofit.eval.static_prune import StaticPruneConfig as _SP  # the defaults, defined once

    @app.command("static-prune")
    def static_prune(k: int = typer.Option(_SP.k, help="layers to drop"),
                     model: str = typer.Option("default"),
                     calib: str = typer.Option(_SP.calib, help="arc_easy_train or shakespeare"),
                     num_samples: int = typer.Option(_SP.num_samples),
                     out: Path = typer.Option(Path("runs/static_prune_k5.json"), help="plan JSON to write"),
                     data: Optional[Path] = typer.Option(None),
                     threads: Optional[int] = typer.Option(None, help="torch CPU threads")):
        """ShortGPT block-influence static pruning: write a plan (skip the k least important layers)."""
        _threads(threads)
        from retrofit.eval.static_prune import StaticPruneConfig, static_prune_plan
        from retrofit.models import load_model

        m, tok = load_model(model)
        res = static_prune_plan(m, tok, StaticPruneConfig(k=k, calib=calib, num_samples=num_samples), data=data)
        res["model"] = model
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        typer.echo(f"dropped layers {res['dropped']} -> {out}")

    @app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def lm_eval_cmd(ctx: typer.Context):
        """lm-eval's own CLI with the `retrofit` model registered and the offline tasks on the include path:
        retrofit lm-eval run --model retrofit --model_args pretrained=default,method=drllm,routers=DIR --tasks ..."""
        import os
        import tempfile

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import retrofit.eval.lm_eval_model  # noqa: F401  (registers --model retrofit)
        from lm_eval.__main__ import cli_evaluate

        from retrofit.eval.tasks import render_tasks

        args = list(ctx.args)
        if "--include_path" not in args:
            args += ["--include_path", str(render_tasks(Path(tempfile.mkdtemp(prefix="retrofit_tasks_"))))]
        sys.argv = ["lm_eval", *args]
        cli_evaluate()
