"""``retrofit eval``: lm-eval tasks through :class:`~retrofit.eval.lm_eval_model.RetrofitLM`, one task at a time,
with compute metrics next to accuracy, results written after every task (and resumed), and plots."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COMPUTE_KEYS = ("mean_layers_executed", "layer_fraction", "layers_saved", "prompts", "action_counts")
# what makes two runs' numbers comparable: a result file holds one run of exactly these
IDENTITY_KEYS = ("model", "method", "routers", "config", "limit")


class RunExistsError(FileExistsError):
    """The results file of a run name already holds another run (its identity differs)."""


def _offline():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def evaluate(tasks: str | list[str], model: str = "default", method: str | None = None,
             routers: str | None = None, config: dict[str, Any] | None = None, limit: int | float | None = None,
             batch_size: int = 16, device: str = "cpu", out: str | Path | None = None, name: str | None = None,
             data: str | Path | None = None, command: str | None = None, progress: bool = True, lm=None,
             overwrite: bool = False) -> dict:
    """Evaluate one retrofit configuration on offline tasks; returns the run record (also written to ``out``).

    The run record: ``{"run", "model", "method", "routers", "config", "limit", "command", "date", "device",
    "tasks": {task: {"acc", "acc_norm", "acc_stderr", ..., "mean_layers_executed", "layer_fraction",
    "action_counts", "results": <lm-eval's results[task] with the compute metrics as "<name>,none">}}}``.
    With ``out``, it is written to ``out/<name>.json`` after every task, and tasks already there (same
    model, method, routers, configuration and limit) are not run again. A file holding another run is never
    replaced unless ``overwrite`` (:class:`RunExistsError` names what differs); the default ``name`` includes
    everything that changes the result (method, config, routers, limit, model). Every data file the tasks read is
    checked first (``file:line: cause``, :class:`retrofit.core.data.TaskDataError`).
    """
    _offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from retrofit.eval.lm_eval_model import RetrofitLM  # registers the "retrofit" lm-eval model
    from retrofit.eval.tasks import check_task_data, render_tasks, resolve_task_names

    task_names = resolve_task_names(tasks)
    config = dict(config or {})
    name = name or _default_name(method, config, routers=routers, limit=limit, model=model)
    record = {"run": name, "model": model, "method": method, "routers": str(routers) if routers else None,
              "config": _jsonable(config), "limit": limit, "batch_size": batch_size,
              "command": command or " ".join(sys.argv),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{device} ({platform.machine()}, {os.cpu_count()} cores)", "tasks": {}}
    path = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                old = {"unreadable": str(e)}
            if not isinstance(old, dict):
                old = {"unreadable": f"a JSON {type(old).__name__}"}
            diffs = [f"{k}: {old.get(k)!r} there, {record[k]!r} now" for k in IDENTITY_KEYS
                     if old.get(k) != record[k]]
            if not diffs:
                record["tasks"] = old.get("tasks", {})
            elif not overwrite:
                why = f"it is not a results file ({old['unreadable']})" if "unreadable" in old else \
                    f"it holds another run ({'; '.join(diffs)})"
                raise RunExistsError(f"{path}: {why}. Give another --name or --out to keep both, or --overwrite "
                                     "to replace it.")
    todo = [t for t in task_names if t not in record["tasks"]]
    if not todo:
        return record
    check_task_data(todo, data)
    task_dir = render_tasks(Path(tempfile.mkdtemp(prefix="retrofit_tasks_")), data=data)
    tm = TaskManager(include_path=str(task_dir))
    if lm is None:
        lm = RetrofitLM(pretrained=model, method=method, routers=routers, device=device, batch_size=batch_size,
                        **config)
    for task in todo:
        lm.reset_compute()
        t0 = time.time()
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit,
                                      log_samples=False, bootstrap_iters=1000, verbosity="WARNING")
        r = dict(res["results"][task])
        comp = lm.compute_metrics(task)
        for k in COMPUTE_KEYS:
            r[f"{k},none"] = comp[k]
        entry = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none")}
        entry["n"] = int(res.get("n-samples", {}).get(task, {}).get("effective", r.get("sample_len", 0)) or 0)
        entry["seconds"] = round(time.time() - t0, 1)
        entry["results"] = r
        record["tasks"][task] = _jsonable(entry)
        if path is not None:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path)
        if progress:
            print(f"[retrofit eval] {name} {task}: acc={entry.get('acc')} acc_norm={entry.get('acc_norm')} "
                  f"layers={comp['mean_layers_executed']:.2f}/{comp['num_layers']} "
                  f"({comp['layer_fraction']:.3f}) n={entry['n']} {entry['seconds']}s", flush=True)
    return record


def _default_name(method, config, routers=None, limit=None, model="default") -> str:
    """A run name from everything that changes the result: method, config (a plan as 'static'), routers (the
    folder's name), limit and a model other than the default."""
    parts = [method or "base"]
    for k, v in sorted(config.items()):
        if k == "plan":  # two static plans get two names
            import hashlib

            v = "static-" + hashlib.sha1(json.dumps(_jsonable(v)).encode()).hexdigest()[:6]
        parts.append(f"{k}{v}")
    if routers:
        parts.append(f"routers-{Path(str(routers)).name}")
    if limit is not None:
        parts.append(f"limit{limit}")
    if model not in (None, "default"):
        parts.append(f"model-{Path(str(model)).name}")
    return "_".join(str(p).replace("/", "-") for p in parts)


def load_runs(paths) -> list[dict]:
    """Run records from JSON files (or folders of them)."""
    runs = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                obj = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{f}: not a retrofit eval results file ({e})") from e
            if isinstance(obj, dict) and "tasks" in obj and "run" in obj:
                runs.append(obj)
    return runs
