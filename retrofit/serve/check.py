"""What a retrofit server will serve, checked without vLLM: the artifacts as the plugin loads them, and (for
``retrofit serve`` and ``--dry-run``) everything about them that can be checked before vLLM starts.

:class:`ServedArtifact` is the one loader of a served artifact (the vLLM plugin uses it in its worker):
the artifact's files (missing / corrupt / NaN tensors are :class:`~retrofit.artifacts.ArtifactError`), its
method (only Dr.LLM layer plans are served), its static plan (length, no repeat) or routers (shapes, repeat
masked). :func:`check_server_setup` also reads the model folder (decoder layers, hidden size, the checkpoint's
weights for the base-model fingerprint), so another model's artifact or a wrong-length plan is refused in the
CLI in seconds instead of inside vLLM's worker a minute later.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from retrofit.artifacts import (FORMAT_VERSION, ArtifactError, compare_fingerprint, fingerprint_of, fingerprinted,
                                load_artifact, read_meta)
from retrofit.core.plans import REPEAT, plan_codes
from retrofit.serve.config import ServeConfig, ServeConfigError, parse_serve_config


def check_static_plan(plan, num_layers: int, what: str = "the serve plan") -> None:
    """A server-wide plan must have one entry per decoder layer and no repeat."""
    if len(plan) != num_layers:
        raise ServeConfigError(f"{what} has {len(plan)} entries but the model has {num_layers} decoder layers")
    if "repeat" in plan:
        raise ServeConfigError(f"{what} has 'repeat', which the vLLM plugin does not serve (a repeated layer needs "
                               "its own KV-cache slot); use a skip/execute plan")


def servable_method(name: str, path, meta: dict):
    """The method class of an artifact the vLLM plugin can serve (Dr.LLM plans / routers), else ArtifactError."""
    from retrofit.methods import get_method
    from retrofit.methods.drllm import DrLLMConfig

    try:
        method_cls = get_method(meta["method"])
    except (KeyError, NotImplementedError) as e:
        raise ArtifactError(f"artifact {name!r} ({path}): {e}") from None
    if method_cls.prompt_policy != "prompt" or method_cls.config_cls is not DrLLMConfig:
        raise ArtifactError(f"artifact {name!r} ({path}) is a {meta['method']!r} artifact (prompt policy "
                            f"{method_cls.prompt_policy!r}); the vLLM plugin serves layer plans decided from the "
                            "prompt (drllm artifacts; MoE gate methods in vLLM are not built yet)")
    return method_cls


class ServedArtifact:
    """One artifact as served: a static plan and/or routers with their decision bias."""

    def __init__(self, name: str, path: str, overrides: dict, num_layers: int, hidden: int):
        from retrofit.methods.drllm import RouterBank

        meta, tensors = load_artifact(path, method=None)
        method_cls = servable_method(name, path, meta)
        cfg_dict = dict(meta["config"])
        cfg_dict.update(overrides)
        try:
            cfg = method_cls.config_cls(**cfg_dict)
        except (TypeError, ValueError) as e:
            raise ServeConfigError(f"artifact {name!r} ({path}): {e}") from None
        self.name, self.path, self.meta, self.config = name, path, meta, cfg
        self.plan = None
        self.routers = None
        self._tables = {}
        if cfg.plan is not None:
            if "repeat" in cfg.plan:
                raise ServeConfigError(f"artifact {name!r} has a static plan with 'repeat'; the vLLM plugin does "
                                       "not serve repeats (a repeated layer needs its own KV-cache slot)")
            if len(cfg.plan) != num_layers:
                raise ServeConfigError(f"artifact {name!r}: plan has {len(cfg.plan)} entries, "
                                       f"model {num_layers} layers")
            self.plan = torch.tensor(plan_codes(cfg.plan), dtype=torch.long)
        elif tensors:
            if cfg.allow_repeat:
                raise ServeConfigError(
                    f"artifact {name!r}: its routers may choose 'repeat', which the vLLM plugin does not serve. "
                    f"Serve it with {{'path': {path!r}, 'allow_repeat': false}} (repeat is then never chosen; "
                    "retrofit.attach(..., allow_repeat=False) gives the same plans in HF)")
            bank = RouterBank(num_layers, hidden, cfg.bottleneck)
            try:
                bank.load_state_dict(tensors, strict=True)
            except RuntimeError as e:
                raise ArtifactError(f"artifact {name!r}: router tensors do not match this model "
                                    f"({num_layers} layers, hidden size {hidden}): {e}") from e
            self.routers = bank.eval()
            bias = torch.tensor([cfg.skip_bias, 0.0, cfg.repeat_bias])
            bias[REPEAT] = float("-inf")
            self.bias = bias
        else:
            raise ArtifactError(f"artifact {name!r} ({path}) has neither routers nor a static plan")

    def tables(self, device) -> tuple:
        """The routers' decision tables on ``device`` (:func:`~retrofit.methods.drllm.decision_tables`,
        the HF runtime's), built once per device."""
        from retrofit.methods.drllm import decision_tables

        t = self._tables.get(device)
        if t is None:
            t = self._tables[device] = decision_tables(self.routers.router, self.bias, self.config.num_windows, device)
        return t

    def describe(self) -> str:
        if self.plan is not None:
            kept = int((self.plan != 0).sum())
            return f"static plan, {kept}/{len(self.plan)} layers executed"
        return f"routers (skip_bias {self.config.skip_bias:g}, repeat masked)"


