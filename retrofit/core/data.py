"""Data, defined once: the local task files, requests, padding, continuation scoring and search records.

Tasks. ``load_task(name, split=None, limit=None) -> list[Example]`` reads the evaluation files in the shared data
folder (:func:`data_dir`: ``$RETROFIT_DATA``, else ``../shared/data`` beside the repository or the current folder)
and user JSONL files. Every example is either

* multiple choice (``kind == "mc"``): scored by the log-likelihood of each choice given its context, lm-eval
  style: the model reads ``context`` and the continuation ``" " + choice``; the score of a choice is the sum of
  the continuation tokens' log-probabilities; the prediction is the argmax (lm-eval's ``acc``); or
* generative (``kind == "gen"``): greedy decoding from ``prompt``, scored by exact match of the final number
  (GSM8K, MGSM).

``Example.requests()`` gives the (context, continuation) pairs that are scored, so that every scorer (the
search, router training, RoMA, the MoE benchmarks) scores exactly the same text. The lm-eval task configs
(``retrofit.eval.tasks``) use the same record parsers (:func:`hellaswag_clean`, :func:`arc_challenge_docs`,
:func:`piqa_labels`).

Scoring. :func:`tokenize_request` splits a (context, continuation) pair into token ids as lm-eval does,
:func:`pad_right` builds a right-padded batch (a causal mask then suffices: padding never reaches a real token),
:func:`continuation_logprobs` takes the per-token log-probabilities of each continuation from hidden states or
logits (the LM head runs only at the positions that predict continuation tokens), and
:func:`score_continuations` does all of it for (prompt, choice) pairs with a model's plain forward.

Search records. :func:`read_search_records` reads one ``retrofit search`` JSONL (torn last line dropped,
optionally cut off for resuming; ``.gz`` too); :func:`read_searches` reads several and checks them for training.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Example", "TaskDataError", "load_task", "available_tasks", "data_dir", "extract_number",
           "numbers_match", "hellaswag_clean", "hellaswag_doc", "arc_challenge_docs", "piqa_labels",
           "tokenize_request", "pad_id", "pad_right", "continuation_logprobs", "score_continuations",
           "read_search_records", "read_searches"]

_REPO = Path(__file__).resolve().parents[2]


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


def data_dir(data: str | os.PathLike | None = None) -> Path:
    """The shared data folder (resolved): ``data`` when given, else ``$RETROFIT_DATA``, else the first existing of
    ``<repo>/../shared/data`` and ``<cwd>/../shared/data`` (``<repo>/../shared/data`` when neither exists)."""
    if data is None:
        data = os.environ.get("RETROFIT_DATA")
    if not data:
        cands = (_REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data")
        data = next((c for c in cands if c.is_dir()), cands[0])
    return Path(data).expanduser().resolve()


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


_ARC_CHALLENGE_FILES = {"test": "ARC-Challenge-Test.jsonl", "validation": "ARC-Challenge-Dev.jsonl",
                        "dev": "ARC-Challenge-Dev.jsonl"}


def arc_challenge_docs(d: Path, split: str = "test"):
    """``(path, lineno, doc)`` of ARC-Challenge ``split`` in ARC-Easy's layout: ``{"id", "question", "choices":
    {"text", "label"}, "answerKey"}`` (the files nest the question text and choices under ``question``)."""
    fname = _ARC_CHALLENGE_FILES.get(split)
    if fname is None:
        raise TaskDataError(f"arc_challenge has splits test / validation, not {split!r}")
    path = Path(d) / "arc_challenge" / fname
    for lineno, r in _read_jsonl(path):
        q = _need(r, "question", path, lineno, dict)
        chs = _need(q, "choices", path, lineno, list)
        yield path, lineno, {"id": r.get("id", f"arc_challenge/{split}/{lineno}"),
                             "question": _need(q, "stem", path, lineno, str),
                             "choices": {"text": [c["text"] for c in chs], "label": [c["label"] for c in chs]},
                             "answerKey": _need(r, "answerKey", path, lineno, str)}


def _arc_challenge(split, d):
    split = split or "test"
    for path, lineno, r in arc_challenge_docs(d, split):
        labels = r["choices"]["label"]
        key = r["answerKey"]
        if key not in labels:
            raise TaskDataError(f"{path}:{lineno}: answerKey {key!r} is not one of the labels {labels}")
        yield _mc(r["id"], _qa(r["question"]), r["choices"]["text"], labels.index(key), path, lineno,
                  "arc_challenge")


def piqa_labels(d: Path) -> list[int]:
    """PIQA's validation labels (0 or 1, one per record of ``piqa/valid.jsonl``), checked."""
    lab = Path(d) / "piqa" / "valid-labels.lst"
    if not lab.is_file():
        raise TaskDataError(f"{lab}: file not found")
    out = []
    for lineno, s in enumerate(lab.read_text().split(), 1):
        if s not in ("0", "1"):
            raise TaskDataError(f"{lab}:{lineno}: label {s!r} is not 0 or 1")
        out.append(int(s))
    return out


