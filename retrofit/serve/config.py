"""Serving configuration for the vLLM plugin (no vLLM import here, so it is testable anywhere).

A serve config says which Dr.LLM artifacts a server knows, which one requests get by default, and whether
requests may bring their own plan::

    {
      "plan": null,                      # one static plan for every request (the fast path), or null
      "artifacts": {"arc": "runs/routers_arc",            # name -> artifact folder (handle.save / retrofit train)
                    "arc-lean": {"path": "runs/routers_arc", "skip_bias": 0.5, "allow_repeat": false}},
      "default": "none",                 # what a request without retrofit arguments gets: an artifact name or "none"
      "allow_request_plans": false,      # may a request send its own plan ("retrofit_plan")?
      "num_layers": 30,                  # optional: the model's decoder layers (`retrofit serve` fills it in), so
                                         # the API front end can refuse a plan of the wrong length (HTTP 400)
      "sub_batch": true,                 # per-request mode: a layer's projections and MLP run only on the tokens
                                         # of the requests that execute it (false: every token, the skipping ones
                                         # kept as they were)
      "sub_batch_multiple": 1            # pad such a sub-batch with skipping tokens to a multiple of this many
    }                                    # tokens (for matrix kernels slow at odd sizes); all tokens: no split

It reaches vLLM as ``hf_overrides={"architectures": ["RetrofitLlamaForCausalLM"], "retrofit": {...}}`` or as the
environment variable ``RETROFIT_VLLM_CONFIG`` (a JSON string or the path of a JSON file); see docs/serve.md.

Per request (``SamplingParams.extra_args``; over HTTP ``vllm_xargs``): ``{"retrofit": "<name>" | "none"}`` and,
when allowed, ``{"retrofit_plan": "eeseee..."}`` (one letter per decoder layer: e execute, s skip, r repeat) or a
list of action names. Any other argument that looks like one of these (``retrofitt``, ``retrofit_plans``) is
refused, naming the right one, rather than ignored.

The API front end never sees the model config, so :func:`frontend_serve_config` finds the serve config where it
can: ``RETROFIT_VLLM_CONFIG``, else the ``--hf-overrides`` on this process's command line (the api_server's,
as ``retrofit serve`` starts it). A request whose arguments do not fit it is then refused with HTTP 400.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from retrofit.core import plans as _plans

ENV = "RETROFIT_VLLM_CONFIG"
REQUEST_KEYS = ("retrofit", "retrofit_plan")
_ARTIFACT_KEYS = {"path", "skip_bias", "repeat_bias", "allow_repeat"}
_TOP_KEYS = {"plan", "artifacts", "default", "allow_request_plans", "num_layers", "sub_batch", "sub_batch_multiple"}


class ServeConfigError(ValueError):
    """A vLLM serve config or a request's retrofit arguments are invalid."""


@dataclass
class ArtifactSpec:
    name: str
    path: str
    overrides: dict = field(default_factory=dict)


@dataclass
class ServeConfig:
    plan: list[str] | None = None
    artifacts: dict[str, ArtifactSpec] = field(default_factory=dict)
    default: str = "none"
    allow_request_plans: bool = False
    num_layers: int | None = None
    sub_batch: bool = True
    sub_batch_multiple: int = 1

    @property
    def static(self) -> bool:
        """One plan (or none) for every request: no per-request state, works with torch.compile."""
        return not self.artifacts and not self.allow_request_plans


def parse_plan(plan, num_layers: int | None = None) -> list[str]:
    """:func:`retrofit.core.plans.parse_plan` (lists, codes, letter strings; never files), errors as
    :class:`ServeConfigError`."""
    try:
        out = _plans.parse_plan(plan, num_layers)
    except (TypeError, ValueError) as e:
        raise ServeConfigError(str(e)) from None
    if not out:
        raise ServeConfigError("the plan is empty: give one action per decoder layer"
                               + (f" ({num_layers} layers)" if num_layers else ""))
    return out


