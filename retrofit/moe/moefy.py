"""The MoE testbed: a dense Llama-style model (SmolLM2-135M) converted into an MoE from its own weights.

No pretrained MoE can be downloaded here and random weights cannot show that a routing method helps, so
retrofit builds one (MoEfication-style; details and measurements in docs/moe.md). Default layout: Qwen2-MoE,
per layer a shared expert of the 768 most important MLP neurons + 8 routed experts of 96 neurons, top-2
(``arch="mixtral", shared=0`` gives a routed-only Mixtral):

1. **Calibration.** ARC-Easy train questions with their answers plus a Shakespeare slice that the benchmark
   never scores, in equal-length sequences.
2. **Sequential pass.** The batch runs through the model layer by layer; layer ``l`` is converted on the MLP
   inputs (after ``post_attention_layernorm``) it sees when layers ``< l`` are already MoE.
3. **Split.** The shared expert takes the most important neurons (mean + max share of a token's MLP output, so
   the few neurons writing SmolLM2's massive attention-sink activations are always on); the rest are split into
   ``E`` equal experts by balanced spherical k-means on their co-activation patterns (``|silu(g)·u|``).
4. **Map.** Fused 5.x layout: ``experts.gate_up_proj[e] = [gate; up]`` rows, ``experts.down_proj[e]`` columns.
   The dense MLP is the plain *sum* of its neuron groups while the router renormalises its top-k softmax
   weights to 1, so every routed ``down_proj`` is scaled by ``top_k`` (equal weights ``1/k`` give the chosen
   experts' sum); the shared expert's ``down_proj`` is doubled against ``sigmoid(0)`` of a zero shared gate.
   With ``top_k == E`` and a zero gate the MoE reproduces the dense model (up to float summation order; tested).
5. **Fit the gate.** Per layer a bias-free ``Linear(hidden -> E)`` trained with Adam on per-token relative MSE
   between the dense MLP output and the MoE block's output through the real top-k + renormalise path, plus a
   cross-entropy term toward the oracle top-k set (selection itself has no gradient); ridge-regression init.

``moefy_model(dense, ...)`` converts any bias-free Llama-family model (tests use a tiny random one);
6. **Distil** (``retrofit.moe.distill``, default): the MoE blocks (experts, shared expert, gates) trained toward
   the dense model's next-token distribution (KL on logits) over English text no benchmark here scores;
   attention, embeddings, norms and the LM head frozen; resumable checkpoints.

``moefy_model(dense, ...)`` converts any bias-free Llama-family model (tests use a tiny random one);
``load_testbed(experts, top_k)`` returns the SmolLM2 testbed from the cache, building it on first use.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoefyConfig", "moefy_model", "calibration_ids", "heldout_text", "testbed_dir", "load_testbed",
           "build_testbed", "distill_checkpoint_dir", "balanced_kmeans", "expert_split", "moe_config", "build_moe",
           "neuron_importance"]

# Shakespeare character ranges: the gate fit reads the first part; the benchmark's perplexity reads the tail.
SHAKESPEARE_FIT = (0, 500_000)
SHAKESPEARE_HELDOUT_START = 1_000_000


@dataclass
class MoefyConfig:
    experts: int = 8
    top_k: int = 4  # 2 of 8 loses 9-10 ARC points to dense even distilled; 4 keeps it within 5 (BENCHMARKS)
    shared: int = 768  # neurons of the always-on shared expert (qwen2_moe); 0 for mixtral
    arch: str = "qwen2_moe"  # "qwen2_moe" (shared expert + routed experts) | "mixtral" (routed only)
    tokens: int = 8192  # calibration tokens (the last `val_frac` of them only measure the fit)
    steps: int = 200  # Adam steps per layer
    lr: float = 1e-2
    batch: int = 1024
    ce_weight: float = 0.1
    cluster: str = "coact"  # "coact" | "weights" | "random"
    cluster_tokens: int = 2048
    kmeans_iters: int = 15
    val_frac: float = 0.1
    seq_len: int = 256
    sequential: bool = True  # fit layer l on the inputs it gets when layers < l are already MoE
    seed: int = 0

    def validate(self, intermediate_size: int | None = None) -> "MoefyConfig":
        if self.experts < 1 or not 1 <= self.top_k <= self.experts:
            raise ValueError(f"need 1 <= top_k <= experts, got experts={self.experts}, top_k={self.top_k}")
        if self.arch not in ("qwen2_moe", "mixtral"):
            raise ValueError(f"arch must be qwen2_moe or mixtral, not {self.arch!r}")
        if self.arch == "mixtral" and self.shared:
            raise ValueError("Mixtral has no shared expert: use shared=0 with arch='mixtral'")
        if self.shared < 0 or (intermediate_size is not None and self.shared >= intermediate_size):
            raise ValueError(f"shared={self.shared} must be in [0, intermediate_size)")
        if intermediate_size is not None and (intermediate_size - self.shared) % self.experts:
            raise ValueError(f"intermediate_size {intermediate_size} minus shared {self.shared} is not divisible by "
                             f"experts={self.experts}")
        if intermediate_size is not None and self.arch == "qwen2_moe" and ((intermediate_size - self.shared)
                                                                          // self.experts) % 4:
            raise ValueError("Qwen2-MoE's grouped expert matmul needs an expert width divisible by 4; got "
                             f"({intermediate_size} - {self.shared}) / {self.experts}")
        if self.cluster not in ("coact", "weights", "random"):
            raise ValueError(f"cluster must be coact, weights or random, not {self.cluster!r}")
        if self.steps < 0 or self.tokens < 16:
            raise ValueError("steps must be >= 0 and tokens >= 16")
        return self


# ------------------------------------------------------------------------------------------------ clustering
def balanced_kmeans(feats: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Labels [n] putting exactly ``n // k`` rows of ``feats`` [n, d] in each of ``k`` clusters.

    Spherical k-means (rows and centroids unit-normalised, cosine distance) whose assignment step is greedy
    under capacity: (row, cluster) pairs in order of increasing distance, each row to the first cluster with
    room.
    """
    n = feats.shape[0]
    if n % k:
        raise ValueError(f"{n} rows cannot be split into {k} equal clusters")
    cap = n // k
    X = F.normalize(feats.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    C = X[torch.randperm(n, generator=g)[:k]].clone()
    labels = torch.empty(n, dtype=torch.long)
    for _ in range(max(1, iters)):
        dist = (1 - X @ C.T).numpy()  # [n, k]
        order = dist.reshape(-1).argsort(kind="stable")
        lab = [-1] * n
        room = [cap] * k
        left = n
        for flat in order.tolist():
            i, c = divmod(flat, k)
            if lab[i] < 0 and room[c] > 0:
                lab[i] = c
                room[c] -= 1
                left -= 1
                if left == 0:
                    break
        new = torch.tensor(lab, dtype=torch.long)
        if torch.equal(new, labels):
            break
        labels = new
        C = F.normalize(torch.zeros(k, X.shape[1]).index_add_(0, labels, X), dim=1)
    return labels


def neuron_importance(act: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    """[I] importance of each neuron: its mean share of each token's MLP output, ``|a_ti|·||W_down[:, i]|| /
    ||y_t||`` (so tokens with massive activations do not dominate), plus its largest share on any token (so the
    few neurons that write a massive activation, e.g. the attention-sink token's, rank first)."""
    y = act @ mlp.down_proj.weight.T
    contrib = act.abs() * mlp.down_proj.weight.norm(dim=0)  # [T, I]
    rel = contrib / y.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return rel.mean(0) + rel.max(0).values


def expert_split(act: torch.Tensor | None, mlp: nn.Module, experts: int, method: str = "coact",
                 iters: int = 15, seed: int = 0, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared [S] neuron indices, routed [E, (I - S)/E] neuron indices of each expert), each row sorted.

    The shared expert takes the ``shared`` most important neurons (:func:`neuron_importance`, needs ``act``);
    the rest are clustered into equal experts."""
    inter = mlp.gate_proj.weight.shape[0]
    if shared:
        if act is None:
            raise ValueError("choosing shared neurons needs activations (act)")
        order = torch.argsort(neuron_importance(act, mlp), descending=True)
        shared_idx, rest = order[:shared].sort().values, order[shared:].sort().values
    else:
        shared_idx, rest = torch.empty(0, dtype=torch.long), torch.arange(inter)
    n = rest.numel()
    if experts == 1:
        labels = torch.zeros(n, dtype=torch.long)
    elif method == "random":
        labels = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % experts
    elif method == "weights":
        labels = balanced_kmeans(torch.cat([mlp.gate_proj.weight[rest], mlp.up_proj.weight[rest]], 1), experts,
                                 iters, seed)
    else:
        labels = balanced_kmeans(act[:, rest].abs().T, experts, iters, seed)
    return shared_idx, torch.stack([rest[labels == e] for e in range(experts)])


# ------------------------------------------------------------------------------------------------ model building
def moe_config(dense_config, experts: int, top_k: int, shared: int = 0, arch: str = "qwen2_moe"):
    """A Qwen2-MoE or Mixtral config with the dense Llama config's attention, norms, rope and vocabulary."""
    c = dense_config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("moefy needs a bias-free Llama (attention_bias and mlp_bias False)")
    rope = getattr(c, "rope_parameters", None)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=head_dim,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), attention_dropout=0.0,
        num_experts_per_tok=top_k, output_router_logits=False,
        rope_parameters=dict(rope) if rope is not None else None,
    )
    routed = (c.intermediate_size - shared) // experts
    if arch == "mixtral":
        from transformers import MixtralConfig

        if shared:
            raise ValueError("Mixtral has no shared expert")
        return MixtralConfig(intermediate_size=routed, num_local_experts=experts, sliding_window=None,
                             router_jitter_noise=0.0, **common)
    from transformers import Qwen2MoeConfig

    if not shared:
        raise ValueError("qwen2_moe testbeds carry a shared expert (shared > 0); use arch='mixtral' for none")
    if head_dim * c.num_attention_heads != c.hidden_size:
        pass  # Qwen2-MoE reads config.head_dim when given (transformers 5.x)
    return Qwen2MoeConfig(intermediate_size=c.intermediate_size, moe_intermediate_size=routed,
                          shared_expert_intermediate_size=shared, num_experts=experts, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=False, use_sliding_window=False,
                          sliding_window=None, **common)


