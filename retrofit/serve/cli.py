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
        dry_run: bool = typer.Option(False, "--dry-run", help="print the vLLM command and exit"),
    ):
        """Start `python -m vllm.entrypoints.openai.api_server` with the retrofit plugin.

        Extra arguments after the options go to vLLM unchanged. Requests choose per call with
        ``extra_body={"vllm_xargs": {"retrofit": "NAME"}}`` (or "none"); see docs/serve.md.
        """
        from retrofit.artifacts import ArtifactError, read_meta
        from retrofit.serve.config import ServeConfigError, parse_serve_config
        from retrofit.serve.launch import server_command

        if model == "default":
            from retrofit.models import default_model_dir

            model = str(default_model_dir())
        arts = {}
        for a in artifact:
            name, sep, path = a.partition("=")
            if not sep:
                raise typer.BadParameter(f"--artifact {a!r}: use NAME=FOLDER")
            try:
                cfg = read_meta(path)["config"]
            except ArtifactError as e:
                raise typer.BadParameter(f"--artifact {name}: {e}") from None
            spec = {"path": str(Path(path).resolve())}
            if cfg.get("allow_repeat", False) and cfg.get("plan") is None:  # routers: serve with repeat masked
                spec["allow_repeat"] = False
            arts[name] = spec
        cfg = {"artifacts": arts, "default": default, "allow_request_plans": request_plans}
        if plan:
            cfg = {"plan": plan}
        try:
            parse_serve_config(cfg)
        except ServeConfigError as e:
            raise typer.BadParameter(str(e)) from None
        cmd = server_command(model, cfg, port, host=host, dtype=dtype, max_model_len=max_model_len,
                             extra=list(ctx.args))
        typer.echo(" ".join(cmd if not dry_run else [c if " " not in c else repr(c) for c in cmd]))
        if dry_run:
            return
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.execv(cmd[0], cmd)