def checkpoint_digests(model_dir: str | Path) -> dict[str, str]:
    """``{checkpoint name: tensor_digest}`` of every weight in a model folder's safetensors files, as the vLLM
    plugin computes them while vLLM loads the same files."""
    from safetensors import safe_open

    from retrofit.artifacts import tensor_digest

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"{model_dir} has no *.safetensors weights, so the artifacts' base-model fingerprint "
                            "cannot be checked before vLLM starts")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if fingerprinted(name):
                    out[name] = tensor_digest(st.get_tensor(name))
    return out


def model_shape(model_dir: str | Path) -> tuple[str, int, int]:
    """(architecture, decoder layers, hidden size) from a model folder's config.json."""
    p = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(p.read_text())
        return ((cfg.get("architectures") or ["LlamaForCausalLM"])[0], int(cfg["num_hidden_layers"]),
                int(cfg["hidden_size"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServeConfigError(f"{p}: cannot read the model's layer count and hidden size ({e}); --model must be "
                               "a Hugging Face model folder") from None


def check_server_setup(model_dir: str | Path, config: dict | ServeConfig, fingerprint: bool = True) -> list[str]:
    """Everything about a serve config that can be checked before vLLM starts; one line per artifact / plan
    describing what will be served. Raises :class:`ServeConfigError` or :class:`ArtifactError`."""
    arch, num_layers, hidden = model_shape(model_dir)
    cfg = config if isinstance(config, ServeConfig) else parse_serve_config(config)
    if cfg.num_layers is not None and cfg.num_layers != num_layers:
        raise ServeConfigError(f"the serve config says num_layers={cfg.num_layers} but {model_dir} has "
                               f"{num_layers} decoder layers")
    lines = []
    if cfg.plan is not None:
        check_static_plan(cfg.plan, num_layers, "--plan")
        lines.append(f"plan: {sum(a != 'skip' for a in cfg.plan)}/{num_layers} layers executed for every request")
    metas = {n: read_meta(a.path) for n, a in cfg.artifacts.items()}
    for n, a in cfg.artifacts.items():
        servable_method(n, a.path, metas[n])
    from retrofit.serve.launch import retrofit_architecture

    try:
        retrofit_architecture(str(model_dir))
    except ValueError as e:
        raise ServeConfigError(f"{model_dir}: {e}") from None
    if cfg.artifacts and fingerprint:  # before the shapes: "made for another model" says more
        from transformers import AutoConfig

        actual = fingerprint_of(arch, AutoConfig.from_pretrained(str(model_dir)), num_layers,
                                checkpoint_digests(model_dir))
        for n, a in cfg.artifacts.items():
            if metas[n]["format_version"] >= FORMAT_VERSION:  # older ones: load_artifact names the upgrade
                compare_fingerprint(metas[n]["base_model"], actual, a.path)
    served = {n: ServedArtifact(n, a.path, a.overrides, num_layers, hidden) for n, a in cfg.artifacts.items()}
    for n, s in served.items():
        lines.append(f"artifact {n}: {s.path}: {s.describe()}")
    if served:
        lines.append(f"default: {cfg.default}; per-request plans: {'allowed' if cfg.allow_request_plans else 'no'}")
    elif cfg.allow_request_plans:
        lines.append("per-request plans: allowed")
    return lines
