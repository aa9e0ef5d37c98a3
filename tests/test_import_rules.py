"""The dependency rule of docs/ARCHITECTURE.md, read from the source with ``ast`` (every import, also those
inside functions):

* bottom: ``core``, ``arch``, ``artifacts``, ``kernels`` import only each other (``core`` only itself);
* support: ``models``, ``testing``, ``moe`` import only the bottom and each other;
* ``methods`` never imports ``search``, ``eval`` or ``serve``; ``search`` never imports ``methods``, ``eval`` or
  ``serve``;
* ``eval`` and ``serve`` never import each other, and use a method only through its package
  (``retrofit.methods`` or ``retrofit.methods.<key>``, public names), not its inner modules;
* nothing imports a private name (or a private module) from another subpackage;
* the public API (``import retrofit``: attach, load) is for methods, eval and serve, not below them;
* the CLI, the pipeline and ``retrofit/__init__.py`` sit on top and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "retrofit"

BOTTOM = {"core", "arch", "artifacts", "kernels"}
SUPPORT = {"models", "testing", "moe"}
TOP = {"cli", "pipeline", "__init__", "__main__"}
ALLOWED = {
    "core": {"core"},
    "arch": BOTTOM, "artifacts": BOTTOM, "kernels": BOTTOM,
    **{s: BOTTOM | SUPPORT for s in SUPPORT},
    # "__init__": the public API (retrofit.attach / load), which methods' trainers and eval call
    "methods": BOTTOM | SUPPORT | {"methods", "__init__"},
    "search": BOTTOM | SUPPORT | {"search"},
    "eval": BOTTOM | SUPPORT | {"methods", "eval", "__init__"},
    "serve": BOTTOM | SUPPORT | {"methods", "serve", "__init__"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def area(module: str) -> str:
    """``retrofit.methods.drllm.train`` -> ``methods``; ``retrofit`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str, source: str, is_package: bool = False):
    """``(lineno, imported module, imported name or None)`` for every import in ``source``."""
    pkg = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                yield node.lineno, target, a.name


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The rule broken by each retrofit import of ``module`` (whose text is ``source``)."""
    me = area(module)
    out = []
    for lineno, target, name in imports(module, source, is_package):
        if target != "retrofit" and not target.startswith("retrofit."):
            continue
        full = f"{target}.{name}" if name else target
        # `from retrofit import methods` / `from retrofit.methods import drllm`: the imported name may be a module
        where = area(full if target == "retrofit" else target)
        where_msg = f"{module}:{lineno} imports {full}"
        if me not in TOP:
            allowed = ALLOWED.get(me)
            if allowed is None:
                out.append(f"{where_msg}: {me!r} has no place in the dependency rule (add it to ALLOWED)")
            elif where not in allowed:
                out.append(f"{where_msg}: {me!r} may not import {where!r}")
        if where != me:
            private = [p for p in full.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
            if private:
                out.append(f"{where_msg}: private name {private[0]!r} of another subpackage")
            if me in ("eval", "serve") and where == "methods" and len(target.split(".")) > 3:
                out.append(f"{where_msg}: {me} uses a method through its package (retrofit.methods.<key>), "
                           f"not its inner module {target}")
    return out


def test_the_tree_keeps_the_dependency_rule():
    found = []
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 40
    for path in files:
        found += violations(module_name(path), path.read_text(encoding="utf-8"), path.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module, source, rule", [
    ("retrofit.methods.drllm.train", "from retrofit.search.evaluator import PlanEvaluator", "may not import 'search'"),
    ("retrofit.methods.roma.train", "def f():\n    from retrofit.eval.runner import evaluate\n",
     "may not import 'eval'"),
    ("retrofit.methods.steer", "import retrofit.serve.config", "may not import 'serve'"),
    ("retrofit.search.run", "from retrofit.methods.drllm import DrLLM", "may not import 'methods'"),
    ("retrofit.search.mcts", "from ..methods import get_method", "may not import 'methods'"),
    ("retrofit.eval.runner", "from retrofit.serve.config import parse_plan", "may not import 'serve'"),
    ("retrofit.serve.vllm_model", "from retrofit.eval import tasks", "may not import 'eval'"),
    ("retrofit.serve.vllm_model", "from retrofit.methods.drllm.router import RouterBank", "inner module"),
    ("retrofit.methods.roma.train", "from retrofit.core.data import _read_jsonl", "private name '_read_jsonl'"),
    ("retrofit.core.data", "from retrofit.arch import get_adapter", "'core' may not import 'arch'"),
    ("retrofit.arch.gates", "from retrofit.methods import Method", "'arch' may not import 'methods'"),
    ("retrofit.moe.moefy", "from retrofit.search.tasks import load_task", "'moe' may not import 'search'"),
    ("retrofit.search.run", "import retrofit\nretrofit.attach", "'search' may not import '__init__'"),
])
def test_the_checker_catches_a_forbidden_import(module, source, rule):
    found = violations(module, source)
    assert found and any(rule in v for v in found), found


def test_allowed_imports_pass_the_checker():
    assert violations("retrofit.methods.roma.train", "from retrofit.core.data import tokenize_request") == []
    assert violations("retrofit.serve.vllm_model", "from retrofit.methods.drllm import RouterBank") == []
    assert violations("retrofit.search.evaluator", "from .tasks import Example\nfrom retrofit.arch import x") == []
    assert violations("retrofit.moe.cli", "from retrofit.moe.moefy import _complete") == []  # same subpackage
    assert violations("retrofit.pipeline", "from retrofit.search.run import search_examples\n"
                                           "from retrofit.eval.runner import evaluate") == []
