"""Distil the MoE testbed's experts and gates toward the dense model it was built from (issue 17).

After the neuron split and the gate fit (:func:`retrofit.moe.moefy.moefy_model`) the experts are the dense MLP's
own neurons and only the gates were fitted, so the testbed loses much of the dense model's quality. This step
trains the MoE blocks (routed experts, shared expert, shared-expert gate and router gate; attention,
embeddings, norms and the LM head frozen) on the KL divergence ``KL(p_dense || p_moe)`` of the next-token
distributions, over real English text that no benchmark in this repository scores
(:func:`distill_texts`): GSM8K *train* solutions, BoolQ passages (BoolQ is not scored by any bench here),
FLORES English *train* sentences and the Shakespeare *head* (characters 0-500,000; the benchmarks' perplexity
text starts at 1,000,000). Never ARC-Easy, the Shakespeare tail, XCOPA / MGSM (steer's evaluation) or
OpenBookQA / PIQA (RoMA's second task).

Resumable: every ``checkpoint_every`` steps the trainable weights, the optimiser state and the step are saved
atomically (temporary file + ``os.replace``) into ``ckpt_dir``; a rerun with the same settings continues from
the last checkpoint and ends with the same weights as an uninterrupted run (the batch of step ``s`` is a
function of ``s`` and the seed only; tested). The learning rate is constant after a linear warm-up, so raising
``steps`` on a rerun simply trains further.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["DistillConfig", "distill_texts", "distill_sequences", "distill_moe", "trainable_names",
           "kl_to_teacher", "SOURCES", "DEFAULT_SOURCES", "HELDOUT_FILES"]

# Shakespeare characters the distillation may read (the same head the gate fit reads; the tail starts at 1e6).
SHAKESPEARE_HEAD = (0, 500_000)

#: source name -> data file (relative to the shared data folder) it reads
SOURCES = {
    "gsm8k_train": "gsm8k/train.jsonl",
    "boolq_passages": "mc_extra/boolq.jsonl",
    "flores_eng_train": "flores_sib200/eng_Latn/train.tsv",
    "shakespeare_head": "tinyshakespeare/input.txt",
    # opt-in: ARC-Easy *train* questions in the evaluation's prompt format with their gold answer
    # ("Question: ...\nAnswer: ..."), the one multiple-choice QA format in the mix; the gate fit already reads
    # these questions, no benchmark scores them, and the target is still the dense model's distribution
    "arc_easy_train_qa": "arc_easy/train.jsonl",
}

#: the sources a default build reads (``arc_easy_train_qa`` is opt-in: ``--distill-sources``)
DEFAULT_SOURCES = ("gsm8k_train", "boolq_passages", "flores_eng_train", "shakespeare_head")

#: data files that benchmarks here score (or that RoMA / steer evaluate on): never distillation text
HELDOUT_FILES = (
    "arc_easy/test.jsonl", "arc_easy/validation.jsonl", "arc_challenge",
    "gsm8k/test.jsonl", "mgsm", "xcopa", "piqa", "hellaswag", "mc_extra/openbook_qa.jsonl",
    "mc_extra/winogrande.jsonl", "mc_extra/copa.jsonl", "mmlu", "flores_sib200/eng_Latn/test.tsv",
    "flores_sib200/eng_Latn/dev.tsv", "kv_retrieval",
)


@dataclass
class DistillConfig:
    """Settings of the expert + gate distillation (validated on construction)."""

    steps: int = 200  # optimiser steps (a rerun with more steps continues training)
    batch: int = 4  # sequences per step
    seq_len: int = 256
    lr: float = 2e-4  # AdamW, linear warm-up then constant
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0  # KL between softmax(logits / T) of teacher and student (× T²)
    train_gates: bool = True  # router gates too (experts, shared expert and shared gate always)
    sources: tuple[str, ...] = DEFAULT_SOURCES
    pool: int = 2048  # distillation sequences built (cycled by epochs; fixed so that more steps continue)
    val_seqs: int = 8  # distillation-text sequences held out of training: KL before / after
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self):
        self.sources = tuple(self.sources)
        ints = {"steps": 0, "batch": 1, "seq_len": 8, "warmup": 0, "pool": 1, "val_seqs": 1, "checkpoint_every": 1}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"DistillConfig.{name} must be an integer >= {lo}, got {v!r}")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"DistillConfig.{name} must be > 0, got {v!r}")
        if not self.weight_decay >= 0 or not self.grad_clip >= 0:
            raise ValueError("DistillConfig.weight_decay and grad_clip must be >= 0 (grad_clip 0 = off)")
        if not self.sources:
            raise ValueError("DistillConfig.sources is empty")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise ValueError(f"unknown distillation source(s) {bad}; choose from {sorted(SOURCES)}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"duplicate distillation sources in {self.sources}")

    def resume_key(self) -> dict:
        """The settings a checkpoint must match to be resumed (everything but ``steps`` and
        ``checkpoint_every``)."""
        d = asdict(self)
        d.pop("steps")
        d.pop("checkpoint_every")
        d["sources"] = list(d["sources"])
        return d


# ------------------------------------------------------------------------------------------------ text
def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def source_files(sources, data: str | Path | None = None) -> dict[str, Path]:
    """source name -> the file it reads (resolved); raises if a file is missing."""
    from retrofit.core.data import data_dir

    root = data_dir(data)
    out = {}
    for s in sources:
        if s not in SOURCES:
            raise ValueError(f"unknown distillation source {s!r}; choose from {sorted(SOURCES)}")
        p = root / SOURCES[s]
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (distillation source {s}; set RETROFIT_DATA to the shared data "
                                    "folder)")
        out[s] = p
    return out


def distill_texts(source: str, data: str | Path | None = None) -> list[str]:
    """The documents of one distillation source, in file order."""
    p = source_files([source], data)[source]
    if source == "gsm8k_train":
        return [r["question"] + "\n" + r["answer"].replace("####", "The answer is") for r in _read_jsonl(p)]
    if source == "boolq_passages":
        seen, out = set(), []
        for r in _read_jsonl(p):
            q = r["query"]
            passage = q.split("\nQuestion:")[0].removeprefix("Passage:").strip()
            if passage and passage not in seen:
                seen.add(passage)
                out.append(passage)
        return out
    if source == "flores_eng_train":
        lines = p.read_text(encoding="utf-8").splitlines()
        head = lines[0].split("\t")
        col = head.index("text")
        return [line.split("\t")[col] for line in lines[1:] if line.strip()]
    if source == "shakespeare_head":
        return [p.read_text(encoding="utf-8")[slice(*SHAKESPEARE_HEAD)]]
    if source == "arc_easy_train_qa":
        from retrofit.core.data import load_task

        return [f"{e.prompt} {e.choices[e.gold]}" for e in load_task("arc_easy", "train", data=p.parent.parent)]
    raise ValueError(f"unknown distillation source {source!r}")


def distill_sequences(tokenizer, cfg: DistillConfig, n: int, data: str | Path | None = None,
                      return_sources: bool = False):
    """[n, seq_len] token sequences: each source's documents (shuffled by ``seed``, EOS-separated) packed into
    ``seq_len`` windows, the sources interleaved round-robin (equal shares while each lasts; a short source
    such as FLORES runs out and the others fill in). ``return_sources``: also the source of every window."""
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(cfg.seed)
    streams = []
    for s in cfg.sources:
        docs = distill_texts(s, data)
        order = torch.randperm(len(docs), generator=g).tolist()
        streams.append((docs, order))
    per = n  # at most n from each source (a short one runs out, the others fill in)
    chunks: list[list[torch.Tensor]] = []
    for docs, order in streams:
        out, cur = [], []
        for i in order:
            ids = tokenizer(docs[i], add_special_tokens=False)["input_ids"]
            cur += ids + ([eos] if eos is not None else [])
            while len(cur) >= cfg.seq_len and len(out) < per:
                out.append(torch.tensor(cur[:cfg.seq_len]))
                cur = cur[cfg.seq_len:]
            if len(out) >= per:
                break
        chunks.append(out)
    seqs, names = [], []
    for i in range(max(len(c) for c in chunks)):
        seqs += [c[i] for c in chunks if i < len(c)]
        names += [s for s, c in zip(cfg.sources, chunks) if i < len(c)]
    if len(seqs) < n:
        raise ValueError(f"distillation text yields only {len(seqs)} sequences of {cfg.seq_len} tokens, need {n}")
    out = torch.stack(seqs[:n])
    return (out, names[:n]) if return_sources else out


# ------------------------------------------------------------------------------------------------ training
def trainable_names(moe: nn.Module, train_gates: bool = True) -> list[str]:
    """Parameter names the distillation trains: everything inside each layer's MoE block (``.mlp.``), the
    router gate only with ``train_gates``. Attention, embeddings, norms and the LM head stay frozen."""
    names = []
    for n, _ in moe.named_parameters():
        if ".mlp." not in n:
            continue
        if not train_gates and n.endswith(".mlp.gate.weight"):
            continue
        names.append(n)
    if not names:
        raise ValueError(f"{type(moe).__name__} has no MoE-block parameters (.mlp.) to distil")
    return names


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean over tokens of KL(softmax(teacher / T) || softmax(student / T)) · T²."""
    V = student_logits.shape[-1]
    s = torch.log_softmax(student_logits.float().reshape(-1, V) / temperature, -1)
    t = torch.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, seqs: torch.Tensor, batch: int = 4,
            temperature: float = 1.0) -> float:
    """KL(teacher || student) per token averaged over ``seqs`` [N, T] (each batch weighted by its tokens)."""
    tot, n = 0.0, 0
    for s in range(0, len(seqs), batch):
        ids = seqs[s:s + batch]
        kl = kl_to_teacher(student(input_ids=ids, use_cache=False).logits,
                           teacher(input_ids=ids, use_cache=False).logits, temperature)
        tot += float(kl) * ids.numel()
        n += ids.numel()
    return tot / n


