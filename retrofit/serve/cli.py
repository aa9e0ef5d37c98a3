"""`retrofit serve`: vLLM's OpenAI-compatible server with retrofit artifacts (docs/serve.md)."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def serve(
        ctx: typer.Context,
        model: str = typer.Option("default", "--model", help="'default' (SmolLM2-135M-Instruct) or a local HF folder"),
        artifact: list[str] = typer.Option([], "--artifact", "-a",
                                           help="NAME=FOLDER of a drllm artifact (repeatable); routers are served "
                                                "with repeat masked"),
        default: str = typer.Option("none", "--default", help="artifact for requests that name none, or 'none'"),
        plan: str = typer.Option(None, "--plan", help="one static plan for every request (e/s per layer): the "
                                                      "compiled fast path; excludes --artifact"),
        request_plans: bool = typer.Option(False, "--request-plans/--no-request-plans",
                                           help="let requests send their own plan (vllm_xargs retrofit_plan)"),
        host: str = typer.Option("127.0.0.1"),
        port: int = typer.Option(8000),
        dtype: str = typer.Option("float32"),
        max_model_len: int = typer.Option(2048),
        served_model_name: str = typer.Option(None, "--served-model-name",
                                              help="the model name clients send; default: the model folder's name "
                                                   "(smollm2-135m-instruct for the default model)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="check the model, plan and artifacts, print the vLLM "
                                                              "command and exit"),
    ):
        """Start `python -m vllm.entrypoints.openai.api_server` with the retrofit plugin.

        Extra arguments after the options go to vLLM unchanged. Requests choose per call with
        ``extra_body={"vllm_xargs": {"retrofit": "NAME"}}`` (or "none"); see docs/serve.md. Before vLLM starts,
        the model folder, the plan and every artifact are checked (files, NaN tensors, method, plan length,
        repeat, router shapes, base-model fingerprint); a problem is a one-line error (exit 2).
        """
        from retrofit.artifacts import ArtifactError, read_meta
        from retrofit.serve.check import check_server_setup, model_shape, servable_method
        from retrofit.serve.config import ServeConfigError, parse_serve_config
        from retrofit.serve.launch import retrofit_architecture, server_command, server_env

        if plan is not None:
            given = [o for o, v in (("--artifact", artifact), ("--request-plans", request_plans),
                                    (f"--default {default}", default != "none")) if v]
            if given:
                raise typer.BadParameter(f"--plan serves one static plan for every request and excludes "
                                         f"{', '.join(given)}; drop --plan, or save the plan as an artifact "
                                         "(retrofit.attach(model, 'drllm', plan=...).save(FOLDER)) and serve it with "
                                         "--artifact NAME=FOLDER", param_hint="--plan")
        if model == "default":
            from retrofit.models import default_model_dir

            model = str(default_model_dir())
        elif not (Path(model) / "config.json").is_file():
            raise typer.BadParameter(f"{model!r} is not a model folder with a config.json; give 'default' or a "
                                     "local Hugging Face model folder", param_hint="--model")
        arts = {}
        for a in artifact:
            name, sep, path = a.partition("=")
            if not sep or not name or not path:
                raise typer.BadParameter(f"{a!r}: use NAME=FOLDER", param_hint="--artifact")
            if name in arts:
                raise typer.BadParameter(f"artifact name {name!r} is given twice", param_hint="--artifact")
            try:
                meta = read_meta(path)
                servable_method(name, path, meta)  # a reroute / steer artifact: said before the model's faults
                cfg = meta["config"]
            except ArtifactError as e:
                raise typer.BadParameter(f"{name}: {e}", param_hint="--artifact") from None
            spec = {"path": str(Path(path).resolve())}
            if cfg.get("allow_repeat", False) and cfg.get("plan") is None:  # routers: serve with repeat masked
                spec["allow_repeat"] = False
            arts[name] = spec
        try:
            retrofit_architecture(model)
            _, num_layers, _ = model_shape(model)
        except (ServeConfigError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--model") from None
        cfg = {"artifacts": arts, "default": default, "allow_request_plans": request_plans}
        if plan is not None:
            cfg = {"plan": plan}
        cfg["num_layers"] = num_layers
        try:
            parse_serve_config(cfg)
            lines = check_server_setup(model, cfg)
        except (ServeConfigError, ArtifactError) as e:
            raise typer.BadParameter(str(e), param_hint="--plan" if plan is not None else "--artifact") from None
        if served_model_name is None:
            served_model_name = Path(model).name
        cmd = server_command(model, cfg, port, host=host, dtype=dtype, max_model_len=max_model_len,
                             extra=list(ctx.args), served_model_name=served_model_name)
        for line in lines:
            typer.echo(f"retrofit serve: {line}", err=True)
        typer.echo(f"retrofit serve: clients send model={served_model_name!r}", err=True)
        typer.echo(" ".join(cmd if not dry_run else [c if " " not in c else repr(c) for c in cmd]))
        if dry_run:
            return
        os.environ.update(server_env())
        os.execv(cmd[0], cmd)
