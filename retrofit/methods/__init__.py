"""Method registry (like lm-eval's model registry): each method is a subpackage that registers a
:class:`Method` under its key. ``retrofit.attach`` looks methods up here.

A method's folder shows its parts by file name: ``config.py`` (the validated config dataclass), the runtime
(the :class:`Method` subclass and the modules it adds), ``train.py`` where it trains, ``cli.py`` for its commands.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from retrofit.core.hooks import ModelSnapshot

__all__ = ["Method", "register_method", "get_method", "available_methods", "build_config", "PROMPT_POLICIES"]

# What a method may see of a scored (context, continuation) pair; read by the lm-eval model and the vLLM plugin.
PROMPT_POLICIES = {
    "prompt": "decides once per sequence from the prompt at prefill and keeps that decision for every later "
              "token (Dr.LLM's layer plans); a scorer must decide on the context alone and run every continuation "
              "of it under that decision (the handle offers last_plans and set_plan)",
    "context": "adapts per-sequence state on the context (rerouting's deltas); the state must be adapted on the "
               "context alone and held fixed while a continuation is scored (the handle offers adapt() and frozen())",
    "continuation": "acts token by token with no state carried across a sequence (RoMA, steering, MISA): a forward "
                    "over context + continuation is exactly what generation computes, so it may see both",
}

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
    """Class decorator: register a :class:`Method` subclass under ``key``. A key already taken by another class
    is refused (re-registering the same class, e.g. after a module reload, is allowed)."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({key!r}) decorates a Method subclass, not {cls!r}")
        old = _METHODS.get(key)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method key {key!r} is already registered to {old.__module__}.{old.__qualname__}; "
                             "pick another key")
        if cls.prompt_policy not in PROMPT_POLICIES:
            raise ValueError(f"{cls.__name__}.prompt_policy is {cls.prompt_policy!r}; declare one of "
                             f"{sorted(PROMPT_POLICIES)}")
        if not (isinstance(cls.config_cls, type) and dataclasses.is_dataclass(cls.config_cls)):
            raise TypeError(f"{cls.__name__}.config_cls must be a dataclass, got {cls.config_cls!r}")
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


class Method(abc.ABC):
    """One method attached to one model. This docstring is the contract every method keeps.

    Declared by the subclass (checked by :func:`register_method`):

    * ``config_cls``: a dataclass whose ``__post_init__`` validates every field (``build_config`` refuses
      unknown keys); ``key`` is set by :func:`register_method`.
    * ``prompt_policy``: what the method may see of a scored (context, continuation) pair, one of
      :data:`PROMPT_POLICIES` (``"prompt"``, ``"context"``, ``"continuation"``). The lm-eval model and the vLLM
      plugin read it; nothing else branches on method names.

    Lifecycle:

    * ``__init__(model, config, adapter)`` changes nothing on the model.
    * :meth:`attach` is all or nothing. It freezes the base model (``requires_grad=False``) and calls
      :meth:`_attach`, which installs the method's hooks in place (replaced forwards through
      :func:`retrofit.core.hooks.patch_forward`, module hooks). When anything raises, the model is put back
      exactly as it was (``requires_grad`` flags, every module's instance attributes, forwards included, and
      registered hooks: :class:`retrofit.core.hooks.ModelSnapshot`) and the error propagates. One method per
      key per model.
    * :meth:`detach` calls :meth:`_detach`, which removes everything :meth:`_attach` installed, and restores
      the ``requires_grad`` flags: the model is the base model again, bit for bit.
    * The base model's weights are never written, while attached or by training (methods train only what they
      add).

    To implement: :meth:`_attach` and :meth:`_detach`; optionally :meth:`state_tensors` (what
    :meth:`save` writes), :meth:`artifact_extra` and :meth:`stats`.
    """

    key: ClassVar[str] = "?"
    config_cls: ClassVar[type] = None
    prompt_policy: ClassVar[str] = "continuation"

    def __init__(self, model: nn.Module, config, adapter):
        self.model = model
        self.config = config
        self.adapter = adapter
        self.attached = False
        self._grad_flags: dict[str, bool] = {}

    # lifecycle ------------------------------------------------------------------------------------
    def attach(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> "Method":
        """Install the method on the model (see the class docstring: all or nothing)."""
        for other in getattr(self.model, "_retrofit_handles", None) or []:
            if other.key == self.key:
                raise RuntimeError(f"{self.key!r} is already attached to this model; detach() it first.")
        snapshot = ModelSnapshot(self.model)
        try:
            if getattr(self.model, "_retrofit_handles", None) is None:
                self.model._retrofit_handles = []
            self._grad_flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
            self.model.requires_grad_(False)
            self._attach(tensors, meta)
        except BaseException:
            try:
                self._detach()  # the method's own state (e.g. a shared gate hook's reference count)
            except Exception:
                pass
            snapshot.restore()  # the model exactly as before, whatever _attach or _detach left behind
            raise
        self.attached = True
        self.model._retrofit_handles.append(self)
        if hasattr(self.config, "_ready"):  # a ValidatedConfig: later changes are checked against this model too
            self.config._on_change = self._check_config_change
        return self

    def detach(self) -> nn.Module:
        """Remove the method; the model is the base model again."""
        if not self.attached:
            return self.model
        self._detach()
        self.config.__dict__.pop("_on_change", None)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        self.model._retrofit_handles.remove(self)
        self.attached = False
        return self.model

    def save(self, path) -> Path:
        """Write the artifact (safetensors + JSON with the base model's fingerprint) to the folder ``path``."""
        from retrofit.artifacts import save_artifact

        return save_artifact(path, self.key, dataclasses.asdict(self.config), self.state_tensors(), self.model,
                             extra=self.artifact_extra())

    # to implement ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def _attach(self, tensors: dict[str, torch.Tensor] | None, meta: dict | None) -> None:
        """Install hooks on ``self.model`` (frozen already), loading ``tensors`` from an artifact when given.
        May raise at any point: :meth:`attach` rolls the model back."""

    @abc.abstractmethod
    def _detach(self) -> None:
        """Remove everything :meth:`_attach` installed. Also called after a failed :meth:`_attach`, so it must
        cope with a partial attach (or raise: the model snapshot restores the model anyway)."""

    def _check_config_change(self, new) -> None:
        """Called with the changed config before ``handle.config.<option> = value`` takes effect while attached
        (the config has checked its own values already); raise ``ValueError`` when it does not fit the model."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save` writes (none for training-free methods)."""
        return {}

    def artifact_extra(self) -> dict:
        """Extra JSON fields for the artifact."""
        return {}

    def stats(self) -> dict:
        """What the method did since attach (layers executed, experts chosen, ...)."""
        return {}

    def __repr__(self):
        return f"<retrofit {self.key} on {type(self.model).__name__}, attached={self.attached}>"