def _batch_ids(step: int, n_train: int, batch: int, seed: int) -> torch.Tensor:
    """Row indices of step ``step``'s batch: epoch ``e`` walks a permutation seeded by ``(seed, e)``."""
    rows = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows.append(int(perm[pos]))
    return torch.tensor(rows)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def distill_moe(moe: nn.Module, teacher: nn.Module, train_seqs: torch.Tensor, val_seqs: torch.Tensor,
                cfg: DistillConfig, ckpt_dir: str | Path | None = None, progress: bool = True,
                callback=None) -> dict:
    """Train ``moe``'s MoE blocks in place toward ``teacher`` (the dense model, frozen) on ``train_seqs``
    [N, T]; KL on ``val_seqs`` before and after. Returns a report. ``callback(step, loss)`` runs after every
    step (after its checkpoint is written); an exception it raises stops the run like a kill would.

    With ``ckpt_dir`` the run checkpoints there and a rerun resumes from the last checkpoint (which must have
    been made with the same ``cfg.resume_key()`` on the same trainable parameter shapes, else ValueError)."""
    from tqdm.auto import tqdm

    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg must be a DistillConfig, not {type(cfg).__name__}")
    if train_seqs.ndim != 2 or len(train_seqs) < 1:
        raise ValueError(f"train_seqs must be a non-empty [N, T] tensor, got shape {tuple(train_seqs.shape)}")
    names = trainable_names(moe, cfg.train_gates)
    params = dict(moe.named_parameters())
    train = [params[n] for n in names]
    teacher.eval().requires_grad_(False)
    moe.eval().requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup + 1)))
    ckpt = Path(ckpt_dir) / "distill_ckpt.pt" if ckpt_dir is not None else None
    start, log = 0, []
    t0 = time.time()
    kl_before = None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["resume_key"] != cfg.resume_key():
            raise ValueError(f"{ckpt} was made with other distillation settings ({state['resume_key']}) than "
                             f"{cfg.resume_key()}; delete it or use the same settings")
        shapes = {n: tuple(params[n].shape) for n in names}
        if {n: tuple(v) for n, v in state["shapes"].items()} != shapes:
            raise ValueError(f"{ckpt} holds other parameters than this model's MoE blocks")
        with torch.no_grad():
            for n in names:
                params[n].copy_(state["weights"][n])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, log, kl_before = state["step"], state["log"], state.get("kl_before")
        if start > cfg.steps:
            raise ValueError(f"{ckpt} is at step {start}, past steps={cfg.steps}: give steps >= {start} (the "
                             f"checkpoint is kept)")
        t0 -= state.get("seconds", 0.0)
    if kl_before is None:
        kl_before = mean_kl(moe, teacher, val_seqs, cfg.batch, cfg.temperature)

    def save(step):
        if ckpt is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save({"step": step, "resume_key": cfg.resume_key(), "log": log, "kl_before": kl_before,
                      "shapes": {n: list(params[n].shape) for n in names},
                      "weights": {n: params[n].detach().clone() for n in names},
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "seconds": time.time() - t0}, ckpt)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill experts", disable=not progress)
    try:
        for step in bar:
            ids = train_seqs[_batch_ids(step, len(train_seqs), cfg.batch, cfg.seed)]
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            with torch.enable_grad():
                loss = kl_to_teacher(moe(input_ids=ids, use_cache=False).logits, t_logits, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(train, cfg.grad_clip)
            opt.step()
            sched.step()
            log.append(round(float(loss.detach()), 5))
            bar.set_postfix(kl=f"{log[-1]:.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save(step + 1)
            if callback is not None:
                callback(step, log[-1])
    finally:
        for p in train:
            p.requires_grad_(False)
    kl_after = mean_kl(moe, teacher, val_seqs, cfg.batch, cfg.temperature)
    return {"config": {**asdict(cfg), "sources": list(cfg.sources)}, "steps_done": cfg.steps,
            "trainable_parameters": int(sum(p.numel() for p in train)), "trainable": len(names),
            "train_sequences": len(train_seqs), "tokens_seen": cfg.steps * cfg.batch * train_seqs.shape[1],
            "val_sequences": len(val_seqs), "val_kl_before": round(kl_before, 5), "val_kl_after": round(kl_after, 5),
            "train_kl_first": log[0] if log else None,
            "train_kl_last10": round(sum(log[-10:]) / len(log[-10:]), 5) if log else None,
            "seconds": round(time.time() - t0, 1)}


def distill_data(tokenizer, cfg: DistillConfig, data: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [pool, T], val [val_seqs, T]) distillation sequences; the validation rows are the last ones built,
    never trained on. Training cycles over the pool by epochs."""
    seqs = distill_sequences(tokenizer, cfg, cfg.pool + cfg.val_seqs, data)
    return seqs[:-cfg.val_seqs], seqs[-cfg.val_seqs:]
