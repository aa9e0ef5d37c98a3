"""Static layer pruning at equal compute: the baseline Dr.LLM's routers must beat.

Block influence as in ShortGPT (Men et al., 2024): for decoder layer i with input hidden states X_i and output
X_{i+1}, ``BI_i = 1 - mean over tokens of cos(X_i[t], X_{i+1}[t])``. A layer that barely turns the residual stream
has a low BI; the k lowest-BI layers are dropped for every input. The result is a static Dr.LLM plan (a list of
"skip"/"execute", one per decoder layer) usable as ``plan=`` for the drllm method (and ``retrofit eval --plan``).

Calibration text: by default questions with their correct answers from ARC-Easy *train* (never the test split),
read in place from the shared data folder; ShortGPT used PG19 — ``--calib shakespeare`` gives plain long-form text.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from retrofit.arch import get_adapter


@dataclass
class StaticPruneConfig:
    k: int = 5  # layers to drop
    calib: str = "arc_easy_train"  # or "shakespeare"
    num_samples: int = 128
    max_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.k < 0:
            raise ValueError(f"k={self.k}: the number of layers to drop must be >= 0")
        if self.calib not in ("arc_easy_train", "shakespeare"):
            raise ValueError(f"calib={self.calib!r}: choose arc_easy_train or shakespeare")
        if self.num_samples < 1 or self.max_tokens < 2:
            raise ValueError("num_samples must be >= 1 and max_tokens >= 2")


def calibration_texts(calib: str = "arc_easy_train", num_samples: int = 128, seed: int = 0,
                      data: str | Path | None = None) -> list[str]:
    """Calibration texts read in place from the shared data folder (see :func:`retrofit.core.data.data_dir`)."""
    from retrofit.core.data import data_dir

    root = data_dir(data)
    rng = random.Random(seed)
    if calib == "arc_easy_train":
        path = root / "arc_easy" / "train.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: set RETROFIT_DATA to the shared data folder")
        docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rng.shuffle(docs)
        out = []
        for d in docs[:num_samples]:
            ans = d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])]
            out.append(f"Question: {d['question']}\nAnswer: {ans}")
        return out
    path = root / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        cands = sorted((root / "tinyshakespeare").glob("*.txt"))
        if not cands:
            raise FileNotFoundError(f"no text file in {root / 'tinyshakespeare'}")
        path = cands[0]
    text = path.read_text()
    starts = sorted(rng.sample(range(0, max(1, len(text) - 2000)), num_samples))
    return [text[s:s + 1500] for s in starts]


@torch.no_grad()
def block_influence(model, tokenizer, texts: list[str], max_tokens: int = 256, progress: bool = True) -> torch.Tensor:
    """ShortGPT block influence per decoder layer (float64 tensor [L]), over all tokens of ``texts``.

    Each text runs alone (no padding); forward hooks read each decoder layer's input and output hidden states.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    L = len(layers)
    sums = torch.zeros(L, dtype=torch.float64)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            captured[i] = (x.detach(), y.detach())
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for text in tqdm(texts, desc="block influence", disable=not progress):
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
            ids = ids.to(next(model.parameters()).device)
            captured.clear()
            model(input_ids=ids, use_cache=False)
            if len(captured) != L:
                raise RuntimeError(f"hooks saw {len(captured)} of {L} decoder layers")
            for i in range(L):
                x, y = captured[i]
                cos = torch.nn.functional.cosine_similarity(x.double().flatten(0, -2), y.double().flatten(0, -2),
                                                            dim=-1)
                sums[i] += cos.sum()
            count += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    return 1.0 - sums / count


def plan_from_scores(scores, k: int) -> list[str]:
    """Skip the ``k`` layers with the lowest block influence (ties: the later layer first), execute the rest."""
    scores = [float(s) for s in scores]
    L = len(scores)
    if k > L:
        raise ValueError(f"cannot drop k={k} layers from a model with {L}")
    order = sorted(range(L), key=lambda i: (scores[i], -i))
    drop = set(order[:k])
    return ["skip" if i in drop else "execute" for i in range(L)]


def static_prune_plan(model, tokenizer, config: StaticPruneConfig | None = None, texts: list[str] | None = None,
                      data: str | Path | None = None, progress: bool = True) -> dict:
    """``{"plan": [...], "scores": [...], "dropped": [...], "config": {...}}`` for ``config.k`` dropped layers."""
    config = config or StaticPruneConfig()
    if texts is None:
        texts = calibration_texts(config.calib, config.num_samples, config.seed, data=data)
    scores = block_influence(model, tokenizer, texts, config.max_tokens, progress=progress)
    plan = plan_from_scores(scores.tolist(), config.k)
    return {"plan": plan, "scores": [float(s) for s in scores],
            "dropped": [i for i, a in enumerate(plan) if a == "skip"],
            "num_layers": len(plan), "config": asdict(config), "method": "shortgpt_block_influence"}