def _check_llama(dense: nn.Module):
    from retrofit.arch import get_adapter

    ad = get_adapter(dense)
    if ad.family not in ("llama", "mistral") or ad.gate_scoring is not None:
        raise ValueError(f"moefy converts a dense Llama-style model, not {type(dense).__name__} ({ad.family})")
    mlp = ad.layers(dense)[0].mlp
    for a in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(mlp, a):
            raise ValueError(f"{type(mlp).__name__} has no {a}: moefy needs a SwiGLU MLP")
    return ad


def build_moe(dense: nn.Module, splits: list[tuple[torch.Tensor, torch.Tensor]], gate_weights: list[torch.Tensor],
              top_k: int, arch: str = "qwen2_moe"):
    """The MoE model (Qwen2MoeForCausalLM or MixtralForCausalLM) with the dense model's weights, the given
    per-layer neuron splits ``(shared_idx, routed_idx [E, m])`` and gate weights ``[E, H]``."""
    from transformers import AutoModelForCausalLM

    E = splits[0][1].shape[0]
    S = splits[0][0].numel()
    config = moe_config(dense.config, E, top_k, S, arch)
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(config).to(next(dense.parameters()).dtype)
    sd = {name: p for name, p in dense.state_dict().items() if ".mlp." not in name}
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        sh, idx = splits[i]
        Wg, Wu, Wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        pre = f"model.layers.{i}.mlp."
        sd[pre + "experts.gate_up_proj"] = torch.stack([torch.cat([Wg[idx[e]], Wu[idx[e]]], 0) for e in range(E)])
        # the renormalised top-k weights sum to 1: scale by k so that equal weights give the experts' plain sum
        sd[pre + "experts.down_proj"] = torch.stack([Wd[:, idx[e]] * top_k for e in range(E)])
        sd[pre + "gate.weight"] = gate_weights[i].to(Wg.dtype)
        if S:
            sd[pre + "shared_expert.gate_proj.weight"] = Wg[sh]
            sd[pre + "shared_expert.up_proj.weight"] = Wu[sh]
            sd[pre + "shared_expert.down_proj.weight"] = Wd[:, sh] * 2.0  # × sigmoid(0) = 0.5 of the zero gate
            sd[pre + "shared_expert_gate.weight"] = torch.zeros(1, Wg.shape[1], dtype=Wg.dtype)
    sd = {k: v.clone() for k, v in sd.items()}  # never share storage with the dense model
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.eval().requires_grad_(False)
    return moe