def _piqa(split, d):
    if (split or "validation") not in ("validation", "val", "dev"):
        raise TaskDataError("piqa has only the labelled validation split here")
    path, lab = d / "piqa" / "valid.jsonl", d / "piqa" / "valid-labels.lst"
    labels = piqa_labels(d)
    for lineno, r in _read_jsonl(path):
        if lineno > len(labels):
            raise TaskDataError(f"{lab}: has {len(labels)} labels but {path} has more records (line {lineno})")
        yield _mc(f"piqa/{lineno}", _qa(_need(r, "goal", path, lineno, str)),
                  [_need(r, "sol1", path, lineno, str), _need(r, "sol2", path, lineno, str)], labels[lineno - 1],
                  path, lineno, "piqa")


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: ``[title]`` to a full stop, other bracketed tags removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(r: dict, path=None, lineno=None) -> dict:
    """One HellaSwag record as lm-eval scores it: ``{"query", "choices", "label"}`` (cleaned)."""
    ctx = _need(r, "ctx", path, lineno, str)
    label = _need(r, "activity_label", path, lineno, str)
    return {"query": hellaswag_clean(label + ": " + ctx),
            "choices": [hellaswag_clean(e) for e in _need(r, "endings", path, lineno, list)],
            "label": int(_need(r, "label", path, lineno))}


def _hellaswag(split, d):
    if (split or "validation") not in ("validation", "val", "dev"):
        raise TaskDataError("hellaswag has only the validation split here")
    path = d / "hellaswag" / "hellaswag_val.jsonl"
    for lineno, r in _read_jsonl(path):
        doc = hellaswag_doc(r, path, lineno)
        yield _mc(f"hellaswag/{r.get('idx', lineno)}", doc["query"], doc["choices"], doc["label"], path, lineno,
                  "hellaswag")


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


def load_task(name: str, split: str | None = None, limit: int | None = None,
              data: str | os.PathLike | None = None) -> list[Example]:
    """Examples of task ``name`` (see :func:`available_tasks`) or of a JSONL file with question/choices/answer.

    ``split=None`` takes the task's usual evaluation split; ``limit`` keeps the first ``limit`` examples;
    ``data`` is the data folder (:func:`data_dir`'s rule when None).
    """
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    p = Path(name)
    if name.endswith(".jsonl") or p.is_file():
        gen = _user_jsonl(p)
    elif name in _LOADERS:
        gen = _LOADERS[name](split, data_dir(data))
    elif name.startswith("mmlu_"):
        gen = _mmlu(name[len("mmlu_"):])(split, data_dir(data))
    else:
        raise TaskDataError(f"unknown task {name!r}: use one of {', '.join(available_tasks())}")
    out = []
    for ex in gen:
        if limit is not None and len(out) >= limit:
            break
        out.append(ex)
    return out


# --------------------------------------------------------------------------------------------- scoring
def tokenize_request(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids ``(context, continuation)`` as lm-eval splits them: trailing context whitespace moves to the
    continuation; ``cont = enc(ctx + cont)[len(enc(ctx)):]`` (no special tokens). An empty context becomes the
    BOS (or EOS) token, as lm-eval scores the first token of an empty context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"empty continuation after tokenisation: {continuation!r}")
    if not ctx:
        ctx = [tok.eos_token_id if tok.bos_token_id is None else tok.bos_token_id]
    return ctx, cont


def pad_id(tok) -> int:
    """The id used to pad: the tokenizer's pad token, else its EOS, else 0."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id) if tok.eos_token_id is not None else 0


def pad_right(seqs, pad: int = 0, device=None):
    """Right-padded ``ids`` [B, T] and ``mask`` [B, T] (1 = real token) of token-id lists. With right padding
    a causal mask alone is exact for the real tokens (padding only ever follows them)."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.tensor([list(s) + [pad] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def continuation_logprobs(states, requests, head=None) -> list:
    """Per request ``(ctx, cont)`` (token ids; row ``b`` of ``states`` holds ``ctx + cont``, right padded): the
    log-probabilities [len(cont)] of its continuation tokens.

    ``states`` [B, T, *]: logits, or hidden states when ``head`` (a callable to logits, e.g. the LM head) is
    given; only the positions that predict continuation tokens go through ``head`` and the softmax."""
    import torch

    rows, cols, tgts, sizes = [], [], [], []
    for b, (c, x) in enumerate(requests):
        n = len(c) + len(x)
        rows += [b] * len(x)
        cols += list(range(len(c) - 1, n - 1))
        tgts += list(x)
        sizes.append(len(x))
    dev = states.device
    sel = states[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
    logits = head(sel) if head is not None else sel
    lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tgts, device=dev).unsqueeze(-1)).squeeze(-1)
    return list(lp.split(sizes))


