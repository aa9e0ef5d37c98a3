"""Config dataclasses that check themselves, once for every method (:class:`ValidatedConfig`).

A method's config dataclass derives from :class:`ValidatedConfig`. Then:

* every scalar field is checked against its annotation before the class's own ``__post_init__`` runs
  (``int`` refuses ``True`` and ``2.0``, ``bool`` refuses ``"no"`` and ``1``, ``float`` refuses ``"0.5"`` and
  ``False``, ``str`` refuses non-strings; ``X | None`` also takes ``None``); container fields (plans, layer
  lists, expert maps) are parsed by the class's own ``__post_init__``;
* assigning a field later (``h.config.skip_bias = 0.5``) builds the changed config with every check again, and
  asks the owner (an attached method, through ``_on_change``) whether the change fits the model; only a valid
  change is applied, anything else raises ``ValueError`` and leaves the config as it was. Unknown names are
  refused.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing

__all__ = ["ValidatedConfig", "check_field_types"]

_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "True or False"),
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _scalar_check(tp):
    """(accepts(value), description) for a scalar annotation or ``scalar | None``; None for anything else."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2 and rest[0] in _SCALARS:
            ok, want = _SCALARS[rest[0]]
            return (lambda v: v is None or ok(v)), f"{want} or None"
    return None


def check_field_types(obj) -> None:
    """Raise ``ValueError`` naming the field when a scalar field of the dataclass ``obj`` is not of its type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check = _scalar_check(hints.get(f.name))
        if check is None:
            continue
        ok, want = check
        v = getattr(obj, f.name)
        if not ok(v):
            raise ValueError(f"{type(obj).__name__}.{f.name} must be {want}, got {v!r} ({type(v).__name__})")


class ValidatedConfig:
    """Base class of the method config dataclasses (see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if getattr(own, "_retrofit_checked", False):
            return

        def __post_init__(self):
            object.__setattr__(self, "_ready", False)
            check_field_types(self)
            if own is not None:
                own(self)
            object.__setattr__(self, "_ready", True)

        __post_init__._retrofit_checked = True
        cls.__post_init__ = __post_init__

    def __setattr__(self, name, value):
        if name.startswith("_") or not self.__dict__.get("_ready", False):
            object.__setattr__(self, name, value)
            return
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            raise AttributeError(f"{type(self).__name__} has no option {name!r}; options: {names}")
        new = dataclasses.replace(self, **{name: value})  # every check of the class, on the changed config
        on_change = self.__dict__.get("_on_change")
        if on_change is not None:
            on_change(new)
        for n in names:
            object.__setattr__(self, n, getattr(new, n))

    def __getstate__(self):  # copies and pickles keep the options, not the owner's hook
        return {k: v for k, v in self.__dict__.items() if k != "_on_change"}
