"""Layer plans: one action per decoder layer, ``"skip"`` (identity), ``"execute"`` (the block once) or
``"repeat"`` (the same block twice in a row).

Defined here once and imported by the Dr.LLM runtime, the search, the evaluation and the vLLM plugin:
the action names and codes (skip 0, execute 1, repeat 2), the letters of compact plan strings (``s``, ``e``,
``r``), :func:`validate_plan`, :func:`parse_plan` and the one cost measure, :func:`plan_passes` (decoder-block
passes; repeat counts 2; what ``stats()["mean_layers_executed"]`` averages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["ACTIONS", "SKIP", "EXECUTE", "REPEAT", "LETTERS", "validate_plan", "parse_plan", "plan_codes",
           "plan_letters", "plan_passes", "plan_fraction", "plan_unique_layers", "action_passes"]

ACTIONS = ("skip", "execute", "repeat")
SKIP, EXECUTE, REPEAT = 0, 1, 2
LETTERS = {"s": "skip", "e": "execute", "r": "repeat"}


def validate_plan(plan, num_layers: int | None = None, allow_repeat: bool = True) -> list[str]:
    """Check one plan (a sequence of action names or 0/1/2 codes) and return it as a list of action names.

    ``num_layers``: the plan must have exactly that many entries (None: any length); ``allow_repeat=False``
    refuses ``"repeat"``. Errors are ``ValueError`` naming the entry or the lengths.
    """
    if isinstance(plan, (str, bytes)) or not hasattr(plan, "__iter__"):
        raise ValueError(f"a plan is a list of actions {ACTIONS}, one per decoder layer; got {plan!r}")
    out = []
    for i, a in enumerate(plan):
        if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 3:
            a = ACTIONS[a]
        if a not in ACTIONS:
            bad = sorted({str(x) for x in plan if x not in ACTIONS and not (isinstance(x, int) and 0 <= x < 3)})
            raise ValueError(f"unknown plan actions {bad}: plan entry {i} is {a!r}; each entry must be one of "
                             f"{ACTIONS}")
        if a == "repeat" and not allow_repeat:
            raise ValueError(f"plan entry {i} is 'repeat' but allow_repeat=False")
        out.append(a)
    if num_layers is not None and len(out) != num_layers:
        raise ValueError(f"the plan has {len(out)} entries but the model has {num_layers} decoder layers "
                         "(one action per decoder layer)")
    return out


def _read_plan_file(p: Path):
    if p.is_dir():
        p = p / "retrofit.json"
    if not p.is_file():
        raise FileNotFoundError(f"plan file {p} not found")
    obj = json.loads(p.read_text())
    if isinstance(obj, dict):  # {"plan": [...]} (static-prune) or an artifact's retrofit.json
        obj = obj.get("plan", obj.get("config", {}).get("plan"))
    return obj


def parse_plan(plan: Any, num_layers: int | None = None, *, allow_repeat: bool = True,
               allow_files: bool = False) -> list[str] | None:
    """A plan from a list (names or codes), a JSON list string, or a string with one letter per layer
    (``s`` skip, ``e`` execute, ``r`` repeat; case-insensitive), e.g. ``"eeseer"``. ``None`` stays ``None``.

    With ``allow_files`` (command lines and lm-eval ``model_args``, never request arguments) a path to a JSON
    file (a list, ``{"plan": [...]}``) or an artifact folder (its ``retrofit.json``) is read too.
    """
    if plan is None:
        return None
    if isinstance(plan, (str, Path)):
        text = str(plan).strip()
        p = Path(text)
        if text.startswith("["):
            try:
                plan = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"plan={text!r} is not a valid JSON list ({e.msg})") from None
        elif allow_files and (p.suffix == ".json" or p.is_file() or p.is_dir()):
            plan = _read_plan_file(p)
            if plan is None:
                return None
        else:
            bad = sorted(set(text.lower()) - set(LETTERS))
            if not text:
                raise ValueError("the plan string is empty: give one letter per decoder layer (e execute, s skip, "
                                 "r repeat), e.g. 'eeseee...'")
            if bad:
                raise ValueError(f"plan string {text!r} has letters {bad}: give one letter per layer (e execute, "
                                 "s skip, r repeat), e.g. 'eeseee...', "
                                 + ("a JSON file " if allow_files else "") + "or a list of actions")
            plan = [LETTERS[c] for c in text.lower()]
    elif isinstance(plan, tuple):
        plan = list(plan)
    elif not isinstance(plan, list):
        raise TypeError(f"a plan is a list of actions or a letter string, not {type(plan).__name__}")
    return validate_plan(plan, num_layers, allow_repeat)


def plan_codes(plan) -> list[int]:
    """Action codes (skip 0, execute 1, repeat 2) of a plan of action names."""
    return [ACTIONS.index(a) for a in plan]


def plan_letters(plan) -> str:
    """The compact string of a plan: one letter per layer (``s``/``e``/``r``)."""
    return "".join(a[0] for a in plan)


def action_passes(action: str) -> int:
    """Block passes of one action: skip 0, execute 1, repeat 2."""
    return ACTIONS.index(action)


def plan_passes(plan) -> int:
    """The cost of a plan: decoder-block passes it runs (skip 0, execute 1, repeat 2)."""
    return sum(ACTIONS.index(a) for a in plan)


def plan_fraction(plan) -> float:
    """Block passes over the number of layers (1.0 = the base model's compute)."""
    return plan_passes(plan) / len(plan)


def plan_unique_layers(plan) -> int:
    """Layers that run at least once (the search's tie-break)."""
    return sum(a != "skip" for a in plan)
