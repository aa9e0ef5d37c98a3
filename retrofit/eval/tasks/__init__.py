"""Offline lm-eval task configs that read ``../shared/data`` in place.

The ``*.yaml.in`` files here are lm-eval task YAMLs with an ``@DATA@`` placeholder: YAML ``data_files`` must be
absolute (or relative to the working directory), so :func:`render_tasks` writes them, with the absolute data
folder filled in, into a task folder (a temp dir by default) together with a ``utils.py`` for the
``!function`` hooks. Pass that folder to lm-eval as ``include_path`` (``retrofit eval`` does it for you).

The data folder is :func:`retrofit.core.data.data_dir`'s (``$RETROFIT_DATA`` or ``../shared/data``). Task names
carry a ``retrofit_`` prefix so they
never clash with lm-eval's own (hub-backed) tasks; :func:`resolve_task_names` maps short names (``arc_easy``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from retrofit.core.data import TaskDataError, arc_challenge_docs, data_dir, hellaswag_doc, load_task, piqa_labels

_HERE = Path(__file__).resolve().parent
PLACEHOLDER = "@DATA@"

# short name -> (lm-eval task name, data it needs, what it is)
TASKS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("retrofit_arc_easy", "arc_easy/test.jsonl", "ARC-Easy test (2376)"),
    "arc_easy_val": ("retrofit_arc_easy_val", "arc_easy/validation.jsonl", "ARC-Easy validation (570)"),
    "arc_easy_train": ("retrofit_arc_easy_train", "arc_easy/train.jsonl", "ARC-Easy train (2251)"),
    "arc_challenge": ("retrofit_arc_challenge", "arc_challenge/ARC-Challenge-Test.jsonl", "ARC-Challenge test (1172)"),
    "piqa": ("retrofit_piqa", "piqa/valid.jsonl", "PIQA validation (1838)"),
    "hellaswag": ("retrofit_hellaswag", "hellaswag/hellaswag_val.jsonl", "HellaSwag validation (10042)"),
    "boolq": ("retrofit_boolq", "mc_extra/boolq.jsonl", "BoolQ dev (3270)"),
    "openbookqa": ("retrofit_openbookqa", "mc_extra/openbook_qa.jsonl", "OpenBookQA test (500)"),
    "copa": ("retrofit_copa", "mc_extra/copa.jsonl", "COPA validation (100)"),
    "mmlu": ("retrofit_mmlu", "mmlu/test/marketing_test.csv", "MMLU, 6 subjects' test sets (1538)"),
}


_MMLU_SUBJECTS = ("high_school_biology", "high_school_geography", "elementary_mathematics", "computer_security",
                  "marketing", "nutrition")
# lm-eval task -> (retrofit.core.data loader, split, file) for every file its YAML loads (checked before lm-eval runs)
DATA_CHECKS: dict[str, list[tuple[str, str | None, str]]] = {
    "retrofit_arc_easy": [("arc_easy", s, f"arc_easy/{s}.jsonl") for s in ("train", "validation", "test")],
    "retrofit_arc_easy_val": [("arc_easy", s, f"arc_easy/{s}.jsonl") for s in ("train", "validation")],
    "retrofit_arc_easy_train": [("arc_easy", "train", "arc_easy/train.jsonl")],
    "retrofit_arc_challenge": [("arc_challenge", "validation", "arc_challenge/ARC-Challenge-Dev.jsonl"),
                               ("arc_challenge", "test", "arc_challenge/ARC-Challenge-Test.jsonl")],
    "retrofit_piqa": [("piqa", None, "piqa/valid.jsonl")],
    "retrofit_hellaswag": [("hellaswag", None, "hellaswag/hellaswag_val.jsonl")],
    "retrofit_boolq": [("boolq", None, "mc_extra/boolq.jsonl")],
    "retrofit_openbookqa": [("openbookqa", None, "mc_extra/openbook_qa.jsonl")],
    "retrofit_copa": [("copa", None, "mc_extra/copa.jsonl")],
    "retrofit_mmlu": [(f"mmlu_{s}", "test", f"mmlu/test/{s}_test.csv") for s in _MMLU_SUBJECTS],
}


def check_task_data(task_names: list[str], data: str | os.PathLike | None = None) -> None:
    """Read every file the given lm-eval tasks load with :mod:`retrofit.core.data`'s loaders (the ones
    ``retrofit search`` uses), so a malformed or empty file is a :class:`TaskDataError` saying ``file:line:
    cause`` before lm-eval starts, not a traceback from inside it."""
    root = data_dir(data)
    if not root.is_dir():
        raise TaskDataError(f"{root}: evaluation data folder not found: set RETROFIT_DATA (or --data) to the shared "
                            "data folder (the one with arc_easy/, piqa/, ...), or put it at ../shared/data")
    for task in task_names:
        for loader, split, rel in DATA_CHECKS.get(task, []):
            if not load_task(loader, split, data=root):
                raise TaskDataError(f"{root / rel}: no examples (the file is empty)")


def resolve_task_names(tasks: str | list[str]) -> list[str]:
    """``"arc_easy,piqa"`` -> ``["retrofit_arc_easy", "retrofit_piqa"]``; full ``retrofit_*`` names pass through."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError(f"no task given; choose from {', '.join(TASKS)}")
    out = []
    by_full = {v[0]: k for k, v in TASKS.items()}
    for n in names:
        if n in TASKS:
            out.append(TASKS[n][0])
        elif n in by_full:
            out.append(n)
        else:
            raise ValueError(f"unknown task {n!r}; offline tasks: {', '.join(TASKS)} "
                             "(or their retrofit_* names)")
    return out


