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
             data: str | Path | None = None, command: str | None = None, progress: bool = True, lm=None) -> dict:
    """Evaluate one retrofit configuration on offline tasks; returns the run record (also written to ``out``).

    The run record: ``{"run", "model", "method", "routers", "config", "limit", "command", "date", "device",
    "tasks": {task: {"acc", "acc_norm", "acc_stderr", ..., "mean_layers_executed", "layer_fraction",
    "action_counts", "results": <lm-eval's results[task] with the compute metrics as "<name>,none">}}}``.
    With ``out``, it is written to ``out/<name>.json`` after every task, and tasks already there (same
    configuration and limit) are not run again.
    """
    _offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from retrofit.eval.lm_eval_model import RetrofitLM  # registers the "retrofit" lm-eval model
    from retrofit.eval.tasks import render_tasks, resolve_task_names

    task_names = resolve_task_names(tasks)
    config = dict(config or {})
    name = name or _default_name(method, config)
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
            old = json.loads(path.read_text())
            same = all(old.get(k) == record[k] for k in ("model", "method", "routers", "config", "limit"))
            if same:
                record["tasks"] = old.get("tasks", {})
    todo = [t for t in task_names if t not in record["tasks"]]
    if not todo:
        return record
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


def _default_name(method, config) -> str:
    if not method:
        return "base"
    parts = [method]
    for k, v in sorted(config.items()):
        if k == "plan":
            v = "static"
        parts.append(f"{k}{v}")
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
