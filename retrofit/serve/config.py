"""Serving configuration for the vLLM plugin (no vLLM import here, so it is testable anywhere).

A serve config says which Dr.LLM artifacts a server knows, which one requests get by default, and whether
requests may bring their own plan::

    {
      "plan": null,                      # one static plan for every request (the fast path), or null
      "artifacts": {"arc": "runs/routers_arc",            # name -> artifact folder (handle.save / retrofit train)
                    "arc-lean": {"path": "runs/routers_arc", "skip_bias": 0.5, "allow_repeat": false}},
      "default": "none",                 # what a request without retrofit arguments gets: an artifact name or "none"
      "allow_request_plans": false       # may a request send its own plan ("retrofit_plan")?
    }

It reaches vLLM as ``hf_overrides={"architectures": ["RetrofitLlamaForCausalLM"], "retrofit": {...}}`` or as the
environment variable ``RETROFIT_VLLM_CONFIG`` (a JSON string or the path of a JSON file); see docs/serve.md.

Per request (``SamplingParams.extra_args``; over HTTP ``vllm_xargs``): ``{"retrofit": "<name>" | "none"}`` and,
when allowed, ``{"retrofit_plan": "eeseee..."}`` (one letter per decoder layer: e execute, s skip, r repeat) or a
list of action names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from retrofit.core import plans as _plans

ENV = "RETROFIT_VLLM_CONFIG"
REQUEST_KEYS = ("retrofit", "retrofit_plan")
_ARTIFACT_KEYS = {"path", "skip_bias", "repeat_bias", "allow_repeat"}
_TOP_KEYS = {"plan", "artifacts", "default", "allow_request_plans"}


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

    @property
    def static(self) -> bool:
        """One plan (or none) for every request: no per-request state, works with torch.compile."""
        return not self.artifacts and not self.allow_request_plans


def parse_plan(plan, num_layers: int | None = None) -> list[str]:
    """:func:`retrofit.core.plans.parse_plan` (lists, codes, letter strings; never files), errors as
    :class:`ServeConfigError`."""
    try:
        return _plans.parse_plan(plan, num_layers)
    except (TypeError, ValueError) as e:
        raise ServeConfigError(str(e)) from None


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
    plan = obj.get("plan")
    if plan is not None:
        plan = parse_plan(plan)
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
    return ServeConfig(plan=plan, artifacts=arts, default=default, allow_request_plans=allow)


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
    name = extra_args.get("retrofit")
    plan = extra_args.get("retrofit_plan")
    if name is not None and plan is not None:
        raise ServeConfigError("give either 'retrofit' (an artifact name) or 'retrofit_plan', not both")
    if plan is not None:
        if config is not None and not config.allow_request_plans:
            raise ServeConfigError("this server does not take per-request plans; start it with "
                                   "'allow_request_plans': true in the retrofit serve config")
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