def render_tasks(out_dir: str | os.PathLike | None = None, data: str | os.PathLike | None = None) -> Path:
    """Write the task YAMLs (absolute data paths filled in) and their ``utils.py`` into ``out_dir``.

    Returns the folder, for lm-eval's ``include_path`` / ``TaskManager(include_path=...)``.
    """
    root = data_dir(data)
    if not root.is_dir():
        raise FileNotFoundError(
            f"evaluation data folder {root} not found: set RETROFIT_DATA to the shared data folder "
            "(the one with arc_easy/, piqa/, ...), or put it at ../shared/data beside the repo.")
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="retrofit_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    for tmpl in sorted(_HERE.glob("*.yaml.in")):
        text = tmpl.read_text().replace(PLACEHOLDER, root.as_posix())
        (out / tmpl.name[: -len(".in")]).write_text(text)
    (out / "utils.py").write_text(
        "# written by retrofit.eval.tasks.render_tasks: the !function hooks of the retrofit_* tasks\n"
        "from retrofit.eval.tasks import make_processors\n\n"
        f"globals().update(make_processors({root.as_posix()!r}))\n")
    return out


# --- process_docs hooks (the record parsing is retrofit.core.data's, shared with load_task) ----------------

def make_processors(data: str | os.PathLike) -> dict:
    """The ``process_docs`` functions bound to one data folder (used by the rendered ``utils.py``)."""
    root = Path(data)

    def process_piqa(dataset):
        labels = piqa_labels(root)
        if len(labels) != len(dataset):
            raise ValueError(f"{root / 'piqa' / 'valid-labels.lst'} has {len(labels)} labels for {len(dataset)} "
                             "PIQA questions")
        return dataset.add_column("label", labels)

    def process_hellaswag(dataset):
        return dataset.map(hellaswag_doc)

    def load_arc_challenge(**_ignored):
        import datasets

        return datasets.DatasetDict({
            split: datasets.Dataset.from_list([doc for _, _, doc in arc_challenge_docs(root, split)])
            for split in ("validation", "test")})

    return {"process_piqa": process_piqa, "process_hellaswag": process_hellaswag,
            "load_arc_challenge": load_arc_challenge}
