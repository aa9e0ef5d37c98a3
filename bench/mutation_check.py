"""Mutation checks (issue 15): the eight listed bugs, each applied alone, must make a fast test fail.

Each mutation is applied to a *copy* of the repository (``git archive HEAD`` of retrofit/, tests/ and
pyproject.toml in a temporary folder; ``--worktree`` copies the working tree instead), never to the checkout
itself; the tests named for it run against the copy (``PYTHONPATH`` points at it, so it shadows the editable
install). The unmutated copy must pass the same tests first. A mutation whose source line is no longer found
is reported as such (the code moved: update the pattern), not as caught.

Writes ``bench/results/mutation.json``: ``listed_mutations_caught`` (mutation, caught, failing tests) and the
mutmut fields. The full mutmut campaign is separate and slow (``[tool.mutmut]`` in pyproject.toml, command in
BENCHMARKS.md); pass its ``mutmut export-cicd-stats`` file with ``--mutmut-stats`` to record its counts,
otherwise killed / survived / timeout / score stay null with the reason in ``mutmut_run``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mutation_check.py            # about a minute on one core
    OMP_NUM_THREADS=1 .venv/bin/python bench/mutation_check.py --only 4 7
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "mutation.json"

# The modules [tool.mutmut] mutates (pyproject.toml); kept equal to its only_mutate list.
MODULES = [
    "retrofit/methods/drllm/runtime.py",
    "retrofit/methods/drllm/router.py",
    "retrofit/core/hooks.py",
    "retrofit/search/evaluator.py",
    "retrofit/search/mcts.py",
    "retrofit/arch/gates.py",
    "retrofit/artifacts.py",
    "retrofit/kernels/misa.py",
]

# (number, the bug, file, exact source text, its mutated form, the tests that must catch it)
MUTATIONS = [
    ("1", "router training without class weights (weight=None in the training-loop focal loss call)",
     "retrofit/methods/drllm/train.py",
     "loss = focal_loss(lg.reshape(-1, 3), _flat(labels[b]), weight, cfg.gamma)",
     "loss = focal_loss(lg.reshape(-1, 3), _flat(labels[b]), None, cfg.gamma)",
     "tests/test_gaps_drllm_train.py"),
    ("2", "router training with focal gamma = 0 (training-loop focal loss call)",
     "retrofit/methods/drllm/train.py",
     "loss = focal_loss(lg.reshape(-1, 3), _flat(labels[b]), weight, cfg.gamma)",
     "loss = focal_loss(lg.reshape(-1, 3), _flat(labels[b]), weight, 0.0)",
     "tests/test_gaps_drllm_train.py"),
    ("3", "RoMA training does gradient ascent ((-loss).backward())",
     "retrofit/methods/roma/train.py",
     "                loss.backward()\n", "                (-loss).backward()\n",
     "tests/test_gaps_moe.py"),
    ("4", "misa_topk routes active_heads - 1 heads",
     "retrofit/kernels/misa.py",
     "idx = score.topk(active_heads, dim=-1)", "idx = score.topk(active_heads - 1, dim=-1)",
     "tests/test_gaps_misa.py"),
    ("5", "the MoE gates' weights left out of the fingerprint",
     "retrofit/artifacts.py",
     "(layer_digests[owner[id(p)]] if id(p) in owner else other).append(tensor_digest(p))",
     "(layer_digests[owner[id(p)]] if id(p) in owner else other).append(\"\" if name.endswith(\"gate.weight\") "
     "else tensor_digest(p))",
     "tests/test_gaps_moe.py"),
    ("6", "stats() counts a repeat as one block pass",
     "retrofit/methods/drllm/runtime.py",
     "(c[:, EXECUTE] + 2 * c[:, REPEAT])", "(c[:, EXECUTE] + c[:, REPEAT])",
     "tests/test_gaps_drllm_runtime.py"),
    ("7", "routers pool over left padding (the padding mask ignored when the window averages are built)",
     "retrofit/methods/drllm/runtime.py",
     "A, valid = window_matrix(mask.to(hidden.device), W)",
     "A, valid = window_matrix(torch.ones_like(mask, device=hidden.device), W)",
     "tests/test_gaps_drllm_runtime.py"),
    ("8", "a new KV cache object no longer starts a new request",
     "retrofit/core/hooks.py",
     "new = force or self.new or pkv is None or self._ref is None or self._ref() is not pkv",
     "new = force or self.new or pkv is None or self._ref is None",
     "tests/test_gaps_drllm_runtime.py"),
]


MUTMUT_COMMAND = ("OMP_NUM_THREADS=1 .venv/bin/mutmut run --max-children 2"
                  " && OMP_NUM_THREADS=1 .venv/bin/python bench/mutation_rerun.py"
                  " --kills bench/results/mutation_kills.json --out bench/results/mutation_rerun.json --apply"
                  " && .venv/bin/mutmut export-cicd-stats"
                  " && .venv/bin/python bench/mutation_survivors.py --out bench/results/mutation_survivors.json"
                  " && OMP_NUM_THREADS=1 .venv/bin/python bench/mutation_check.py"
                  " --mutmut-stats mutants/mutmut-cicd-stats.json --survivors bench/results/mutation_survivors.json")


def _now():
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _copy(dst: Path, worktree: bool) -> str:
    paths = ["retrofit", "tests", "pyproject.toml"]
    if worktree:
        import shutil

        for p in paths:
            src = REPO / p
            if src.is_dir():
                shutil.copytree(src, dst / p, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, dst / p)
        return "working tree"
    data = subprocess.run(["git", "archive", "HEAD", *paths], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        tf.extractall(dst)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()


def _pytest(root: Path, tests: list[str]) -> tuple[int, list[str], str]:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-rf",
                        *tests], cwd=root, env=env, capture_output=True, text=True)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", r.stdout, re.M)))
    return r.returncode, failed, r.stdout[-2000:] + r.stderr[-2000:]


def check(only=None, worktree=False) -> tuple[list[dict], str]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="retrofit_mutation_") as tmp:
        root = Path(tmp)
        source = _copy(root, worktree)
        probe = subprocess.run([sys.executable, "-c", "import retrofit; print(retrofit.__file__)"], cwd=root,
                               env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True)
        assert probe.stdout.strip().startswith(str(root)), f"the copy is not the imported retrofit: {probe.stdout}"
        todo = [m for m in MUTATIONS if not only or m[0] in only]
        tests = sorted({m[5] for m in todo})
        rc, failed, tail = _pytest(root, tests)
        if rc != 0:
            raise SystemExit(f"the unmutated copy fails its tests ({failed}); fix them first\n{tail}")
        for num, desc, path, old, new, test in todo:
            f = root / path
            src = f.read_text()
            if src.count(old) != 1:  # the code may have moved to another module: look for it once in the package
                hits = [p for p in sorted((root / "retrofit").rglob("*.py")) if p.read_text().count(old) == 1]
                if len(hits) == 1 and all(p.read_text().count(old) == 0 for p in (root / "retrofit").rglob("*.py")
                                          if p != hits[0]):
                    f, path = hits[0], str(hits[0].relative_to(root))
                    src = f.read_text()
            row = {"n": int(num), "mutation": desc, "file": path, "tests": test}
            if src.count(old) != 1:
                row.update(caught=False, failing_tests=[],
                           error=f"source text found {src.count(old)} times in {path}: the code moved, update it")
            else:
                f.write_text(src.replace(old, new))
                rc, failed, tail = _pytest(root, [test])
                f.write_text(src)
                row.update(caught=rc == 1 and bool(failed), failing_tests=failed)
                if rc not in (0, 1):
                    row["error"] = f"pytest exit code {rc}: {tail[-500:]}"
            rows.append(row)
            print(f"[{num}] {'caught' if row['caught'] else 'NOT CAUGHT'}: {desc} -> {row['failing_tests']}"
                  + (f" ({row['error']})" if row.get("error") else ""), flush=True)
    return rows, source


def _mutmut_version():
    try:
        from importlib.metadata import version

        return f"mutmut {version('mutmut')}"
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation numbers to check (default: all eight)")
    ap.add_argument("--worktree", action="store_true", help="copy the working tree instead of HEAD")
    ap.add_argument("--mutmut-stats", type=Path, help="mutants/mutmut-cicd-stats.json of a finished mutmut run")
    ap.add_argument("--mutmut-note", help="why there are no mutmut counts (kept in mutmut_run)")
    ap.add_argument("--survivors", type=Path,
                    help="bench/mutation_survivors.py's output: the survivors sorted into equivalent / GPU-only / gaps")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows, source = check(args.only, args.worktree)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.only and old.get("listed_mutations_caught"):
        keep = {r["n"]: r for r in old["listed_mutations_caught"]}
        keep.update({r["n"]: r for r in rows})
        rows = [keep[k] for k in sorted(keep)]
    res = {
        "issue": 15,
        "date": _now(),
        "source": source,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/mutation_check.py" + (" --worktree" if args.worktree
                                                                                   else ""),
        "listed_mutations_caught": rows,
        "all_listed_caught": all(r["caught"] for r in rows) and len(rows) == len(MUTATIONS),
        "modules": MODULES,
        "mutmut_command": MUTMUT_COMMAND,
    }
    if args.mutmut_stats:
        st = json.loads(args.mutmut_stats.read_text())
        killed, timeout = int(st["killed"]), int(st.get("timeout", 0))
        # a mutant no selected test reaches is not killed: it counts as surviving (mutmut lists it apart)
        survived = int(st["survived"]) + int(st.get("no_tests", 0))
        done = killed + survived + timeout + sum(int(st.get(k, 0)) for k in ("suspicious", "segfault", "skipped"))
        score = killed / max(1, killed + survived)
        finished = done >= int(st.get("total", done))
        res.update(tool=_mutmut_version(), killed=killed if finished else None,
                   survived=survived if finished else None, timeout=timeout if finished else None,
                   score=score if finished else None, mutmut_stats=st,
                   mutmut_run=f"from {args.mutmut_stats}" if finished else
                   f"partial: {done} of {st.get('total')} mutants run (from {args.mutmut_stats}); the counts so far "
                   f"are in mutmut_partial, the score stays null until the run ends")
        # a mutant that crashes the test process (mutmut: "segfault"; here the Triton interpreter writing out of
        # bounds) is detected, like a timeout, and listed apart from killed and survived as mutmut lists it
        res["segfault"] = int(st.get("segfault", 0))
        if not finished:
            res["mutmut_partial"] = {"mutants_run": done, "total": st.get("total"), "killed": killed,
                                     "survived_incl_no_tests": survived, "no_tests": int(st.get("no_tests", 0)),
                                     "timeout": timeout, "score_so_far": score}
    else:
        keys = ("tool", "killed", "survived", "timeout", "score", "mutmut_run", "mutmut_stats", "surviving_mutants")
        prev = {k: old[k] for k in keys if k in old}
        res.update({"tool": _mutmut_version() or "mutmut 3.8.1 (configured in pyproject.toml; not installed here)",
                    "killed": None, "survived": None, "timeout": None, "score": None,
                    "mutmut_run": "not run yet", **prev})
        if args.mutmut_note:
            res["mutmut_run"] = f"not run yet: {args.mutmut_note}"
    if args.survivors:
        sv = json.loads(args.survivors.read_text())
        by = sv["by_class"]
        res["surviving_mutants"] = {"file": str(args.survivors), "by_class": by, "reasons": sv["reasons"],
                                    "gaps_by_function": sv["gaps_by_function"]}
        if res.get("killed") is not None or res.get("mutmut_partial"):
            k = res["killed"] if res.get("killed") is not None else res["mutmut_partial"]["killed"]
            # equivalent mutants cannot be killed (behaviour unchanged): the score without them
            res["score_excluding_equivalent"] = k / max(1, k + sv["survivors"] - by.get("equivalent", 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
