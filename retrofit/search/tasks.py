"""Task data: one loader for the local evaluation files in ``../shared/data`` and for user JSONL files.

``load_task(name, split=None, limit=None) -> list[Example]``. Every example is either

* multiple choice (``kind == "mc"``): scored by the log-likelihood of each choice given its context, lm-eval
  style: the model reads ``context`` and the continuation ``" " + choice``; the score of a choice is the sum of
  the continuation tokens' log-probabilities; the prediction is the argmax (lm-eval's ``acc``); or
* generative (``kind == "gen"``): greedy decoding from ``prompt``, scored by exact match of the final number
  (GSM8K, MGSM).

``Example.requests()`` gives the (context, continuation) pairs that are scored, so that every scorer (the
search, router training, evaluation) scores exactly the same text.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Example", "TaskDataError", "load_task", "available_tasks", "data_dir", "extract_number",
           "numbers_match"]


class TaskDataError(ValueError):
    """A task file is missing or malformed (the message names the file and line)."""


@dataclass
class Example:
    id: str
    prompt: str  # the exact text the model is scored on, without the answer
    choices: list[str] = field(default_factory=list)  # empty for generative tasks
    gold: int | str = 0  # index into choices (mc) or the reference final answer (gen)
    kind: str = "mc"  # "mc" or "gen"
    contexts: list[str] | None = None  # per-choice contexts (Winogrande partial scoring); else None
    task: str = ""

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) pairs scored for a multiple-choice example, one per choice."""
        if self.kind != "mc":
            raise ValueError(f"example {self.id!r} is generative; it has no log-likelihood requests")
        if self.contexts is not None:  # one continuation, several contexts
            return [(c, " " + self.choices[0]) for c in self.contexts]
        return [(self.prompt, " " + c) for c in self.choices]

    @property
    def n_choices(self) -> int:
        return len(self.contexts) if self.contexts is not None else len(self.choices)


def data_dir() -> Path:
    """``$RETROFIT_DATA`` or ``../shared/data`` next to the repository / the current folder."""
    env = os.environ.get("RETROFIT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]
    for cand in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path("/work/shared/data")):
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------- helpers
def _read_jsonl(path: Path):
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found (set RETROFIT_DATA to the shared data folder)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise TaskDataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _need(rec: dict, key: str, path, lineno, types=None):
    if key not in rec:
        raise TaskDataError(f"{path}:{lineno}: missing field {key!r} (fields present: {sorted(rec)})")
    v = rec[key]
    if types is not None and not isinstance(v, types):
        raise TaskDataError(f"{path}:{lineno}: field {key!r} should be {types}, got {type(v).__name__}")
    return v


def _mc(ex_id, prompt, choices, gold, path, lineno, task, contexts=None) -> Example:
    n = len(contexts) if contexts is not None else len(choices)
    if n < 2:
        raise TaskDataError(f"{path}:{lineno}: a multiple-choice record needs at least 2 choices, got {n}")
    if not all(isinstance(c, str) for c in (contexts or choices)):
        raise TaskDataError(f"{path}:{lineno}: choices must be strings")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < n:
        raise TaskDataError(f"{path}:{lineno}: gold answer {gold!r} is not an index into the {n} choices")
    return Example(id=str(ex_id), prompt=prompt, choices=list(choices), gold=gold, kind="mc", contexts=contexts,
                   task=task)


def _qa(q: str) -> str:
    return f"Question: {q}\nAnswer:"