# ------------------------------------------------------------------------------------------------ gate fitting
def _expert_outputs(x: torch.Tensor, mlp: nn.Module, shared: torch.Tensor, idx: torch.Tensor, chunk: int = 4096):
    """(Y [N, E, H] each routed expert's unscaled output, y_shared [N, H], y [N, H] the dense MLP output)."""
    Wd = mlp.down_proj.weight
    Ys, shs, ys = [], [], []
    for s in range(0, x.shape[0], chunk):
        xc = x[s:s + chunk]
        a = F.silu(xc @ mlp.gate_proj.weight.T) * (xc @ mlp.up_proj.weight.T)
        Ys.append(torch.stack([a[:, idx[e]] @ Wd[:, idx[e]].T for e in range(idx.shape[0])], 1))
        shs.append(a[:, shared] @ Wd[:, shared].T)
        ys.append(a @ Wd.T)
    return torch.cat(Ys), torch.cat(shs), torch.cat(ys)


def _moe_out(logits: torch.Tensor, Y: torch.Tensor, k: int) -> torch.Tensor:
    """The routed part as the MoE block computes it: softmax -> top-k -> renormalise; experts scaled by k."""
    p = torch.softmax(logits.float(), -1)
    top, ind = torch.topk(p, k, -1)
    w = top / top.sum(-1, keepdim=True)
    chosen = torch.gather(Y, 1, ind[..., None].expand(-1, -1, Y.shape[-1]))
    return k * (w[..., None] * chosen).sum(1)


