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


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _check_device(device: str) -> str:
    """The device, or a one-line error when this torch cannot use it."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: this torch has no CUDA device; use --device cpu "
                                 f"(the default here is {_default_device()})")
    return device


def add_compute_metrics(results: dict, lms) -> None:
    """Put each task's layers executed (and layer fraction, prompts) from the retrofit models that scored it into
    lm-eval's ``results["results"][task]``, so its table and saved JSON show compute next to accuracy."""
    for task, entry in (results.get("results") or {}).items():
        for lm in lms:
            comp = lm.compute_metrics(task)
            if comp["prompts"]:
                entry["mean_layers_executed,none"] = comp["mean_layers_executed"]
                entry["layer_fraction,none"] = comp["layer_fraction"]
                entry["num_layers,none"] = comp["num_layers"]
                break


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
        device: Optional[str] = typer.Option(None, help="torch device (default: cuda when there is one, else cpu)"),
        out: Path = typer.Option(Path("runs/eval"), help="folder for <run>.json results and the plots"),
        name: Optional[str] = typer.Option(None, help="run name (default from method, config, routers, limit and "
                                           "model: everything that changes the result)"),
        overwrite: bool = typer.Option(False, help="replace a results file that holds a run with other settings "
                                       "(default: refuse, nothing is lost)"),
        data: Optional[Path] = typer.Option(None, help="shared data folder (default $RETROFIT_DATA or ../shared/data)"),
        plot: bool = typer.Option(True, help="write plots over every run in --out"),
        plot_dir: Optional[Path] = typer.Option(None, help="folder for the plots (default: --out)"),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads (1 is much faster on a busy machine)"),
    ):
        """Evaluate the base model or a retrofit method on offline lm-eval tasks; results JSON per run + plots."""
        _threads(threads)
        from retrofit.artifacts import ArtifactError
        from retrofit.core.data import TaskDataError
        from retrofit.eval.plots import plot_runs
        from retrofit.eval.runner import RunExistsError, evaluate, load_runs
        from retrofit.eval.tasks import resolve_task_names

        device = _check_device(device or _default_device())
        try:
            resolve_task_names(tasks)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

        cfg = {**_read_method_config(method_config), **_parse_sets(set_)}
        if method is None and method_config is not None:
            method = Path(method_config).stem  # configs/methods/<key>.yaml
        if plan is not None:
            if method is None:
                method = "drllm"
            cfg["plan"] = plan
        if (skip_bias or cfg) and method is None:
            raise typer.BadParameter("--skip-bias / --set / --plan need --method (e.g. --method drllm)")
        if method is not None:  # config mistakes (--set num_windows=true) are one-line errors, before any model loads
            from retrofit.methods import build_config, get_method

            try:
                cls = get_method(method).config_cls
                for sb in skip_bias or [None]:
                    build_config(cls, {k: v for k, v in {**cfg, "skip_bias": sb}.items()
                                       if k != "plan" and not (k == "skip_bias" and v is None)})
            except (KeyError, TypeError, ValueError, NotImplementedError) as e:
                raise typer.BadParameter(str(e).strip('"')) from None
        lim = int(limit) if limit is not None and float(limit).is_integer() and limit >= 1 else limit
        command = "retrofit eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else None
        knobs = skip_bias or [None]
        for sb in knobs:
            c = dict(cfg)
            if sb is not None:
                c["skip_bias"] = sb
            run_name = name if name and len(knobs) == 1 else (f"{name}_skip_bias{sb}" if name else None)
            try:
                evaluate(tasks, model=model, method=method, routers=str(routers) if routers else None, config=c,
                         limit=lim, batch_size=batch_size, device=device, out=out, name=run_name, data=data,
                         command=command, overwrite=overwrite)
            except (RunExistsError, TaskDataError, ArtifactError, FileNotFoundError, FloatingPointError) as e:
                raise typer.BadParameter(str(e)) from None
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

    @app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                              "help_option_names": []})
    def lm_eval_cmd(ctx: typer.Context):
        """lm-eval's own CLI (`retrofit lm-eval --help` / `retrofit lm-eval run --help` show its help) with the
        `retrofit` model registered and the offline tasks on the include path:
        retrofit lm-eval run --model retrofit --model_args pretrained=default,method=drllm,routers=DIR --tasks
        retrofit_arc_easy. --device defaults to the device that exists (cuda, else cpu); the results table adds
        each task's mean_layers_executed and layer_fraction."""
        import os
        import tempfile

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import lm_eval

        import retrofit.eval.lm_eval_model as lm_model  # registers --model retrofit
        from lm_eval.__main__ import cli_evaluate

        from retrofit.eval.tasks import render_tasks

        args = list(ctx.args)
        if len(args) > 1 and args[0] not in ("run", "ls", "validate"):
            args.insert(0, "run")  # lm-eval's own backward compatibility: options without a subcommand = run
        if len(args) > 1 and not {"-h", "--help"} & set(args):
            if args[0] == "run":
                dev = next((a.split("=", 1)[1] for a in args if a.startswith("--device=")), None)
                if dev is None and "--device" in args and args.index("--device") + 1 < len(args):
                    dev = args[args.index("--device") + 1]
                if dev is None:
                    args += ["--device", _default_device()]
                else:
                    _check_device(dev)
            if "--include_path" not in args:
                args += ["--include_path", str(render_tasks(Path(tempfile.mkdtemp(prefix="retrofit_tasks_"))))]
        sys.argv = ["lm_eval", *args]
        orig = lm_eval.simple_evaluate

        def simple_evaluate(*a, **kw):  # lm-eval's CLI imports it from the package when it runs
            lm_model.COLLECT = []
            try:
                res = orig(*a, **kw)
                if isinstance(res, dict):
                    add_compute_metrics(res, lm_model.COLLECT)
                return res
            finally:
                lm_model.COLLECT = None

        lm_eval.simple_evaluate = simple_evaluate
        try:
            cli_evaluate()
        finally:
            lm_eval.simple_evaluate = orig
