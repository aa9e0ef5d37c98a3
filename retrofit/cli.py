"""The ``retrofit`` command line (typer).

Each area registers its own commands in ``<module>.register(app)`` so areas never edit this file;
see ``_COMMAND_MODULES``.

``retrofit --config FILE.yaml <command> ...`` takes option defaults from YAML files (``configs/`` holds the
project's: the embedded model, each method's defaults, tasks, budgets, the main job). A file's top-level keys
are commands (``eval:``, ``pipeline:``; a command group nests: ``steer: {fit: {...}}``), each a mapping of the
command's options (``train_examples`` or ``train-examples``) to values; a mapping given to a repeatable
``key=value`` option (``set: {skip_bias: 0.5}``) becomes its ``key=value`` list. Several ``--config`` files
merge in order; options on the command line win. Unknown commands and options are errors.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Routers for frozen pretrained language models (Dr.LLM, MoE rerouting, RoMA, steering, MISA).")

_COMMAND_MODULES = [
    "retrofit.search.cli",        # retrofit search / merge / optuna
    "retrofit.methods.drllm.cli",  # retrofit train
    "retrofit.eval.cli",          # retrofit eval / lm-eval / pipeline
    "retrofit.moe.cli",           # retrofit moefy / reroute / steer
    "retrofit.methods.roma.cli",  # retrofit roma
    "retrofit.methods.steer.cli",  # retrofit steer fit
    "retrofit.methods.misa.cli",  # retrofit misa ...
    "retrofit.serve.cli",         # retrofit serve
    "retrofit.pipeline",          # retrofit pipeline (the main job)
]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _defaults_for(cmd, data: Any, where: list[str], src: str) -> dict:
    """Check ``data`` against the click command ``cmd`` and return it as a ``default_map`` (click's option
    names)."""
    label = " ".join(["retrofit", *where])
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{src}: the entry for `{label}` must be a mapping, got {type(data).__name__}")
    if hasattr(cmd, "commands"):  # a command group (typer vendors its own click)
        out = {}
        for k, v in data.items():
            sub = cmd.commands.get(str(k))
            if sub is None:
                raise typer.BadParameter(f"{src}: `{label} {k}` is not a command; commands: "
                                         f"{', '.join(sorted(cmd.commands))}")
            out[str(k)] = _defaults_for(sub, v, [*where, str(k)], src)
        return out
    names = {}
    for p in cmd.params:
        names[p.name] = p
        for opt in getattr(p, "opts", []):
            names[opt.lstrip("-").replace("-", "_")] = p
    out = {}
    for k, v in data.items():
        p = names.get(str(k).replace("-", "_"))
        if p is None or p.name == "help":
            raise typer.BadParameter(f"{src}: `{label}` has no option {k!r}; options: "
                                     f"{', '.join(sorted(q.name for q in cmd.params if q.name != 'help'))}")
        if isinstance(v, dict) and getattr(p, "multiple", False):
            v = [f"{a}={b if isinstance(b, str) else json.dumps(b)}" for a, b in v.items()]
        out[p.name] = v
    return out


def load_cli_config(paths, group) -> dict:
    """The merged, checked ``default_map`` of YAML config files for the command group ``group``."""
    import yaml

    data: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise typer.BadParameter(f"config file {path} not found")
        try:
            obj = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise typer.BadParameter(f"{path}: not valid YAML ({e})") from None
        obj = obj or {}
        _defaults_for(group, obj, [], str(path))  # each file is checked on its own, so errors name it
        data = _merge(data, obj)
    return _defaults_for(group, data, [], "config")


@app.callback()
def _main(ctx: typer.Context,
          config: Optional[list[Path]] = typer.Option(None, "--config", help="YAML file of option defaults per "
                                                      "command (e.g. configs/pipeline.yaml); repeatable")):
    """Routers for frozen pretrained language models (Dr.LLM, MoE rerouting, RoMA, steering, MISA)."""
    if config:
        ctx.default_map = _merge(ctx.default_map or {}, load_cli_config(config, ctx.command))


@app.command("default-model")
def default_model():
    """Convert (once) and print the folder of the embedded default model, SmolLM2-135M-Instruct."""
    from retrofit.models import default_model_dir

    typer.echo(str(default_model_dir()))


@app.command("info")
def info():
    """List the methods and model families this retrofit supports."""
    import retrofit

    typer.echo(f"retrofit {retrofit.__version__}")
    typer.echo("methods:  " + ", ".join(retrofit.available_methods()))
    typer.echo("families: " + ", ".join(retrofit.supported_families()))


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:  # parent package absent
        return False


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user gave something wrong (a model, an artifact, a data file, a plan): the
    command line prints them as one line and exits 2, without a traceback."""
    from retrofit.arch import UnsupportedModelError
    from retrofit.artifacts import ArtifactError
    from retrofit.core.data import SearchFileError, TaskDataError
    from retrofit.models import ModelLoadError

    return ModelLoadError, UnsupportedModelError, ArtifactError, TaskDataError, SearchFileError


def _one_line_errors(callback):
    """Wrap a command so that a user mistake raised deep inside it is a usage error (exit 2, one line)."""
    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except _user_errors() as e:
            raise typer.BadParameter(str(e).strip('"')) from None

    return run


def _wrap_commands(typer_app: typer.Typer) -> None:
    for c in typer_app.registered_commands:
        if c.callback is not None and not getattr(c.callback, "_retrofit_wrapped", False):
            c.callback = _one_line_errors(c.callback)
            c.callback._retrofit_wrapped = True
    for g in typer_app.registered_groups:
        if g.typer_instance is not None:
            _wrap_commands(g.typer_instance)


for _mod in _COMMAND_MODULES:
    if _has(_mod):
        importlib.import_module(_mod).register(app)
_wrap_commands(app)


if __name__ == "__main__":
    app()
