"""The ``retrofit`` command line (typer).

Each area registers its own commands in ``<module>.register(app)`` so areas never edit this file;
see ``_COMMAND_MODULES``.
"""

from __future__ import annotations

import importlib
import importlib.util

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


for _mod in _COMMAND_MODULES:
    if _has(_mod):
        importlib.import_module(_mod).register(app)


if __name__ == "__main__":
    app()
