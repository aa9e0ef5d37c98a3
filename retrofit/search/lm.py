"""Layer-skip evidence from plain text: how much skipping each single decoder layer raises the next-token loss.

A multiple-choice search (:mod:`retrofit.search.run`) says which layers a *task* can spare; running text
(prose, dialogue, worked solutions) has its own safe layers, and on SmolLM2-135M they are not the same ones
(docs/drllm.md): the layers ARC-Easy answers survive without (18-20) cost the most language-modelling loss of the
middle layers, the ones prose spares (12, 14, 17) cost ARC-Easy 5-6 points. Records made here go into router
training beside the search records (``retrofit train --target task``), so that routers learn which kind of input
they see and skip that kind's safe layers.

Each record has the keys of a search record that training reads (``id``, ``task``, ``prompt``, ``plan``: the
all-execute plan, ``found``) plus ``base_loss`` and ``layer_loss_increase`` (L floats: the window's mean
next-token loss with that one layer skipped, minus the loss of the full model).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from retrofit.arch import get_adapter

__all__ = ["layer_loss_increase", "lm_records", "text_windows", "write_lm_records"]


def text_windows(tokenizer, sources, n: int, seq_len: int = 128, seed: int = 1,
                 data=None) -> tuple[torch.Tensor, list[str]]:
    """([n, seq_len] token windows, the source of each) from the text sources of
    :data:`retrofit.moe.distill.SOURCES` (documents shuffled by ``seed``, EOS-separated, packed; the sources
    interleaved, see :func:`retrofit.moe.distill.distill_sequences`). No source holds a benchmark's evaluation
    text."""
    from retrofit.moe.distill import DistillConfig, distill_sequences

    return distill_sequences(tokenizer, DistillConfig(seq_len=seq_len, sources=tuple(sources), seed=seed), n,
                             data, return_sources=True)


@torch.no_grad()
def layer_loss_increase(model, input_ids: torch.Tensor, batch: int = 8,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(base loss [N], increase [N, L]) of windows ``input_ids`` [N, T] (no padding): the mean next-token loss of
    each window under the plan that skips layer l alone, minus its loss under the full model. The hidden state
    entering every layer is kept from the full run, so skipping layer l re-runs only the layers above it."""
    from tqdm.auto import tqdm

    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [windows, tokens] with at least 2 tokens, got {tuple(input_ids.shape)}")
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    L = len(layers)
    dev = next(model.parameters()).device
    bases, incs = [], []
    for s in tqdm(range(0, input_ids.shape[0], batch), desc="single-layer skips", disable=not progress):
        ids = input_ids[s:s + batch].to(dev)
        h, kw = adapter.prepare(model, ids)
        entering = []
        for layer in layers:
            entering.append(h)
            h = adapter.call_layer(layer, h, kw)

        def loss(hidden):
            logits = adapter.head(model, hidden)[:, :-1].float()
            tgt = ids[:, 1:]
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").mean(1)

        base = loss(h)
        inc = torch.empty(ids.shape[0], L)
        for skip in range(L):
            x = entering[skip]
            for j in range(skip + 1, L):
                x = adapter.call_layer(layers[j], x, kw)
            inc[:, skip] = (loss(x) - base).cpu()
        bases.append(base.cpu())
        incs.append(inc)
    return torch.cat(bases), torch.cat(incs)


def lm_records(model, tokenizer, input_ids: torch.Tensor, task: str | list[str] = "text", batch: int = 8,
               progress: bool = True) -> list[dict]:
    """One record per window of ``input_ids`` [N, T] (see the module docstring); ``task``: one task name for
    every window, or one per window (e.g. the sources of :func:`text_windows`)."""
    tasks = [task] * input_ids.shape[0] if isinstance(task, str) else list(task)
    if len(tasks) != input_ids.shape[0]:
        raise ValueError(f"{len(tasks)} task names for {input_ids.shape[0]} windows")
    base, inc = layer_loss_increase(model, input_ids, batch=batch, progress=progress)
    L = inc.shape[1]
    out = []
    for i in range(input_ids.shape[0]):
        out.append({"id": f"{tasks[i]}-{i}", "task": tasks[i], "kind": "lm",
                    "prompt": tokenizer.decode(input_ids[i].tolist()),
                    "plan": ["execute"] * L, "found": True, "base_loss": round(float(base[i]), 5),
                    "layer_loss_increase": [round(float(v), 5) for v in inc[i]]})
    return out


def write_lm_records(records: list[dict], path: str | Path) -> Path:
    """JSONL (gzip when the name ends in .gz), readable by :func:`retrofit.search.run.read_records`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