def score_continuations(model, tok, pairs: list[tuple[str, str]], batch: int = 16) -> list[float]:
    """lm-eval style multiple-choice scores with the model's own forward: the summed log-likelihood of each
    ``(context, continuation)`` pair (:func:`tokenize_request`), ``batch`` right-padded rows per forward."""
    import torch

    dev = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            reqs = [tokenize_request(tok, c, x) for c, x in pairs[s:s + batch]]
            ids, mask = pad_right([c + x for c, x in reqs], pad_id(tok), dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out += [float(lp.sum()) for lp in continuation_logprobs(logits, reqs)]
    return out


# --------------------------------------------------------------------------------------------- search records
class SearchFileError(ValueError):
    """A search JSONL holds a damaged line (the message names the file and line and the repair)."""


_REPAIR_HINT = ("`retrofit search --repair --out {path}` (with the search's own options) drops it, keeping it in "
                "{path}.dropped, and redoes that example; `retrofit search-repair {path}` only drops it")


def _record_problem(chunk: bytes) -> str | None:
    try:
        rec = json.loads(chunk)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not valid JSON ({getattr(e, 'msg', e)})"
    if not isinstance(rec, dict):
        return f"expected a JSON object (a search record), got {type(rec).__name__}"
    return None


def repair_search_file(path: str | Path) -> list[int]:
    """Drop the damaged lines of a search JSONL (not JSON, not an object, a torn last line); returns their line
    numbers. The dropped lines are appended to ``<path>.dropped`` (nothing is thrown away) and the file is
    rewritten atomically with every good record, in order. A resumed search redoes the dropped examples."""
    path = Path(path)
    if path.suffix == ".gz":
        raise ValueError(f"{path}: a compressed search file cannot be repaired; decompress it first")
    if not path.is_file():
        return []
    data = path.read_bytes()
    good, bad, dropped = [], [], []
    for lineno, chunk in enumerate(data.splitlines(keepends=True), 1):
        if not chunk.strip():
            continue
        if chunk.endswith(b"\n") and _record_problem(chunk) is None:
            good.append(chunk)
        else:
            bad.append(chunk if chunk.endswith(b"\n") else chunk + b"\n")
            dropped.append(lineno)
    if not dropped:
        return []
    with open(f"{path}.dropped", "ab") as f:
        f.writelines(bad)
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(path.name + ".repair-tmp")
    with open(tmp, "wb") as f:
        f.writelines(good)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


def read_search_records(path: str | Path, *, repair: bool = False, missing_ok: bool = True) -> list[dict]:
    """Records of one search JSONL (``.jsonl``, or ``.jsonl.gz`` read-only).

    A last line without its newline is a torn write (a killed run): dropped, and with ``repair`` cut off the
    file so that appending continues cleanly. A missing file is ``[]`` (``missing_ok``) or an error. A malformed
    complete line is a :class:`SearchFileError` naming the file, the line and :func:`repair_search_file`."""
    return [r for _, r in _search_lines(path, repair, missing_ok)]


def _search_lines(path, repair: bool, missing_ok: bool) -> list[tuple[int, dict]]:
    import gzip

    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"search results {path} not found (write them with `retrofit search`)")
    data = path.read_bytes()
    if path.suffix == ".gz":
        if repair:
            raise ValueError(f"{path}: a compressed search file cannot be resumed")
        data = gzip.decompress(data)
        if data and not data.endswith(b"\n"):
            data += b"\n"  # a compressed file is complete
    out, good_end = [], 0
    for lineno, chunk in enumerate(data.splitlines(keepends=True), 1):
        if not chunk.endswith(b"\n"):
            break  # torn last write
        if chunk.strip():
            problem = _record_problem(chunk)
            if problem:
                raise SearchFileError(f"{path}:{lineno}: {problem}; the line is damaged (a torn write or an edit). "
                                      + _REPAIR_HINT.format(path=path))
            out.append((lineno, json.loads(chunk)))
        good_end += len(chunk)
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return out


def read_searches(paths) -> list[dict]:
    """Records of several search files, checked for training: each has a ``prompt`` and a ``plan`` of actions
    (errors name the file and line)."""
    from retrofit.core.plans import ACTIONS

    recs = []
    for path in paths:
        for n, r in _search_lines(path, False, False):
            missing = [k for k in ("prompt", "plan") if k not in r]
            if missing:
                raise ValueError(f"{path}:{n}: record lacks {missing}; expected `retrofit search` output")
            if any(a not in ACTIONS for a in r["plan"]):
                raise ValueError(f"{path}:{n}: plan holds actions other than {ACTIONS}")
            recs.append(r)
    return recs
