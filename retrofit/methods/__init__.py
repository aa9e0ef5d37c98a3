"""Method registry (like lm-eval's model registry): each method is a subpackage that registers a
:class:`Method` under its key. ``retrofit.attach`` looks methods up here."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch
from torch import nn

_METHODS: dict[str, type["Method"]] = {}
# Methods live in subpackages imported on first use, so `import retrofit` stays light.
_BUILTIN = {
    "drllm": "retrofit.methods.drllm",
    "reroute": "retrofit.methods.reroute",
    "roma": "retrofit.methods.roma",
    "steer": "retrofit.methods.steer",
    "misa": "retrofit.methods.misa",
}


def register_method(key: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls):
        cls.key = key
        _METHODS[key] = cls
        return cls
    return deco


def available_methods() -> list[str]:
    return sorted(set(_BUILTIN) | set(_METHODS))


def get_method(key: str) -> type["Method"]:
    if key not in _METHODS and key in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[key])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(_BUILTIN[key]):
                raise NotImplementedError(f"method {key!r} is not available in this build of retrofit") from e
            raise
    if key not in _METHODS:
        raise KeyError(f"unknown method {key!r}; available: {', '.join(available_methods())}")
    return _METHODS[key]


def build_config(config_cls, overrides: dict[str, Any], base: dict | None = None):
    """Make a validated config dataclass from a saved dict plus keyword overrides; unknown keys are errors."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    merged = dict(base or {})
    merged.update(overrides)
    unknown = sorted(set(merged) - names)
    if unknown:
        raise TypeError(f"{config_cls.__name__} got unknown option(s) {unknown}; valid options: {sorted(names)}")
    return config_cls(**merged)


class Method:
    """One attached method on one model. Subclasses implement ``_attach``/``_detach``/``state_tensors``.

    The base model is frozen while attached: its parameters get ``requires_grad=False`` (restored on
    detach) and are never written.
    """

    key: str = "?"
    config_cls: type = None

    def __init__(self, model: nn.Module, config, adapter):
        self.model = model
        self.config = config
        self.adapter = adapter
        self.attached = False
        self._grad_flags: dict[str, bool] = {}

    # lifecycle ------------------------------------------------------------------------------------
    def attach(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> "Method":
        if getattr(self.model, "_retrofit_handles", None) is None:
            self.model._retrofit_handles = []
        for other in self.model._retrofit_handles:
            if other.key == self.key:
                raise RuntimeError(f"{self.key!r} is already attached to this model; detach() it first.")
        self._grad_flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.model.requires_grad_(False)
        self._attach(tensors, meta)
        self.attached = True
        self.model._retrofit_handles.append(self)
        return self

    def detach(self) -> nn.Module:
        if not self.attached:
            return self.model
        self._detach()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        self.model._retrofit_handles.remove(self)
        self.attached = False
        return self.model

    def save(self, path) -> "Path":
        from retrofit.artifacts import save_artifact

        return save_artifact(path, self.key, dataclasses.asdict(self.config), self.state_tensors(), self.model,
                             extra=self.artifact_extra())

    # to implement ---------------------------------------------------------------------------------
    def _attach(self, tensors, meta):
        raise NotImplementedError

    def _detach(self):
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def artifact_extra(self) -> dict:
        return {}

    def stats(self) -> dict:
        return {}

    def __repr__(self):
        return f"<retrofit {self.key} on {type(self.model).__name__}, attached={self.attached}>"
