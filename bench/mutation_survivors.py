"""Sort mutmut's surviving mutants (issue 15) into equivalent ones (behaviour unchanged), ones only a GPU run can
kill, and real gaps, each with the reason.

Run it in the folder where ``mutmut run`` ran (it reads ``mutants/`` and ``pyproject.toml`` there):

    cd <checkout> && .venv/bin/python bench/mutation_survivors.py --out bench/results/mutation_survivors.json

A mutant counts as *equivalent* only through one of the rules below, each a statement about the code that can
be checked by reading the diff: a rule names the functions where it holds (for example "the tensor is 2-D
there, so dim=+1 is dim=-1") and matches nothing else, or through an entry of ``bench/mutation_equivalent/*.json``
(one line of one function, before and after, with the argument). *GPU only*: a copy to the CPU, whose change shows
only for tensors on another device (a meta-device model cannot be copied, so no CPU test can tell). A dropped
``device=`` or ``dtype=`` argument is no longer explained: tests under another default device or dtype kill it.
Everything else is listed as a gap, with its diff, so the next test written can aim at it.
``mutation_check.py --survivors`` records the summary.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

# where a tensor's rank makes dim=+1 the same as dim=-1 (all 2-D: [rows, keys] scores, [tokens, experts] gate
# logits, [rows, 3] router logits, [queries, heads] moment-router scores)
_TWO_D = ("routed_topk_torch", "routed_topk", "_fwd_softmax_renorm", "_fwd_sigmoid_grouped", "decide",
          "moment_route", "route_heads")
# where topk's result is used as a set of indices (scattered into a mask, gathered and re-ranked, compared as a
# set by the attention that reads it), so its order does not matter
_TOPK_AS_SET = ("routed_topk_torch", "routed_topk", "_fwd_sigmoid_grouped")
# functions whose loop chunk sizes only split the work (every chunk computes its rows from scratch)
_CHUNKED = ("routed_topk_torch", "moment_route", "misa_topk", "dense_topk")


def _fn(name: str) -> str:
    base = name.rsplit(".", 1)[-1]
    base = re.sub(r"__mutmut_\d+$", "", base)
    if "ǁ" in base:  # a method: xǁClassǁname
        return base.split("ǁ")[-1]
    return base[2:] if base.startswith("x_") else base


def _changed(diff: str) -> tuple[str, str]:
    minus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " ".join(minus), " ".join(plus)


def _without(s: str, pat: str) -> str:
    out = re.sub(pat, "", s).replace(" ", "")
    while ",," in out or ",)" in out or "(," in out:
        out = out.replace(",,", ",").replace(",)", ")").replace("(,", "(")
    return out


def _norm(s: str) -> str:
    """A line compared without spaces and empty argument slots."""
    return _without(s, r"^$")


def _one(a: str, old: str, new: str) -> set[str]:
    """``a`` with one occurrence of ``old`` replaced by ``new`` (each occurrence in turn)."""
    return {a[:m.start()] + new + a[m.end():] for m in re.finditer(re.escape(old), a)}


def _drop_one(a: str, pat: str) -> set[str]:
    """``a`` without one match of ``pat`` (compared as by :func:`_without`)."""
    return {_norm(a[:m.start()] + a[m.end():]) for m in re.finditer(pat, a)}


# single lines where a mutant is equivalent for a reason particular to that line: (function, text of the
# original line, the mutated texts it may become (compared without spaces), reason)
def _cmp(a, old, new):
    return {_norm(x) for x in _one(a, old, new)}


_LINE_RULES = [
    ("moment_route", "bnd = _boundary_moments(k, key_valid, block_size)", lambda a: {"bnd=None"},
     "performance only: key_moments computes the same boundary sums itself when none are passed"),
    ("moment_route", "key_moments(k, key_valid, block_size, qpos[r0:r1] + 1, _boundary=bnd)",
     lambda a: _cmp(a, "_boundary=bnd", "_boundary=None") | _drop_one(a, r",?\s*_boundary=bnd")
     | _cmp(a, "key_moments(k, key_valid", "key_moments(k, None"),
     "performance only: with the boundary sums passed (made with key_valid) key_moments needs neither them nor "
     "its own key_valid"),
    ("moment_route", "sig = var.sqrt().clamp_min(", None,
     "the floor on sigma acts only where the keys' variance is zero; z then saturates and any floor far below "
     "the nonzero sigmas routes the same"),
    ("moment_route", "(cdf > linear_threshold)", lambda a: _cmp(a, "cdf > ", "cdf >= "),
     "a continuous value compared with a threshold it never equals"),
    ("_prefix_search", "if u < cfg.rollout_skip:", lambda a: _cmp(a, "u < ", "u <= "),
     "a uniform random draw never equals the threshold"),
    ("_prefix_search", "elif u < cfg.rollout_skip + cfg.rollout_repeat", lambda a: _cmp(a, "u < ", "u <= "),
     "a uniform random draw never equals the threshold"),
    ("routed_topk_torch", "if lo < Tc:", lambda a: _cmp(a, "<", "<="), "at lo == Tc the masked slice is empty"),
    ("routed_topk_torch", "and ncand < Tc", lambda a: _cmp(a, "ncand < Tc", "ncand <= Tc"),
     "at ncand == Tc the all-candidates branch above has already taken the chunk (continue)"),
    ("routed_topk_torch", "exact = scores.clone() if (hier and lin is not None) else scores",
     lambda a: _cmp(a, "(hier and lin is not None)", "(hier and lin is not None) or True")
     | _cmp(a, "(hier and lin is not None)", "(hier or lin is not None)"),
     "an extra copy where none is needed: the same values"),
    ("_fwd_sigmoid_grouped", "group_mask.scatter_(1, group_idx, 1)", lambda a: _cmp(a, "idx, 1)", "idx, 2)"),
     "the mask is read as .bool(): 2 is True"),
    ("_fwd_sigmoid_grouped", "keepdim=True) + 1e-20", lambda a: _cmp(a, "+ 1e-20", "- 1e-20"),
     "1e-20 is below the float32 resolution of a sum of top-k sigmoid scores (>= 1e-3 here)"),
    ("misa_topk", "lin = None", lambda a: {'lin=""'},
     "lin stays at this value only when every head is used, and then it is not read"),
    ("_chunk_rows", "", None, "a chunk size: it only splits the work"),
    ("guard_cache", "src = torch.where((src < 0) & ~ps.kept_mask", lambda a: _cmp(a, "(src < 0) &", "(src <= 0) &")
     | _cmp(a, "(src < 0) &", "(src < 1) &"), "a source of 0 is mapped to 0 again: the same row"),
    ("guard_cache", "local = torch.full((batch,), -1,", lambda a: _cmp(a, "-1,", "-2,"),
     "any negative marker works: only src < 0 is tested"),
]
_LOWER_LO = re.compile(r"lo = max\(qmin \+ 1, 0\)")

# Mutants explained one by one, after reading the code around them: bench/mutation_equivalent/*.json, each a
# list of {"function", "original", "mutated", "reason"} (the changed line before and after, compared without
# spaces). They match by function and text, not by mutmut's mutant number, so a renumbering keeps them and a
# changed line drops them (the mutant is then a gap again until someone reads it).
_EXPLAINED_DIR = Path(__file__).resolve().parent / "mutation_equivalent"


def _explained() -> dict[tuple[str, str, str], str]:
    out = {}
    for f in sorted(_EXPLAINED_DIR.glob("*.json")):
        for e in json.loads(f.read_text()):
            if not e.get("reason", "").strip():
                raise SystemExit(f"{f}: an entry without a reason: {e}")
            out[(e["function"], _norm(e["original"]), _norm(e["mutated"]))] = e["reason"]
    return out


_EXPLAINED = _explained()


def classify(name: str, status: str, diff: str) -> tuple[str, str]:
    """(class, reason): class is 'equivalent', 'gpu_only' or 'gap'."""
    fn = _fn(name)
    a, b = _changed(diff)
    if "ǁ_StepStateǁ__init__" in name:
        return "equivalent", "the pre-hook sets every field of the step state before a layer reads it (a handle's " \
                             "first forward is always a prefill, which sets the prefill fields too)"
    if a.replace('"-inf"', '"-INF"').replace('"inf"', '"INF"') == b:
        return "equivalent", "float() parses 'inf' in any letter case"
    if fn == "window_means" and "dtype=torch.long" in a and (
            a.replace("dtype=torch.long", "dtype=None") == b
            or _without(a, r",?\s*dtype=torch\.long") == _norm(b)):
        return "equivalent", "the mask is converted with .long() on the next line"
    if fn == "_decide" and "st.pool is None or" in a:
        return "equivalent", "performance only: the pooling cache lives for one step, whose input length is fixed; " \
                             "the mutant recomputes the same matrices"
    if fn == "_decide" and "hidden.dtype == torch.float32" in a and "and False" in b:
        return "equivalent", ".float() of a float32 tensor is the tensor itself"
    if '.to("cpu", ' in a and b in _one(a, '.to("cpu", ', ".to(None, ") | _one(a, '.to("cpu", ', ".to("):
        return "gpu_only", "the copy to the CPU matters only for a model on a GPU (hashing a CUDA tensor's .numpy() " \
                           "raises); on the CPU the tensor is there already"
    if a.replace('.to("cpu")', ".to(None)") == b:
        return "gpu_only", ".to(None) keeps the device: the tensors are on the CPU already in these runs (for a " \
                           "model on a GPU the copy to the CPU matters)"
    why = _EXPLAINED.get((fn, _norm(a), _norm(b)))
    if why:
        return "equivalent", why
    for f, text, variants, why in _LINE_RULES:
        if fn == f and text in a and (variants is None or _norm(b) in variants(a)):
            return "equivalent", why
    if fn == "routed_topk_torch" and _LOWER_LO.search(a) and (b in _one(a, "qmin + 1", "qmin - 1")):
        return "equivalent", "lo only skips columns every query of the chunk sees; a smaller lo masks the same keys"
    if fn in _TWO_D and (b in _one(a, "dim=-1", "dim=+1") | _one(a, "(-1", "(+1")):
        return "equivalent", "the tensor is 2-D here, so dimension +1 is dimension -1"
    if re.search(r"\.topk\(|torch\.topk\(", a) and _norm(b) in _drop_one(a, r",?\s*dim=-1"):
        return "equivalent", "dim=-1 is topk's default"
    if fn in _TWO_D and "softmax(" in a and _norm(b) in _drop_one(a, r",?\s*dim=-1") | \
            {_norm(x) for x in _one(a, "dim=-1", "dim=None")}:
        return "equivalent", "softmax's implicit dimension of a 2-D tensor is the last"
    if fn in _TOPK_AS_SET and ("sorted=" in a) and (b in _one(a, "sorted=False", "sorted=True")
                                                    or _norm(b) in _drop_one(a, r",?\s*sorted=False")):
        return "equivalent", "topk's order is not used: its indices are used as a set"
    if fn in _CHUNKED and "chunk" in a + b and (
            re.sub(r"chunk: int = 256", "chunk: int = 257", a) == b or "range(0, S, )" in b
            or a.replace("chunk=chunk", "chunk=None") == b or _without(a, r",?\s*chunk=chunk") == _norm(b)):
        return "equivalent", "the chunk size only splits the work; every chunk computes its rows from scratch"
    if "json.dumps(" in a and re.sub(r"indent=\d+|sort_keys=\w+", "", a).replace(" ", "").replace(",)", ")") == \
            re.sub(r"indent=\w+|sort_keys=\w+", "", b).replace(" ", "").replace(",)", ")"):
        return "equivalent", "JSON layout only (indent / key order): the same JSON is read back"
    return "gap", "not explained: a behaviour no test pins down yet"


def survivors(root: Path) -> list[dict]:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    out = []
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        src = meta.relative_to(root / "mutants").with_suffix("")
        m = SourceFileMutationData(path=src)
        m.load()
        for name, code in m.exit_code_by_key.items():
            status = status_by_exit_code[code]
            if status not in ("survived", "no tests"):
                continue
            diff = get_diff_for_mutant(name, path=src)
            cls, why = classify(name, status, diff)
            out.append({"mutant": name, "status": status, "class": cls, "reason": why,
                        "diff": "\n".join(ln for ln in diff.splitlines() if ln[:1] in "+-" and ln[:3] not in
                                          ("+++", "---"))})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = survivors(Path.cwd())
    by = Counter(r["class"] for r in rows)
    gaps = Counter(r["mutant"].rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0] for r in rows if r["class"] == "gap")
    res = {"survivors": len(rows), "by_class": dict(by), "gaps_by_function": dict(gaps.most_common()),
           "reasons": dict(Counter(r["reason"] for r in rows if r["class"] != "gap")), "mutants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "mutants"}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
