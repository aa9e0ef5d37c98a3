"""Re-run surviving mutants against the tests written to kill them (issue 15), and record the kills in mutmut's
own results.

mutmut re-runs a mutant against every test that reaches its function (for the Dr.LLM runtime about 116 tests and
4 minutes each), so re-running hundreds of survivors after new tests is hours on a 2-core CPU. A mutant is killed
as soon as one test fails under it, so this runs, for each mutant, only the tests named for it in a kill map
(``{mutant name: [test node ids]}``, written while the tests were written), with mutmut's own switch
(``MUTANT_UNDER_TEST``) in ``mutants/``. A mutant whose tests fail is recorded as killed (pytest's exit code, 1
or 3, in its ``.meta`` file, as mutmut records it); one whose tests pass is left as it was (survived), and so is
any mutant not in the map. Before the run each named test must pass on the unmutated code there, so a broken
test kills nothing.

Run it in the folder where ``mutmut run`` ran, after copying the current tests into ``mutants/tests``:

    cd <checkout> && .venv/bin/python bench/mutation_rerun.py --kills bench/results/mutation_kills.json \\
        --out bench/results/mutation_rerun.json --apply

then ``mutmut export-cicd-stats`` and ``bench/mutation_survivors.py`` as usual. A run over some mutants only
(``--kills`` with part of the map) updates their entries in an existing ``--out`` file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _pytest(tests: list[str], mutant: str | None, cwd: Path, timeout: float) -> tuple[int, str]:
    env = dict(os.environ)
    env.pop("MUTANT_UNDER_TEST", None)
    if mutant is not None:
        env["MUTANT_UNDER_TEST"] = mutant
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in p.stdout.splitlines() if ln.startswith("FAILED ")]
    return p.returncode, failed[0] if failed else p.stdout.strip().splitlines()[-1:][0] if p.stdout.strip() else ""


def _module_of(mutant: str) -> str:
    """'retrofit.kernels.misa.x_recall__mutmut_3' -> 'retrofit/kernels/misa.py'."""
    mod = mutant.split(".x", 1)[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]
    return mod.replace(".", "/") + ".py"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=Path, required=True, help="JSON {mutant: [test node ids]}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--apply", action="store_true", help="write the kills into mutants/**/*.meta")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    root = Path.cwd() / "mutants"
    kills = json.loads(args.kills.read_text())
    tests = sorted({t for ts in kills.values() for t in ts})
    # every named test passes on the unmutated code (one run per file keeps this short)
    by_file = defaultdict(list)
    for t in tests:
        by_file[t.split("::")[0]].append(t)
    bad = {}
    for f, ts in by_file.items():
        code, what = _pytest(ts, None, root, args.timeout)
        if code != 0:
            bad[f] = what
    if bad:
        raise SystemExit(f"these tests do not pass on the unmutated code in {root}: {bad}")
    results = {}

    def one(m):
        t0 = time.monotonic()
        code, what = _pytest(kills[m], m, root, args.timeout)
        killed = code in (1, 3)
        return m, {"tests": kills[m], "exit_code": code, "killed": killed, "failing": what if killed else None,
                   "seconds": round(time.monotonic() - t0, 1)}

    with ThreadPoolExecutor(args.jobs) as ex:
        for i, (m, r) in enumerate(ex.map(one, sorted(kills)), 1):
            results[m] = r
            print(f"[{i}/{len(kills)}] {'killed ' if r['killed'] else 'survived'} {m} ({r['seconds']} s)", flush=True)
    if args.apply:
        from mutmut.mutation.data import SourceFileMutationData

        per_file = defaultdict(list)
        for m, r in results.items():
            if r["killed"]:
                per_file[_module_of(m)].append(m)
        for src, names in per_file.items():
            data = SourceFileMutationData(path=src)
            data.load()
            for m in names:
                if m not in data.exit_code_by_key:
                    raise SystemExit(f"{m} is not a mutant of {src} in {root}: re-generate mutants first")
                data.exit_code_by_key[m] = results[m]["exit_code"]
            data.save()
    # a re-run of some mutants updates their entries in an existing --out; the others stay as they were
    if args.out.exists():
        results = {**json.loads(args.out.read_text()).get("results", {}), **results}
    results = dict(sorted(results.items()))
    summary = {"mutants": len(results), "killed": sum(r["killed"] for r in results.values()),
               "not_killed": sorted(m for m, r in results.items() if not r["killed"]), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