def _rel_err(yhat, y) -> float:
    """Mean over tokens of ||yhat - y||^2 / ||y||^2 (per token, so massive-activation tokens do not dominate)."""
    return float((((yhat - y) ** 2).sum(-1) / (y ** 2).sum(-1).clamp_min(1e-12)).mean())


def fit_gate(x: torch.Tensor, Y: torch.Tensor, y_shared: torch.Tensor, y: torch.Tensor, k: int, cfg: MoefyConfig,
             n_train: int) -> tuple[torch.Tensor, dict]:
    """Gate weight [E, H] fitted on the first ``n_train`` rows; fit metrics (per-token relative error of the MLP
    output, :func:`_rel_err`) measured on the rest."""
    N, E, H = Y.shape
    yr = y - y_shared  # what the routed experts must produce
    xv, Yv, yv, shv = x[n_train:], Y[n_train:], y[n_train:], y_shared[n_train:]
    if k == E:  # every expert runs: a zero gate gives uniform weights 1/E -> exactly the dense MLP
        W = torch.zeros(E, H)
        return W, {"rel_err_fit": _rel_err(shv + _moe_out(xv @ W.T, Yv, k), yv)}
    # oracle scores: error reduction from one expert alone, ||yr||^2 - ||yr - y_e||^2
    gains = 2 * (Y * yr[:, None]).sum(-1) - (Y ** 2).sum(-1)  # [N, E]
    target = torch.topk(gains, k, -1).indices
    xt, Yt, yrt, tt = x[:n_train], Y[:n_train], yr[:n_train], target[:n_train]
    wt = 1.0 / (y[:n_train] ** 2).sum(-1).clamp_min(1e-12)  # per-token normaliser
    scale = xt.std(0).clamp_min(1e-6)  # train on standardised inputs, fold the scale back into W
    xs = xt / scale
    g = gains[:n_train] * wt[:, None].sqrt()
    g = (g - g.mean(1, keepdim=True)) / g.std(1, keepdim=True).clamp_min(1e-9)
    A = xs.T @ xs + 1e-2 * n_train * torch.eye(H)
    W0 = torch.linalg.solve(A, xs.T @ g).T  # ridge init on the standardised gains
    W = nn.Parameter(W0.clone())
    opt = torch.optim.Adam([W], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        b = torch.randint(0, n_train, (min(cfg.batch, n_train),), generator=gen)
        logits = xs[b] @ W.T
        mse = (((_moe_out(logits, Yt[b], k) - yrt[b]) ** 2).sum(-1) * wt[b]).mean()
        ce = -torch.log_softmax(logits, -1).gather(1, tt[b]).mean()
        loss = mse + cfg.ce_weight * ce
        opt.zero_grad()
        loss.backward()
        opt.step()
    Wf = (W.detach() / scale).contiguous()
    gen_r = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        onehot = torch.zeros(len(xv), E).scatter_(1, target[n_train:], 1.0)
        m = {
            "rel_err_fit": _rel_err(shv + _moe_out(xv @ Wf.T, Yv, k), yv),
            "rel_err_init": _rel_err(shv + _moe_out(xv @ (W0 / scale).T, Yv, k), yv),
            "rel_err_oracle": _rel_err(shv + _moe_out(onehot, Yv, k), yv),
            "rel_err_random": _rel_err(shv + _moe_out(torch.randn(len(xv), E, generator=gen_r), Yv, k), yv),
            "rel_err_shared_only": _rel_err(shv, yv) if y_shared.abs().sum() > 0 else 1.0,
            "topk_hit": float((torch.topk(xv @ Wf.T, k, -1).indices[..., None] == target[n_train:, None, :])
                              .any(-1).float().mean()),
        }
    return Wf, m


# ------------------------------------------------------------------------------------------------ calibration data
def _shakespeare() -> str:
    from retrofit.core.data import data_dir

    p = data_dir() / "tinyshakespeare" / "input.txt"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found (set RETROFIT_DATA to the shared data folder)")
    return p.read_text(encoding="utf-8")


def heldout_text() -> str:
    """The Shakespeare tail that the gate fit never reads (the benchmark's perplexity text)."""
    return _shakespeare()[SHAKESPEARE_HELDOUT_START:]


def calibration_ids(tokenizer, tokens: int = 8192, seq_len: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """Token sequences of about ``tokens`` tokens in all: half ARC-Easy train questions with their gold answer
    ("Question: ...\\nAnswer: ...", several per sequence), half Shakespeare characters 0-500k; interleaved."""
    from retrofit.core.data import load_task

    half = tokens // 2
    exs = load_task("arc_easy", split="train")
    order = torch.randperm(len(exs), generator=torch.Generator().manual_seed(seed)).tolist()
    arc, cur, n = [], [], 0
    for i in order:
        ex = exs[i]
        cur += tokenizer(ex.prompt + " " + ex.choices[ex.gold] + "\n\n", add_special_tokens=False)["input_ids"]
        if len(cur) >= seq_len:
            arc.append(torch.tensor(cur[:seq_len]))
            n += seq_len
            cur = []
            if n >= half:
                break
    text = _shakespeare()[slice(*SHAKESPEARE_FIT)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    sh = [torch.tensor(ids[s:s + seq_len]) for s in range(0, min(len(ids), tokens - n), seq_len)]
    sh = [s for s in sh if len(s) == seq_len]
    out = []
    for i in range(max(len(arc), len(sh))):
        out += ([arc[i]] if i < len(arc) else []) + ([sh[i]] if i < len(sh) else [])
    return out


@torch.no_grad()
def capture_mlp_inputs(dense: nn.Module, seqs: list[torch.Tensor], batch: int = 8, progress: bool = True):
    """[L] list of [N, H] MLP inputs over all tokens of ``seqs`` (equal-length sequences, batched)."""
    from tqdm.auto import tqdm

    layers = dense.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, args, i=i: store[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(layers)]
    try:
        for s in tqdm(range(0, len(seqs), batch), desc="capture", disable=not progress):
            ids = torch.nn.utils.rnn.pad_sequence(seqs[s:s + batch], batch_first=True)
            dense(input_ids=ids.to(next(dense.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(v) for v in store]


# ------------------------------------------------------------------------------------------------ conversion
def moefy_model(dense: nn.Module, seqs: list[torch.Tensor] | torch.Tensor | None = None,
                config: MoefyConfig | None = None, progress: bool = True, inputs: list[torch.Tensor] | None = None):
    """Convert a dense Llama-family model into an MoE (``config.arch``). Returns ``(moe_model, report)``.

    ``seqs``: calibration token sequences (a [B, T] tensor or a list of equal-length 1-D tensors); with
    ``config.sequential`` (default) the layers are converted in order and layer ``l`` is fitted on the MLP inputs
    it sees when layers ``< l`` are already MoE (one pass over the calibration batch, layer by layer).
    ``inputs``: precomputed per-layer MLP inputs of the dense model instead (non-sequential).
    The dense model is not modified.
    """
    from tqdm.auto import tqdm

    _check_llama(dense)
    cfg = (config or MoefyConfig()).validate(dense.config.intermediate_size)
    t0 = time.time()
    sequential = inputs is None and cfg.sequential
    if inputs is None:
        if seqs is None:
            raise ValueError("give calibration sequences (seqs) or captured MLP inputs (inputs)")
        seqs = list(seqs)
        if sequential:
            from retrofit.arch import get_adapter

            if len({len(s) for s in seqs}) != 1:
                raise ValueError("sequential conversion needs calibration sequences of equal length")
            ad = get_adapter(dense)
            with torch.no_grad():
                h, layer_kw = ad.prepare(dense, torch.stack(seqs).to(next(dense.parameters()).device))
            N = h.shape[0] * h.shape[1]
        else:
            inputs = capture_mlp_inputs(dense, seqs, progress=progress)
    if inputs is not None:
        N = inputs[0].shape[0]
    n_train = max(1, N - max(1, int(N * cfg.val_frac)))
    if n_train >= N:
        raise ValueError(f"too few calibration tokens ({N}) for a fit/validation split")
    splits, gates, per_layer = [], [], []
    gen = torch.Generator().manual_seed(cfg.seed)
    for i, layer in enumerate(tqdm(dense.model.layers, desc=f"moefy E{cfg.experts} k{cfg.top_k}",
                                   disable=not progress)):
        mlp = layer.mlp
        if sequential:  # run the dense layer on the stream of the partly converted model, keep its MLP input
            store = []
            hk = mlp.register_forward_pre_hook(lambda m, a: store.append(a[0].detach()))
            try:
                with torch.no_grad():
                    out = ad.call_layer(layer, h, layer_kw)
            finally:
                hk.remove()
            x = store[0].reshape(-1, store[0].shape[-1])
        else:
            x = inputs[i]
        x = x.to(mlp.gate_proj.weight.dtype)
        with torch.no_grad():
            sub = x[:n_train][torch.randperm(n_train, generator=gen)[:cfg.cluster_tokens]]
            act = F.silu(sub @ mlp.gate_proj.weight.T) * (sub @ mlp.up_proj.weight.T)
            split = expert_split(act, mlp, cfg.experts, cfg.cluster, cfg.kmeans_iters, cfg.seed + i, cfg.shared)
            Y, y_sh, y = _expert_outputs(x, mlp, *split)
        with torch.enable_grad():
            W, m = fit_gate(x.float(), Y.float(), y_sh.float(), y.float(), cfg.top_k, cfg, n_train)
        if sequential:  # the layer's output with the MoE block in place of the dense MLP
            with torch.no_grad():
                y_moe = y_sh + _moe_out(x.float() @ W.T, Y.float(), cfg.top_k).to(y.dtype)
                h = out + (y_moe - y).view_as(out)
        splits.append(split)
        gates.append(W)
        per_layer.append({"layer": i, **{k: round(v, 5) for k, v in m.items()}})
        del Y, y, y_sh
    moe = build_moe(dense, splits, gates, cfg.top_k, cfg.arch)
    report = {
        "config": asdict(cfg),
        "tokens_captured": N, "tokens_fit": n_train, "tokens_val": N - n_train,
        "mean": {k: round(sum(p[k] for p in per_layer) / len(per_layer), 5) for k in per_layer[0] if k != "layer"},
        "layers": per_layer,
        "seconds": round(time.time() - t0, 1),
    }
    return moe, report


# ------------------------------------------------------------------------------------------------ the cached testbed
def testbed_dir(experts: int = 8, top_k: int | None = None, shared: int = 768, arch: str = "qwen2_moe",
                distilled: bool = True) -> Path:
    """``<cache>/moe/smollm2-moe-e{E}k{k}`` for the default layout (Qwen2-MoE, 768 shared neurons), with a
    ``-s{S}`` / ``-mixtral`` suffix otherwise; ``-gates`` for the build before the expert distillation (gates
    fitted, experts as split)."""
    from retrofit.models import cache_dir

    top_k = MoefyConfig.top_k if top_k is None else top_k
    name = f"smollm2-moe-e{experts}k{top_k}"
    if arch == "mixtral":
        name += "-mixtral"
    elif shared != MoefyConfig.shared:
        name += f"-s{shared}"
    if not distilled:
        name += "-gates"
    return cache_dir() / "moe" / name


def _complete(path: Path, distilled: bool | None = None) -> bool:
    """A saved testbed (config, weights, moefy.json); with ``distilled`` True / False also whether its report
    records the expert distillation."""
    path = Path(path)
    if not ((path / "config.json").is_file() and (path / "moefy.json").is_file() and any(path.glob("*.safetensors"))):
        return False
    if distilled is None:
        return True
    try:
        has = "distill" in read_report(path)
    except (OSError, ValueError):
        return False
    return has == distilled


def _save_atomic(moe, tok, report: dict, out: Path) -> None:
    """Write the testbed to ``out`` so that an existing build there is replaced only once the new one is
    complete (``<out>.tmp`` written, old moved aside, new renamed in, old removed)."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    moe.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "moefy.json").write_text(json.dumps(report, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def distill_checkpoint_dir(out: str | Path) -> Path:
    """Where the distillation of the testbed saved at ``out`` keeps its resumable checkpoint."""
    out = Path(out)
    return out.with_name(out.name + ".distill-ckpt")


def build_testbed(config: MoefyConfig | None = None, out: str | Path | None = None, force: bool = False,
                  progress: bool = True, distill=True) -> Path:
    """Convert SmolLM2-135M-Instruct (the default model) and save it (safetensors + tokenizer + moefy.json).

    ``distill``: True (default) or a :class:`~retrofit.moe.distill.DistillConfig` distils the experts and gates
    toward the dense model after the gate fit (docs/moe.md); the gate-only build is kept beside it
    (``<out>-gates``) and the distillation checkpoints into ``<out>.distill-ckpt`` (a killed run resumes).
    False / None: the gate-only build at ``out``. A complete folder is reused unless ``force`` (which also
    rebuilds the gate-only stage and restarts the distillation)."""
    import shutil

    from retrofit.artifacts import fingerprint
    from retrofit.models import load_model
    from retrofit.moe.distill import DistillConfig, distill_data, distill_moe, source_files

    cfg = (config or MoefyConfig()).validate()
    if distill is True:
        distill = DistillConfig()
    elif distill is False:
        distill = None
    if distill is not None and not isinstance(distill, DistillConfig):
        raise TypeError(f"distill must be True, False, None or a DistillConfig, not {type(distill).__name__}")
    out = Path(out) if out is not None else testbed_dir(cfg.experts, cfg.top_k, cfg.shared, cfg.arch,
                                                        distilled=distill is not None)
    if distill is None:
        if _complete(out) and not force:
            return out
        dense, tok = load_model("default")
        seqs = calibration_ids(tok, cfg.tokens, cfg.seq_len, cfg.seed)
        moe, report = moefy_model(dense, seqs, cfg, progress=progress)
        report.update(base="SmolLM2-135M-Instruct", base_fingerprint=fingerprint(dense),
                      architecture=type(moe).__name__,
                      calibration=f"ARC-Easy train (question + gold answer) and tinyshakespeare chars "
                                  f"{SHAKESPEARE_FIT[0]}-{SHAKESPEARE_FIT[1]}, {cfg.seq_len}-token sequences",
                      date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _save_atomic(moe, tok, report, out)
        return out

    if _complete(out, distilled=True) and not force:
        return out
    gates = out.with_name(out.name + "-gates")
    if not force and _complete(out, distilled=False) and not _complete(gates):
        gates.parent.mkdir(parents=True, exist_ok=True)
        out.rename(gates)  # a gate-only testbed from before the distillation existed: keep it as the first stage
    ckpt_dir = distill_checkpoint_dir(out)
    if force and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    gates = build_testbed(cfg, out=gates, force=force, progress=progress, distill=False)
    stage = read_report(gates)
    if stage.get("config") != asdict(cfg):
        raise ValueError(f"{gates} holds a gate-only testbed built with other settings ({stage.get('config')}); "
                         "rerun with force=True (--force) to rebuild it")
    dense, tok = load_model("default")
    moe, _ = load_model(str(gates))
    train, val = distill_data(tok, distill)
    rep = distill_moe(moe, dense, train, val, distill, ckpt_dir=ckpt_dir, progress=progress)
    rep["files"] = {k: str(v) for k, v in source_files(distill.sources).items()}
    stage.update(distill=rep, gates_dir=str(gates), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _save_atomic(moe, tok, stage, out)
    return out


def load_testbed(experts: int = 8, top_k: int | None = None, build: bool = True, distilled: bool = True,
                 **config):
    """(model, tokenizer): the SmolLM2 MoE testbed with ``experts`` experts and ``top_k`` active, frozen, eval
    mode; built (and cached) on first use unless ``build=False``. ``distilled=False``: the build before the
    expert distillation. Extra keyword arguments go to MoefyConfig."""
    from retrofit.models import load_model

    top_k = MoefyConfig.top_k if top_k is None else top_k
    cfg = MoefyConfig(experts=experts, top_k=top_k, **config)
    path = testbed_dir(experts, top_k, cfg.shared, cfg.arch, distilled=distilled)
    if not _complete(path, distilled=distilled):
        if not build:
            raise FileNotFoundError(f"{path}: no {'distilled ' if distilled else 'gate-only '}MoE testbed yet; run "
                                    f"`retrofit moefy --experts {experts} --top-k {top_k}"
                                    f"{'' if distilled else ' --no-distill'}`")
        build_testbed(cfg, out=path, distill=distilled)
    return load_model(str(path))


def read_report(path: str | Path) -> dict:
    return json.loads((Path(path) / "moefy.json").read_text())


def load_bench_model(tiny: bool = False):
    """The MoE the benchmarks measure: the distilled testbed (must already be built: ``retrofit moefy``), or with
    ``tiny`` a 6-layer random Mixtral with the default tokenizer, to check a benchmark script in seconds."""
    if not tiny:
        return load_testbed(build=False)
    from transformers import AutoTokenizer

    from retrofit.models import default_model_dir
    from retrofit.testing import tiny_model

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = tiny_model("mixtral", vocab_size=len(tok), num_hidden_layers=6)
    model.requires_grad_(False)
    return model, tok