def parse_serve_config(obj) -> ServeConfig:
    """Validate a serve config given as a dict, a JSON string or a path to a JSON file."""
    if isinstance(obj, (str, Path)):
        text = str(obj)
        if not text.lstrip().startswith("{"):
            p = Path(text).expanduser()
            if not p.is_file():
                raise ServeConfigError(f"{ENV}={text!r} is neither JSON nor an existing file")
            text = p.read_text()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ServeConfigError(f"the retrofit serve config is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ServeConfigError(f"the retrofit serve config must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _TOP_KEYS
    if unknown:
        raise ServeConfigError(f"unknown keys {sorted(unknown)} in the retrofit serve config; "
                               f"known: {sorted(_TOP_KEYS)}")
    num_layers = obj.get("num_layers")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                   or num_layers < 1):
        raise ServeConfigError(f"num_layers must be a positive integer (the model's decoder layers), "
                               f"got {num_layers!r}")
    plan = obj.get("plan")
    if plan is not None:
        plan = parse_plan(plan, num_layers)
        if "repeat" in plan:
            raise ServeConfigError("the vLLM plugin does not serve 'repeat' (a repeated layer needs its own "
                                   "KV-cache slot); use a skip/execute plan")
    arts = {}
    for name, spec in (obj.get("artifacts") or {}).items():
        if name == "none" or not isinstance(name, str) or not name:
            raise ServeConfigError(f"artifact name {name!r} is reserved or empty; pick another name")
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict) or "path" not in spec:
            raise ServeConfigError(f"artifact {name!r}: give a folder path or {{'path': ..., 'skip_bias': ...}}")
        bad = set(spec) - _ARTIFACT_KEYS
        if bad:
            raise ServeConfigError(f"artifact {name!r}: unknown keys {sorted(bad)}; known: {sorted(_ARTIFACT_KEYS)}")
        arts[name] = ArtifactSpec(name, str(Path(spec["path"]).expanduser()),
                                  {k: v for k, v in spec.items() if k != "path"})
    default = obj.get("default") or "none"
    if default != "none" and default not in arts:
        raise ServeConfigError(f"default {default!r} is not one of the artifacts {sorted(arts)} (or 'none')")
    if plan is not None and arts:
        raise ServeConfigError("give either a server-wide 'plan' or 'artifacts', not both "
                               "(a static plan can be an artifact: save a drllm handle with plan=[...])")
    allow = obj.get("allow_request_plans", False)
    if not isinstance(allow, bool):
        raise ServeConfigError(f"allow_request_plans must be true or false, got {allow!r}")
    sub_batch = obj.get("sub_batch", True)
    if not isinstance(sub_batch, bool):
        raise ServeConfigError(f"sub_batch must be true or false, got {sub_batch!r}")
    multiple = obj.get("sub_batch_multiple", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ServeConfigError(f"sub_batch_multiple must be a positive integer (tokens), got {multiple!r}")
    return ServeConfig(plan=plan, artifacts=arts, default=default, allow_request_plans=allow,
                       num_layers=num_layers, sub_batch=sub_batch, sub_batch_multiple=multiple)


def find_serve_config(hf_config=None) -> ServeConfig | None:
    """The serve config from the model config's ``retrofit`` field (hf_overrides) or the environment."""
    raw = getattr(hf_config, "retrofit", None) if hf_config is not None else None
    if raw is None and os.environ.get(ENV):
        raw = os.environ[ENV]
    return None if raw is None else parse_serve_config(raw)


@dataclass(frozen=True)
class RequestChoice:
    """What one request asked for: 'default', 'none', an artifact name, or an explicit plan."""

    kind: str  # default | none | artifact | plan
    name: str | None = None
    plan: tuple[str, ...] | None = None


def parse_request_args(extra_args, config: ServeConfig | None = None,
                       num_layers: int | None = None) -> RequestChoice:
    """Read a request's retrofit arguments; check names / plans against ``config`` when it is known."""
    extra_args = extra_args or {}
    check_request_keys(extra_args)
    if num_layers is None and config is not None:
        num_layers = config.num_layers
    name = extra_args.get("retrofit")
    plan = extra_args.get("retrofit_plan")
    if name is not None and plan is not None:
        raise ServeConfigError("give either 'retrofit' (an artifact name) or 'retrofit_plan', not both")
    if config is not None and config.plan is not None and (name is not None or plan is not None):
        key, value = ("retrofit", name) if name is not None else ("retrofit_plan", plan)
        raise ServeConfigError(f"this server runs one static plan for every request (started with --plan); it "
                               f"takes no per-request arguments, got {key!r}: {value!r}. To choose per request, "
                               "start it with --artifact NAME=FOLDER (a static plan can be an artifact) and/or "
                               "--request-plans")
    if plan is not None:
        if config is not None and not config.allow_request_plans:
            raise ServeConfigError("this server does not take per-request plans; start it with --request-plans "
                                   "('allow_request_plans': true in the retrofit serve config)")
        p = parse_plan(plan, num_layers)
        if "repeat" in p:
            raise ServeConfigError("'repeat' is not served by the vLLM plugin yet (a repeated layer needs its own "
                                   "KV-cache slot); use skip/execute plans, or the HF runtime for repeats")
        return RequestChoice("plan", plan=tuple(p))
    if name is None:
        return RequestChoice("default")
    if not isinstance(name, str):
        raise ServeConfigError(f"'retrofit' must be an artifact name or 'none', got {name!r}")
    if name == "none":
        return RequestChoice("none")
    if config is not None and name not in config.artifacts:
        raise ServeConfigError(f"unknown retrofit artifact {name!r}; this server has {sorted(config.artifacts)} "
                               "(or 'none')")
    return RequestChoice("artifact", name=name)


def _looks_like_ours(key) -> str | None:
    """The request key ``key`` was probably meant to be (``retrofitt`` -> ``retrofit``), or None."""
    if not isinstance(key, str) or key in REQUEST_KEYS:
        return None
    k = key.lower().replace("-", "_")
    close = difflib.get_close_matches(k, REQUEST_KEYS, n=1, cutoff=0.75)
    if close:
        return close[0]
    if k.startswith("retro"):
        return "retrofit_plan" if "plan" in k else "retrofit"
    return None


def check_request_keys(extra_args) -> None:
    """Refuse request arguments that look like retrofit's but are not (a typo would silently run the base
    model)."""
    for key in extra_args or {}:
        meant = _looks_like_ours(key)
        if meant is not None:
            raise ServeConfigError(f"unknown retrofit request argument {key!r}; did you mean {meant!r}? The "
                                   "retrofit arguments are 'retrofit' (an artifact name or 'none') and "
                                   "'retrofit_plan' (one letter per layer)")


def _argv_value(argv: list[str], flags: tuple[str, ...]) -> str | None:
    for i, a in enumerate(argv):
        for f in flags:
            if a == f and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(f + "="):
                return a[len(f) + 1:]
    return None


def is_vllm_server(argv: list[str] | None = None) -> bool:
    """Whether this process is vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server`` or
    ``vllm serve``)."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    first = argv[0].replace("\\", "/")
    return (first.endswith("vllm/entrypoints/openai/api_server.py")
            or (Path(first).name == "vllm" and len(argv) > 1 and argv[1] == "serve"))


def frontend_serve_config(argv: list[str] | None = None) -> tuple[ServeConfig | None, str]:
    """The serve config as the API front end can see it, and where it came from: ``RETROFIT_VLLM_CONFIG``, else
    the ``retrofit`` key of ``--hf-overrides`` on this process's command line, else ``(None, "")``. A config
    without ``num_layers`` gets it from ``--model``'s config.json when that folder is readable. Raises
    :class:`ServeConfigError` for a config that is there but invalid."""
    argv = sys.argv if argv is None else argv
    raw, source = os.environ.get(ENV), ENV
    overrides = _argv_value(argv, ("--hf-overrides", "--hf_overrides")) if is_vllm_server(argv) else None
    if overrides is not None:
        try:
            obj = json.loads(overrides)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "retrofit" in obj:
            raw, source = obj["retrofit"], "--hf-overrides"
    if raw is None:
        return None, ""
    cfg = parse_serve_config(raw)
    if cfg.num_layers is None:
        model = _argv_value(argv, ("--model",))
        if model is None and len(argv) > 2 and argv[1] == "serve":
            model = argv[2]
        try:
            cfg.num_layers = int(json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"])
        except (TypeError, OSError, ValueError, KeyError):
            pass
    return cfg, source