_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The last number in ``text`` (commas removed), or None."""
    nums = _NUM_RE.findall(text)
    if not nums:
        return None
    return nums[-1].replace(",", "").rstrip(".")


def numbers_match(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    try:
        return abs(float(pred) - float(str(gold).replace(",", ""))) < 1e-6
    except ValueError:
        return pred.strip() == str(gold).strip()


# --------------------------------------------------------------------------------------------- loaders
def _arc_easy(split, d):
    split = {"val": "validation", "dev": "validation"}.get(split or "validation", split or "validation")
    path = d / "arc_easy" / f"{split}.jsonl"
    if split not in ("train", "validation", "test"):
        raise TaskDataError(f"arc_easy has splits train / validation / test, not {split!r}")
    for lineno, r in _read_jsonl(path):
        ch = _need(r, "choices", path, lineno, dict)
        texts, labels = _need(ch, "text", path, lineno, list), _need(ch, "label", path, lineno, list)
        key = _need(r, "answerKey", path, lineno, str)
        if key not in labels:
            raise TaskDataError(f"{path}:{lineno}: answerKey {key!r} is not one of the labels {labels}")
        yield _mc(r.get("id", f"arc_easy/{split}/{lineno}"), _qa(_need(r, "question", path, lineno, str)), texts,
                  labels.index(key), path, lineno, "arc_easy")


def _arc_challenge(split, d):
    split = split or "test"
    fname = {"test": "ARC-Challenge-Test.jsonl", "validation": "ARC-Challenge-Dev.jsonl",
             "dev": "ARC-Challenge-Dev.jsonl"}.get(split)
    if fname is None:
        raise TaskDataError(f"arc_challenge has splits test / validation, not {split!r}")
    path = d / "arc_challenge" / fname
    for lineno, r in _read_jsonl(path):
        q = _need(r, "question", path, lineno, dict)
        chs = _need(q, "choices", path, lineno, list)
        labels = [c["label"] for c in chs]
        key = _need(r, "answerKey", path, lineno, str)
        if key not in labels:
            raise TaskDataError(f"{path}:{lineno}: answerKey {key!r} is not one of the labels {labels}")
        yield _mc(r.get("id", f"arc_challenge/{split}/{lineno}"), _qa(_need(q, "stem", path, lineno, str)),
                  [c["text"] for c in chs], labels.index(key), path, lineno, "arc_challenge")


def _piqa(split, d):
    if (split or "validation") not in ("validation", "val", "dev"):
        raise TaskDataError("piqa has only the labelled validation split here")
    path, lab = d / "piqa" / "valid.jsonl", d / "piqa" / "valid-labels.lst"
    if not lab.is_file():
        raise TaskDataError(f"{lab}: file not found")
    labels = lab.read_text().split()
    for lineno, r in _read_jsonl(path):
        if lineno > len(labels):
            raise TaskDataError(f"{lab}: has {len(labels)} labels but {path} has more records (line {lineno})")
        lab_s = labels[lineno - 1]
        if lab_s not in ("0", "1"):
            raise TaskDataError(f"{lab}:{lineno}: label {lab_s!r} is not 0 or 1")
        yield _mc(f"piqa/{lineno}", _qa(_need(r, "goal", path, lineno, str)),
                  [_need(r, "sol1", path, lineno, str), _need(r, "sol2", path, lineno, str)], int(lab_s), path,
                  lineno, "piqa")


def _hs_pre(text: str) -> str:  # lm-eval's hellaswag preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(split, d):
    if (split or "validation") not in ("validation", "val", "dev"):
        raise TaskDataError("hellaswag has only the validation split here")
    path = d / "hellaswag" / "hellaswag_val.jsonl"
    for lineno, r in _read_jsonl(path):
        ctx = _need(r, "ctx", path, lineno, str)
        label = _need(r, "activity_label", path, lineno, str)
        prompt = _hs_pre(label + ": " + ctx)
        yield _mc(f"hellaswag/{r.get('idx', lineno)}", prompt,
                  [_hs_pre(e) for e in _need(r, "endings", path, lineno, list)],
                  int(_need(r, "label", path, lineno)), path, lineno, "hellaswag")


_MC_EXTRA = {"boolq": "boolq.jsonl", "openbookqa": "openbook_qa.jsonl", "copa": "copa.jsonl",
             "winogrande": "winogrande.jsonl"}


def _mc_extra(name):
    def load(split, d):
        path = d / "mc_extra" / _MC_EXTRA[name]
        for lineno, r in _read_jsonl(path):
            gold = _need(r, "gold", path, lineno, int)
            if name == "winogrande":
                ctxs = _need(r, "context_options", path, lineno, list)
                cont = _need(r, "continuation", path, lineno, str)
                yield _mc(f"{name}/{lineno}", ctxs[gold] if 0 <= gold < len(ctxs) else "", [cont], gold, path,
                          lineno, name, contexts=ctxs)
            else:
                yield _mc(f"{name}/{lineno}", _need(r, "query", path, lineno, str),
                          _need(r, "choices", path, lineno, list), gold, path, lineno, name)
    return load


def _mmlu(subject=None):
    def load(split, d):
        split = {"validation": "dev", "val": "dev"}.get(split or "test", split or "test")
        if split not in ("test", "dev"):
            raise TaskDataError(f"mmlu has splits test / dev, not {split!r}")
        folder = d / "mmlu" / split
        files = sorted(folder.glob(f"*_{split}.csv"))
        if subject is not None:
            files = [f for f in files if f.name == f"{subject}_{split}.csv"]
        if not files:
            raise TaskDataError(f"{folder}: no MMLU csv files" + (f" for subject {subject!r}" if subject else ""))
        for path in files:
            subj = path.name[: -len(f"_{split}.csv")]
            head = f"The following are multiple choice questions (with answers) about {subj.replace('_', ' ')}.\n\n"
            with open(path, encoding="utf-8", newline="") as f:
                rows = csv.reader(f)
                header = next(rows, None)
                if header != ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
                    raise TaskDataError(f"{path}:1: unexpected header {header}")
                for lineno, row in enumerate(rows, 2):
                    if len(row) != 6 or row[5] not in "0123" or not row[5]:
                        raise TaskDataError(f"{path}:{lineno}: expected 6 columns with answer 0-3, got {row}")
                    q = row[0].strip()
                    prompt = head + q + "\n" + "".join(f"{L}. {c.strip()}\n" for L, c in zip("ABCD", row[1:5]))
                    yield _mc(f"mmlu/{subj}/{lineno}", prompt + "Answer:", list("ABCD"), int(row[5]), path,
                              lineno, "mmlu")
    return load


_XCOPA_CONNECT = {  # lm-eval's xcopa connectors (cause, effect)
    "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"), "id": ("karena", "maka"), "it": ("perché", "quindi"),
    "qu": ("imataq", "chaymi"), "sw": ("kwa sababu", "kwa hiyo"), "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"), "tr": ("çünkü", "bu yüzden"), "vi": ("bởi vì", "vì vậy"), "zh": ("因为", "所以"),
    "en": ("because", "therefore"),
}


def _xcopa(lang, gmt=False):
    def load(split, d):
        split = {"validation": "val", "dev": "val"}.get(split or "test", split or "test")
        if split not in ("val", "test"):
            raise TaskDataError(f"xcopa has splits val / test, not {split!r}")
        path = d / "xcopa" / ("data-gmt" if gmt else "data") / lang / f"{split}.{lang}.jsonl"
        cause, effect = _XCOPA_CONNECT["en" if gmt else lang]
        for lineno, r in _read_jsonl(path):
            q = _need(r, "question", path, lineno, str)
            if q not in ("cause", "effect"):
                raise TaskDataError(f"{path}:{lineno}: question must be 'cause' or 'effect', got {q!r}")
            premise = _need(r, "premise", path, lineno, str).strip()
            prompt = premise[:-1] if premise.endswith((".", "。")) else premise
            prompt += " " + (cause if q == "cause" else effect)
            chs = [_need(r, k, path, lineno, str) for k in ("choice1", "choice2")]
            chs = [c[:1].lower() + c[1:] for c in chs]
            yield _mc(f"xcopa{'_gmt' if gmt else ''}_{lang}/{r.get('idx', lineno)}", prompt, chs,
                      _need(r, "label", path, lineno, int), path, lineno, f"xcopa_{lang}")
    return load


def _gsm8k(split, d):
    split = split or "test"
    if split not in ("train", "test"):
        raise TaskDataError(f"gsm8k has splits train / test, not {split!r}")
    path = d / "gsm8k" / f"{split}.jsonl"
    for lineno, r in _read_jsonl(path):
        ans = _need(r, "answer", path, lineno, str)
        if "####" not in ans:
            raise TaskDataError(f"{path}:{lineno}: answer has no '#### <number>' final line")
        gold = ans.split("####")[-1].strip().replace(",", "")
        yield Example(id=f"gsm8k/{split}/{lineno}", prompt=_qa(_need(r, "question", path, lineno, str)), gold=gold,
                      kind="gen", task="gsm8k")


def _mgsm(lang):
    def load(split, d):
        path = d / "mgsm" / f"mgsm_{lang}.tsv"
        if not path.is_file():
            raise TaskDataError(f"{path}: file not found")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    raise TaskDataError(f"{path}:{lineno}: expected 'question<TAB>answer', got {len(parts)} fields")
                yield Example(id=f"mgsm_{lang}/{lineno}", prompt=_qa(parts[0].strip()),
                              gold=parts[1].strip().replace(",", ""), kind="gen", task=f"mgsm_{lang}")
    return load


def _user_jsonl(path: Path):
    """question / choices / answer records (answer: index, choice text or label letter); no choices = generative."""
    for lineno, r in _read_jsonl(path):
        q = _need(r, "question", path, lineno, str)
        ans = _need(r, "answer", path, lineno)
        ex_id = str(r.get("id", f"{path.stem}/{lineno}"))
        choices = r.get("choices")
        if choices is None:
            yield Example(id=ex_id, prompt=_qa(q), gold=str(ans), kind="gen", task=path.stem)
            continue
        if isinstance(choices, dict) and "text" in choices:  # ARC-style nested choices
            labels, choices = choices.get("label"), choices["text"]
        else:
            labels = None
        if not isinstance(choices, list):
            raise TaskDataError(f"{path}:{lineno}: 'choices' must be a list of strings")
        if isinstance(ans, bool):
            raise TaskDataError(f"{path}:{lineno}: 'answer' must be an index, a choice or a label, not a boolean")
        if isinstance(ans, int):
            gold = ans
        elif isinstance(ans, str) and ans in choices:
            gold = choices.index(ans)
        elif isinstance(ans, str) and labels and ans in labels:
            gold = labels.index(ans)
        elif isinstance(ans, str) and len(ans) == 1 and ans.upper() in "ABCDEFGHIJ"[: len(choices)]:
            gold = "ABCDEFGHIJ".index(ans.upper())
        else:
            raise TaskDataError(f"{path}:{lineno}: answer {ans!r} is neither an index, a choice text nor a label")
        yield _mc(ex_id, _qa(q), choices, gold, path, lineno, path.stem)


_LOADERS = {
    "arc_easy": _arc_easy,
    "arc_challenge": _arc_challenge,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "mmlu": _mmlu(),
    "gsm8k": _gsm8k,
    **{k: _mc_extra(k) for k in _MC_EXTRA},
    **{f"xcopa_{lang}": _xcopa(lang) for lang in _XCOPA_CONNECT if lang != "en"},
    **{f"xcopa_gmt_{lang}": _xcopa(lang, gmt=True) for lang in _XCOPA_CONNECT if lang not in ("en", "qu")},
    **{f"mgsm_{lang}": _mgsm(lang) for lang in "bn de en es fr ja ru sw te th zh".split()},
}


def available_tasks() -> list[str]:
    return sorted(_LOADERS) + ["mmlu_<subject>", "<path>.jsonl"]


def load_task(name: str, split: str | None = None, limit: int | None = None) -> list[Example]:
    """Examples of task ``name`` (see :func:`available_tasks`) or of a JSONL file with question/choices/answer.

    ``split=None`` takes the task's usual evaluation split; ``limit`` keeps the first ``limit`` examples.
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    p = Path(name)
    if name.endswith(".jsonl") or p.is_file():
        gen = _user_jsonl(p)
    elif name in _LOADERS:
        gen = _LOADERS[name](split, data_dir())
    elif name.startswith("mmlu_"):
        gen = _mmlu(name[len("mmlu_"):])(split, data_dir())
    else:
        raise TaskDataError(f"unknown task {name!r}: use one of {', '.join(available_tasks())}")
    out = []
    for ex in gen:
        if limit is not None and len(out) >= limit:
            break
        out.append(ex)
    return out
