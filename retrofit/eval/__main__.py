"""``python -m retrofit.eval ...``: the same command as ``retrofit eval ...``.

``python -m retrofit.eval lm-eval ...`` runs lm-eval's own CLI with the ``retrofit`` model registered.
"""

import typer

from retrofit.eval.cli import register

app = typer.Typer(add_completion=False, no_args_is_help=True)
register(app)

if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] not in ("eval", "eval-plot", "static-prune", "lm-eval", "--help", "-h"):
        sys.argv.insert(1, "eval")  # `python -m retrofit.eval --tasks ...` means `eval`
    app()
