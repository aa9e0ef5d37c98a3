"""Hooks, defined once: which forward starts a new request, forward patching with exact restore, and the
snapshot that makes ``attach`` all or nothing.

* :class:`RequestTracker`: a forward whose KV cache object is new (or absent) starts a new request (a
  prefill); later forwards on the same cache object continue it (decode steps). A cache that the model creates
  inside a forward (``use_cache=True`` without one passed in) is adopted by the request after the forward.
  Used by the Dr.LLM runtime (plans fixed per request) and rerouting (deltas adapted per request).
* :func:`patch_forward` / :class:`ForwardPatch`: replace ``module.forward`` on the instance (the class and every
  other instance are untouched) and put back exactly what was there, an earlier instance attribute or none.
  Used by the MoE gate hook, MISA's indexers and the Dr.LLM layers.
* :class:`ModelSnapshot`: ``requires_grad`` flags, instance attributes (``forward`` included) and registered
  hooks of every module of a model, restored exactly by :meth:`ModelSnapshot.restore` (how
  :meth:`retrofit.methods.Method.attach` rolls back a failed attach).
"""

from __future__ import annotations

import types
import weakref
from typing import Callable

from torch import nn

__all__ = ["RequestTracker", "ForwardPatch", "patch_forward", "ModelSnapshot"]

_MISSING = object()
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


class RequestTracker:
    """New-request detection by the identity of the KV-cache object (held weakly).

    In a forward pre-hook call :meth:`start` with the forward's ``past_key_values``: it returns True when the
    forward starts a new request. In the matching forward hook call :meth:`finish` with the output.
    """

    def __init__(self):
        self._ref = None
        self.new = False  # whether the forward in progress started a request

    def start(self, past_key_values, force: bool = False) -> bool:
        """Whether this forward starts a request: no cache, a cache never seen, or ``force`` (e.g. the batch
        size changed). Remembers the cache of a new request."""
        pkv = past_key_values
        # self.new still set: the forward that started the last request raised before finish(), so that request
        # holds nothing usable (a retry on the same, still empty cache is a new request, not a decode step)
        new = force or self.new or pkv is None or self._ref is None or self._ref() is not pkv
        if new:
            self._ref = weakref.ref(pkv) if pkv is not None else None
        self.new = new
        return new

    def finish(self, output=None) -> bool:
        """After the forward: a request whose cache was made inside the forward adopts it. Returns whether
        the forward that just ended started a request."""
        was_new = self.new
        if was_new and self._ref is None:
            pkv = getattr(output, "past_key_values", None)
            if pkv is not None:
                self._ref = weakref.ref(pkv)
        self.new = False
        return was_new

    def reset(self) -> None:
        """Forget the current request (the next forward starts a new one)."""
        self._ref = None
        self.new = False


class ForwardPatch:
    """One replaced ``forward`` of one module instance; :meth:`restore` undoes it exactly (idempotent)."""

    __slots__ = ("module", "saved", "active")

    def __init__(self, module: nn.Module, forward: Callable, bind: bool = False):
        self.module = module
        self.saved = module.__dict__.get("forward", _MISSING)
        module.forward = types.MethodType(forward, module) if bind else forward
        self.active = True

    def restore(self) -> None:
        if not self.active:
            return
        if self.saved is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.saved
        self.active = False

    @property
    def original(self) -> Callable:
        """The forward that was in effect before the patch (an instance attribute or the class's, bound)."""
        if self.saved is not _MISSING:
            return self.saved
        return type(self.module).forward.__get__(self.module)


def patch_forward(module: nn.Module, forward: Callable, bind: bool = False) -> ForwardPatch:
    """Set ``module.forward`` (bound to the module first when ``bind``); keep the returned patch to restore it."""
    return ForwardPatch(module, forward, bind)


class ModelSnapshot:
    """What attaching a method may change on a model, recorded so it can be put back exactly: every parameter's
    ``requires_grad``, every module's instance attributes (by identity: a replaced ``forward``, a changed
    ``layer_idx``, an added attribute) and every module's registered hooks. Parameter *values* are not copied
    (retrofit never writes them; the tests check their fingerprint)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.grad = [(p, p.requires_grad) for p in model.parameters()]
        self.modules = []
        for m in model.modules():
            attrs = {k: v for k, v in m.__dict__.items() if k not in _HOOK_DICTS}
            hooks = {k: (d, list(d.keys())) for k in _HOOK_DICTS if isinstance(d := m.__dict__.get(k), dict)}
            self.modules.append((m, attrs, hooks, dict(m._parameters), dict(m._buffers), dict(m._modules)))

    def restore(self) -> None:
        for p, flag in self.grad:
            p.requires_grad_(flag)
        for m, attrs, hooks, params, buffers, children in self.modules:
            for k in [k for k in m.__dict__ if k not in attrs and k not in _HOOK_DICTS]:
                del m.__dict__[k]
            for k, v in attrs.items():
                if m.__dict__.get(k, _MISSING) is not v:
                    m.__dict__[k] = v
            for k, (d, keys) in hooks.items():
                for h in [h for h in d if h not in keys]:
                    del d[h]
            for store, saved in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
                if store.keys() != saved.keys() or any(store[k] is not v for k, v in saved.items()):
                    store.clear()
                    store.update(saved)

    def changes(self) -> list[str]:
        """What differs from the snapshot now (empty when the model is as recorded); for tests and errors."""
        out = []
        for p, flag in self.grad:
            if p.requires_grad != flag:
                out.append("requires_grad")
                break
        names = {id(m): n for n, m in self.model.named_modules()}
        for m, attrs, hooks, params, buffers, children in self.modules:
            n = names.get(id(m), "?")
            extra = [k for k in m.__dict__ if k not in attrs and k not in _HOOK_DICTS]
            changed = [k for k, v in attrs.items() if m.__dict__.get(k, _MISSING) is not v]
            new_hooks = [k for k, (d, keys) in hooks.items() if list(d.keys()) != keys]
            if extra or changed or new_hooks:
                out.append(f"{n or '<model>'}: added {extra}, changed {changed}, hooks {new_hooks}")
            for what, store, saved in (("parameters", m._parameters, params), ("buffers", m._buffers, buffers),
                                       ("modules", m._modules, children)):
                if store.keys() != saved.keys() or any(store[k] is not v for k, v in saved.items()):
                    out.append(f"{n or '<model>'}: {what} changed")
        return out
