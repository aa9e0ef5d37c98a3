"""A real DSA lightning indexer for a model that has none: distilled onto SmolLM2 from its own attention.

DeepSeek-V3.2's dense warm-up trains the indexer alone (main model frozen) with
    L = sum_t KL( p_t || softmax_s I[t, s] ),  p_t = the attention distribution of query t summed over the heads
                                                     of the layer and L1-normalised,
which is what :func:`distill_indexers` does for a few layers of a frozen Llama-family model (SmolLM2-135M).
The indexer has DSA's shape: ``n_heads`` query heads, one key shared by all heads (LayerNorm'ed, partial RoPE
on the first ``rope_dim`` dims, half-split like DeepSeek-V3.2's indexer), per-head weights that may be negative,
scores ``I[t,s] = sum_j w[t,j] * ReLU(scale * q[t,j] . k[s])``. It reads the layer's attention input (after the
decoder layer's input RMSNorm). The artifact is safetensors + JSON with the base model's fingerprint.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from retrofit.arch import get_adapter
from retrofit.artifacts import load_artifact, save_artifact

ARTIFACT_METHOD = "misa_indexer"


@dataclass
class IndexerConfig:
    hidden_size: int = 576
    n_heads: int = 64
    head_dim: int = 64
    rope_dim: int = 32
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= self.head_dim:
            raise ValueError(f"rope_dim must be even and <= head_dim, got {self.rope_dim}")
        if min(self.hidden_size, self.n_heads, self.head_dim) < 1:
            raise ValueError("hidden_size, n_heads and head_dim must be positive")


@dataclass
class DistillConfig:
    layers: tuple = (4, 12, 20)
    seq_len: int = 512
    steps: int = 120
    batch: int = 1
    lr: float = 3e-3
    train_windows: int = 24  # precomputed training windows (3/4 Shakespeare, 1/4 kv_retrieval)
    heldout_windows: int = 6
    seed: int = 0
    indexer: IndexerConfig = field(default_factory=IndexerConfig)

    def __post_init__(self):
        if isinstance(self.indexer, dict):
            self.indexer = IndexerConfig(**self.indexer)
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers or min(self.layers) < 0:
            raise ValueError("layers must be a non-empty list of decoder-layer indices")
        for n in ("seq_len", "steps", "batch", "train_windows", "heldout_windows"):
            if getattr(self, n) < 1:
                raise ValueError(f"DistillConfig.{n} must be >= 1")


class LightningIndexer(nn.Module):
    """DSA-style lightning indexer (see module docstring)."""

    def __init__(self, cfg: IndexerConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.n_heads, bias=False)
        self.softmax_scale = cfg.head_dim**-0.5
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rope_dim, 2).float() / max(cfg.rope_dim, 1)))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rope(self, x, pos):
        r = self.cfg.rope_dim
        if r == 0:
            return x
        ang = pos.float()[:, None] * self.inv_freq[None, :]  # [S, r/2]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        if x.dim() == 4:  # [B, S, H, D]
            cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        else:  # [B, S, D]
            cos, sin = cos[None], sin[None]
        xr, xp = x[..., :r], x[..., r:]
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        rot = torch.cat([-x2, x1], -1)
        return torch.cat([xr * cos + rot * sin, xp], -1)

    def project(self, x: torch.Tensor, positions: torch.Tensor | None = None):
        """x ``[B,S,hidden]`` (the layer's normed attention input) -> q ``[B,S,H,D]``, k ``[B,S,D]``, w ``[B,S,H]``."""
        B, S, _ = x.shape
        pos = torch.arange(S, device=x.device) if positions is None else positions
        q = self._rope(self.wq(x).view(B, S, self.n_heads, self.head_dim), pos)
        k = self._rope(self.k_norm(self.wk(x)), pos)
        w = self.weights_proj(x) * self.n_heads**-0.5
        return q, k, w

    def scores(self, q, k, w):
        """Dense index scores ``[B,S,T]`` (no mask)."""
        B, S, H, D = q.shape
        s = torch.relu(torch.matmul(q.reshape(B, S * H, D), k.transpose(1, 2)) * self.softmax_scale)
        return torch.matmul(w.unsqueeze(-2), s.view(B, S, H, -1)).squeeze(-2)


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------
def shakespeare_ids(tok, data_dir: Path) -> torch.Tensor:
    path = Path(data_dir) / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: point data_dir at the shared evaluation data (../shared/data).")
    return torch.tensor(tok(path.read_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)


def kv_retrieval_ids(tok, data_dir: Path, n: int = 4, length: int = 8192, where: str = "middle") -> list[torch.Tensor]:
    path = Path(data_dir) / "kv_retrieval" / f"kv_pairs_{where}_len_{length}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: point data_dir at the shared evaluation data (../shared/data).")
    out = []
    with path.open() as f:
        for line in f:
            out.append(torch.tensor(tok(json.loads(line)["context"], add_special_tokens=False)["input_ids"]))
            if len(out) >= n:
                break
    return out


def split_shakespeare(ids: torch.Tensor, train_frac: float = 0.7):
    cut = int(len(ids) * train_frac)
    return ids[:cut], ids[cut:]


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model, input_ids: torch.Tensor, layers, positions_offset: int = 0) -> dict[int, torch.Tensor]:
    """The normed attention inputs ``[B,S,hidden]`` of ``layers`` (the model stops after the last one)."""
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    out, hooks = {}, []
    last = max(layers)
    for i in layers:
        def hook(mod, args, kwargs, i=i):
            out[i] = (kwargs.get("hidden_states", args[0] if args else None)).detach().float().clone()
            if i == last:
                raise _Stop
        hooks.append(adapter.attention(blocks[i]).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return out


def attention_target(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Head-aggregated causal attention distribution ``[B,S,S]`` of decoder layer ``layer`` on its input ``x``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    adapter = get_adapter(model)
    attn = adapter.attention(adapter.layers(model)[layer])
    B, S, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, S, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
    pos = torch.arange(S, device=x.device)[None]
    cos, sin = adapter.decoder(model).rotary_emb(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum(1)
    return p / p.sum(-1, keepdim=True)


def kl_loss(index_scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    S = index_scores.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=index_scores.device).tril()
    logq = torch.log_softmax(index_scores.masked_fill(~causal, float("-inf")), -1)
    t = target.clamp_min(1e-12)
    kl = (target * (t.log() - logq.masked_fill(~causal, 0.0))).sum(-1)
    return kl.mean()


@torch.no_grad()
def mass_captured(index_scores, target, k: int) -> tuple[float, float]:
    """(attention mass inside the indexer's top-k, mass inside the attention's own top-k), averaged over queries."""
    S = index_scores.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=index_scores.device).tril()
    sel = index_scores.masked_fill(~causal, float("-inf")).topk(min(k, S), -1).indices
    got = torch.gather(target, -1, sel).sum(-1).mean()
    best = target.topk(min(k, S), -1).values.sum(-1).mean()
    return float(got), float(best)


# ------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------
def _windows(ids: torch.Tensor, n: int, length: int, rng: random.Random) -> list[torch.Tensor]:
    starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
    return [ids[s: s + length] for s in starts]


def distill_indexers(model, tok, data_dir, cfg: DistillConfig | None = None, log=print):
    """Train one lightning indexer per layer in ``cfg.layers`` on the frozen ``model``; returns
    ``(indexers: {layer: LightningIndexer}, metrics: dict)``. The model is never written."""
    cfg = cfg or DistillConfig()
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    nl = get_adapter(model).num_layers(model)
    if max(cfg.layers) >= nl:
        raise ValueError(f"layers {cfg.layers} out of range for a {nl}-layer model")
    ids = shakespeare_ids(tok, data_dir)
    train_ids, test_ids = split_shakespeare(ids)
    n_kv = cfg.train_windows // 4
    wins = _windows(train_ids, cfg.train_windows - n_kv, cfg.seq_len, rng)
    for t in kv_retrieval_ids(tok, data_dir, n=max(1, n_kv // 4 + 1), length=2048):
        wins += _windows(t, 4, cfg.seq_len, rng)
    wins = wins[: cfg.train_windows]
    held = _windows(test_ids, cfg.heldout_windows, cfg.seq_len, rng)
    xs_train = {i: [] for i in cfg.layers}
    xs_held = {i: [] for i in cfg.layers}
    t0 = time.time()
    for bucket, src in ((xs_train, wins), (xs_held, held)):
        for j in tqdm(range(0, len(src), 4), desc="hidden states", leave=False):
            got = layer_inputs(model, torch.stack(src[j: j + 4]), cfg.layers)
            for i in cfg.layers:
                bucket[i].append(got[i])
    xs_train = {i: torch.cat(v) for i, v in xs_train.items()}
    xs_held = {i: torch.cat(v) for i, v in xs_held.items()}
    log(f"collected hidden states for {len(wins)}+{len(held)} windows in {time.time() - t0:.0f}s")

    indexers, metrics = {}, {"layers": {}}
    for layer in cfg.layers:
        icfg = IndexerConfig(**{**asdict(cfg.indexer), "hidden_size": model.config.hidden_size})
        idx = LightningIndexer(icfg)
        nn.init.normal_(idx.weights_proj.weight, std=0.02)
        opt = torch.optim.AdamW(idx.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
        X = xs_train[layer]
        first = last = None
        bar = tqdm(range(cfg.steps), desc=f"distill layer {layer}", leave=False)
        for step in bar:
            b = torch.tensor(rng.sample(range(len(X)), cfg.batch))
            x = X[b]
            with torch.no_grad():
                target = attention_target(model, layer, x)
            q, k, w = idx.project(x)
            loss = kl_loss(idx.scores(q, k, w), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(idx.parameters(), 1.0)
            opt.step()
            sched.step()
            first = float(loss.detach()) if first is None else first
            last = float(loss.detach())
            bar.set_postfix(kl=f"{last:.3f}")
        idx.eval().requires_grad_(False)
        with torch.no_grad():
            xh = xs_held[layer]
            target = attention_target(model, layer, xh)
            sc = idx.scores(*idx.project(xh))
            held_kl = float(kl_loss(sc, target))
            uniform = torch.zeros_like(sc)
            uni_kl = float(kl_loss(uniform, target))
            got, best = mass_captured(sc, target, 64)
        metrics["layers"][layer] = dict(train_kl_first=first, train_kl_last=last, heldout_kl=held_kl,
                                        heldout_kl_uniform=uni_kl, mass_top64=got, mass_top64_oracle=best)
        log(f"layer {layer}: train KL {first:.3f} -> {last:.3f}; held-out KL {held_kl:.3f} (uniform {uni_kl:.3f}); "
            f"attention mass in indexer top-64 {got:.3f} (attention's own top-64: {best:.3f})")
        indexers[layer] = idx
    metrics["seconds"] = time.time() - t0
    return indexers, metrics


def save_indexers(path, model, indexers: dict, cfg: DistillConfig, metrics: dict) -> Path:
    tensors = {f"layer{l}.{n}": p.detach() for l, idx in indexers.items() for n, p in idx.state_dict().items()}
    c = asdict(cfg)
    c["layers"] = list(cfg.layers)
    return save_artifact(path, ARTIFACT_METHOD, c, tensors, model, extra={"metrics": metrics})


def load_indexers(path, model=None) -> tuple[dict, dict]:
    """``({layer: LightningIndexer}, meta)`` from an artifact written by :func:`save_indexers`."""
    meta, tensors = load_artifact(path, model=model, method=ARTIFACT_METHOD)
    cfg = DistillConfig(**meta["config"])
    out = {}
    for l in cfg.layers:
        idx = LightningIndexer(IndexerConfig(**asdict(cfg.indexer)))
        sd = {n[len(f"layer{l}."):]: t for n, t in tensors.items() if n.startswith(f"layer{l}.")}
        idx.load_state_dict(sd)
        out[l] = idx.eval().requires_grad_(False)
    return out, meta


def default_indexer_path() -> Path:
    from retrofit.models import cache_dir

    return cache_dir() / "misa" / "smollm2-lightning-indexer"


@torch.no_grad()
def long_context_inputs(model, tok, data_dir, layers, length: int = 32768, chunk: int = 8192,
                        cache: Path | None = None, offset: int = 0) -> dict[int, torch.Tensor]:
    """Attention inputs ``[length, hidden]`` of ``layers`` over ``length`` tokens of held-out Shakespeare
    (the last 30% of the file) starting ``offset`` tokens into it, made by running the model over consecutive
    ``chunk``-token pieces (within its 8192-token context) and concatenating. Cached as safetensors
    (activations, not an artifact). A nonzero ``offset`` gives a segment disjoint from the benchmark's
    (``offset >= length``), used to choose router settings without touching the measured text."""
    from safetensors.torch import load_file, save_file

    if cache is not None and Path(cache).is_file():
        got = load_file(str(cache))
        if all(f"layer{l}" in got and got[f"layer{l}"].shape[0] >= length for l in layers):
            return {l: got[f"layer{l}"][:length] for l in layers}
    _, test_ids = split_shakespeare(shakespeare_ids(tok, data_dir))
    if offset < 0 or len(test_ids) < offset + length:
        raise ValueError(f"held-out text has {len(test_ids)} tokens, fewer than offset {offset} + length {length}")
    ids = test_ids[offset: offset + length]
    parts = {l: [] for l in layers}
    for s in tqdm(range(0, length, chunk), desc="long-context hidden states"):
        got = layer_inputs(model, ids[s: s + chunk][None], layers)
        for l in layers:
            parts[l].append(got[l][0])
    out = {l: torch.cat(v) for l, v in parts.items()}
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file({f"layer{l}": t.contiguous() for l, t in out.items()}, str(cache))
    return out
