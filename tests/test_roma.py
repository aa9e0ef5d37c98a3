"""RoMA: manifold term by hand, gradients only on the gate deltas, exact attach/detach, artifacts, config."""

import math

import pytest
import torch

import retrofit
from retrofit.artifacts import ArtifactError
from retrofit.methods.roma import RomaConfig, kernel_weights, manifold_term, routing_probs
from retrofit.methods.roma.train import neighbours, roma_loss, score_example, train_roma
from retrofit.core.data import Example
from retrofit.testing import MOE_FAMILIES, tiny_model


class CharTok:
    """Character-level tokenizer into the tiny models' vocabulary (128)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


TOK = CharTok()


def _examples(n=12, seed=0, prefix="t"):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "cold", "warm", "sun", "moon", "rock", "tree"]
    out = []
    for i in range(n):
        w = [words[int(j)] for j in torch.randint(0, len(words), (3,), generator=g)]
        out.append(Example(id=f"{prefix}{i}", prompt=f"Question: {w[0]} {w[1]}?\nAnswer:",
                           choices=[w[2], w[0] + " " + w[1], "none"], gold=int(i % 3)))
    return out


# ------------------------------------------------------------------------------------------------ the math
def test_manifold_term_by_hand():
    r = torch.tensor([[0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    r_nb = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    cos = torch.tensor([[0.9, 0.6]])
    w = kernel_weights(cos, sigma=0.4)
    # exp(-(1-cos)^2 / (2 * 0.16)): 0.9 -> exp(-0.03125), 0.6 -> exp(-0.5); normalised
    a, b = math.exp(-0.03125), math.exp(-0.5)
    assert w[0].tolist() == pytest.approx([a / (a + b), b / (a + b)], rel=1e-6)
    assert w[0, 0].item() == pytest.approx(0.6150879, abs=1e-6)
    # ||r - r1||^2 = 0.25 + 0.25 = 0.5 ; ||r - r2||^2 = 0.25 + 0.25 + 1 = 1.5
    term = manifold_term(r, r_nb, w)
    assert term.item() == pytest.approx(0.6150879 * 0.5 + 0.3849121 * 1.5, abs=1e-5)
    assert term.item() == pytest.approx(0.8849121, abs=1e-6)
    term.sum().backward()
    # d/dr sum_j w_j ||r - r_j||^2 = 2 sum_j w_j (r - r_j)
    expect = 2 * (w[0, 0] * (r[0] - r_nb[0, 0]) + w[0, 1] * (r[0] - r_nb[0, 1]))
    assert torch.allclose(r.grad[0], expect.detach(), atol=1e-6)


def test_kernel_weights_mask_and_empty_rows():
    cos = torch.tensor([[1.0, 0.5, 0.2], [0.3, 0.3, 0.3]])
    w = kernel_weights(cos, 0.4, mask=torch.tensor([[True, True, False], [False, False, False]]))
    a, b = 1.0, math.exp(-0.25 / 0.32)
    assert w[0].tolist() == pytest.approx([a / (a + b), b / (a + b), 0.0], rel=1e-6)
    assert w[1].tolist() == [0.0, 0.0, 0.0]


def test_neighbours_are_successful_nearest_and_never_self():
    ang = torch.tensor([0.0, 0.1, 0.2, 1.0, 1.1, 3.0])
    emb = torch.stack([ang.cos(), ang.sin()], -1) * 3.0  # unnormalised on purpose
    ok = torch.tensor([True, True, False, True, True, False])
    idx, w, cos = neighbours(emb, ok, k=2, sigma=0.4)
    assert idx[0].tolist() == [1, 3]  # 2 is not successful, 0 itself excluded
    assert idx[2].tolist() == [1, 0]
    assert idx[5].tolist() == [4, 3]
    assert cos[0, 0].item() == pytest.approx(math.cos(0.1), abs=1e-6)
    assert cos[0, 1].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(6))
    assert w[0].tolist() == pytest.approx(kernel_weights(cos[:1], 0.4)[0].tolist(), rel=1e-6)
    # fewer candidates than k: padded with weight 0
    idx, w, _ = neighbours(emb, torch.tensor([True, False, False, False, False, False]), k=2, sigma=0.4)
    assert w[0].tolist() == [0.0, 0.0] and w[1, 0].item() == 1.0 and w[1, 1].item() == 0.0 and idx[1, 0] == 0


def test_routing_probs():
    z = torch.tensor([[0.0, math.log(3.0)]])
    assert routing_probs(z, "softmax").tolist()[0] == pytest.approx([0.25, 0.75])
    s = torch.sigmoid(z)[0]
    assert routing_probs(z, "sigmoid_grouped").tolist()[0] == pytest.approx((s / s.sum()).tolist())


# ------------------------------------------------------------------------------------------------ runtime
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_zero_deltas_identical_and_detach_exact(family):
    m = tiny_model(family)
    ids = torch.randint(3, 128, (2, 11))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    base = m(ids).logits
    h = retrofit.attach(m, "roma", num_layers=2)
    assert torch.equal(m(ids).logits, base)
    with torch.no_grad():
        for p in h.deltas.values():
            p.normal_(0, 0.5)
    changed = m(ids).logits
    assert (changed - base).abs().max() > 1e-4
    h.detach()
    assert torch.equal(m(ids).logits, base)
    assert not hasattr(m, "_retrofit_gate_hook")
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_routing_vector_is_the_gates_own_scores(family):
    """r at the last prompt token = the family's per-expert scores the gate itself computes (GateHook record)."""
    m = tiny_model(family)
    h = retrofit.attach(m, "roma", num_layers=2)
    ex = _examples(1)[0]
    with h.hook.recording() as rec:
        _, r = score_example(m, TOK, ex, h)
    n_ctx = len(TOK(ex.prompt.rstrip())["input_ids"])
    parts = []
    for l in h.layers:
        sc = rec.scores[l][0]
        T = sc.shape[0] // len(ex.choices)
        s = sc[n_ctx - 1]  # row of batch item 0, last prompt token
        assert T > n_ctx
        parts.append(s / s.sum() if family == "deepseek_v3" else s)
    assert torch.allclose(r, torch.cat(parts).float(), atol=1e-6)
    assert r.shape == (2 * 8,)
    h.detach()


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
def test_only_gate_deltas_get_gradients(family):
    m = tiny_model(family)
    exs = _examples(4)
    h = retrofit.attach(m, "roma", num_layers=2)
    params = h.trainable(True)
    D = 2 * 8
    R_nb = torch.softmax(torch.randn(4, 3, D), -1)
    W = torch.full((4, 3), 1 / 3)
    loss, ce, man = roma_loss(h, TOK, exs, R_nb, W, lam=0.8)
    assert man.item() > 0 and loss.item() == pytest.approx(ce.item() + 0.8 * man.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in m.parameters())
    assert all(not p.requires_grad for p in m.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # the manifold term alone has a gradient through the live gates (the point of computing r_i live)
    for p in params:
        p.grad = None
    _, _, man = roma_loss(h, TOK, exs, R_nb, W, lam=1.0)
    man.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    h.detach()
    # ... and they are the gradients of those terms: central differences along a random direction agree. Same
    # family with every expert routed (top-k = E), so no expert selection flips under the small step.
    m = tiny_model(family, num_experts_per_tok=8, **({"topk_group": 2} if family == "deepseek_v3" else {}))
    h = retrofit.attach(m, "roma", num_layers=2)
    params = h.trainable(True)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g) for p in params]
    for which in (0, 2):  # the whole loss, then the manifold term alone
        grads = torch.autograd.grad(roma_loss(h, TOK, exs, R_nb, W, lam=0.8)[which], params)
        moved = []
        with torch.no_grad():
            for s in (1e-3, -1e-3):
                for p, d in zip(params, v):
                    p.add_(s * d)
                moved.append(roma_loss(h, TOK, exs, R_nb, W, lam=0.8)[which].item())
                for p, d in zip(params, v):
                    p.sub_(s * d)
        directional = sum((gr * d).sum() for gr, d in zip(grads, v)).item()
        assert (moved[0] - moved[1]) / 2e-3 == pytest.approx(directional, rel=0.03, abs=2e-3), which
    h.detach()


def test_delta_gradient_equals_gate_weight_gradient():
    """Training the delta from zero is training the gate weights: identical gradients."""
    m = tiny_model("olmoe")
    exs = _examples(3)
    h = retrofit.attach(m, "roma", num_layers=2)
    params = h.trainable(True)
    for l in h.layers:
        h.gates[l].weight.requires_grad_(True)
    loss, _, _ = roma_loss(h, TOK, exs, torch.softmax(torch.randn(3, 2, 16), -1), torch.full((3, 2), 0.5), 0.8)
    loss.backward()
    for l, p in zip(h.layers, params):
        assert torch.allclose(p.grad, h.gates[l].weight.grad, rtol=1e-5, atol=1e-8)
        h.gates[l].weight.grad = None
    h.detach()
    assert all(p.requires_grad for p in m.parameters())  # tiny_model's flags (True) are back after detach


def test_train_save_load_roundtrip(tmp_path):
    m = tiny_model("mixtral")
    m.requires_grad_(False)
    exs = _examples(12)
    ids = torch.randint(3, 128, (2, 10))
    base = m(ids).logits
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    emb = torch.randn(12, 16)
    cfg = RomaConfig(num_layers=2, lam=0.8, k=3, lr=1e-2, epochs=2, batch_size=4)
    h, rep = train_roma(m, TOK, exs, cfg, out_dir=tmp_path / "roma", embeddings=emb, progress=False)
    assert rep["layers"] == [2, 3] and len(rep["history"]) == 2
    assert rep["successful"] == round(rep["base_train_acc"] * 12)
    assert all(v > 0 for v in rep["delta_norms"].values())
    trained = m(ids).logits
    assert (trained - base).abs().max() > 1e-5
    h.detach()
    assert torch.equal(m(ids).logits, base)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n
    assert (tmp_path / "roma" / "training_report.json").is_file()
    h2 = retrofit.attach(m, "roma", routers=tmp_path / "roma")
    assert h2.layers == [2, 3] and h2.config.lam == 0.8
    assert torch.equal(m(ids).logits, trained)
    h2.detach()
    assert torch.equal(m(ids).logits, base)
    h3 = retrofit.load(m, tmp_path / "roma")
    assert torch.equal(m(ids).logits, trained)
    h3.detach()
    # another base model: fingerprint mismatch
    with pytest.raises(ArtifactError, match="another base model"):
        retrofit.attach(tiny_model("mixtral", seed=1), "roma", routers=tmp_path / "roma")
    # the artifact's deltas do not fit other layers
    with pytest.raises(ValueError, match="does not select|no gate delta"):
        retrofit.attach(m, "roma", routers=tmp_path / "roma", num_layers=3)
    assert not getattr(m, "_retrofit_handles", [])
    assert not hasattr(m, "_retrofit_gate_hook")


def test_plain_finetuning_lambda_zero_needs_no_embeddings():
    m = tiny_model("olmoe")
    cfg = RomaConfig(num_layers=1, lam=0.0, lr=1e-2, epochs=1, batch_size=6)
    h, rep = train_roma(m, TOK, _examples(6), cfg, progress=False)
    assert rep["history"][0]["manifold"] == 0.0 and "neighbour_cos_mean" not in rep
    assert h.layers == [3]
    h.detach()


def test_config_validation():
    for bad in (dict(lam=-0.1), dict(lam=float("nan")), dict(k=0), dict(lr=0), dict(lr=-1e-5), dict(epochs=0),
                dict(num_layers=0), dict(layers=[]), dict(layers=[1, 1]), dict(layers=[-1]), dict(layers="3"),
                dict(sigma=0), dict(batch_size=0), dict(k=2.5), dict(epochs=True)):
        with pytest.raises(ValueError):
            RomaConfig(**bad)
    assert RomaConfig(layers=[3, 1]).layers == [1, 3]
    m = tiny_model("mixtral")
    with pytest.raises(TypeError, match="unknown option"):
        retrofit.attach(m, "roma", lambda_=0.5)
    with pytest.raises(ValueError, match="only 4 MoE"):
        retrofit.attach(m, "roma", num_layers=5)
    with pytest.raises(ValueError, match="no MoE gate"):
        retrofit.attach(m, "roma", layers=[7])
    assert not hasattr(m, "_retrofit_gate_hook")  # the failed attaches released the gate hook ...
    assert all(p.requires_grad for p in m.parameters())  # ... and left the requires_grad flags as they were
    with pytest.raises(ValueError, match="no MoE gates"):
        retrofit.attach(tiny_model("llama"), "roma")


def test_embedder_minilm():
    from retrofit.methods.roma.train import embed_texts, embedder_path

    try:
        embedder_path()
    except RuntimeError as e:
        pytest.skip(f"the bundled all-MiniLM-L6-v2 is not available: {e}")
    e = embed_texts(["At what temperature does water boil?", "What is the boiling point of water?",
                     "Which planet is the largest?"])
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.7 and sim[0, 2] < 0.4


def _frozen_with_random_deltas(family: str, n: int):
    """A frozen tiny model of ``family``, ``n`` examples, and RoMA on its last 2 MoE layers with N(0, 0.3) deltas."""
    m = tiny_model(family)
    m.requires_grad_(False)
    h = retrofit.attach(m, "roma", num_layers=2)
    with torch.no_grad():
        for p in h.deltas.values():
            p.normal_(0, 0.3)
    return m, _examples(n), h


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_fast_paths_equal_plain_forward(family):
    """The scorer (LM head only at the answer tokens), the frozen-prefix training loss and the shared-prefix
    multi-delta scorer give what a plain ``model(ids)`` forward gives."""
    from retrofit.methods.roma.train import _requests, frozen_prefix, score_example_multi

    m, exs, h = _frozen_with_random_deltas(family, 5)
    ex = exs[0]
    scores, _ = score_example(m, TOK, ex)
    for (c, x), s in zip(_requests(TOK, ex), scores):
        lp = torch.log_softmax(m(torch.tensor([c + x])).logits[0].float(), -1)
        ref = sum(lp[j - 1, t].item() for j, t in zip(range(len(c), len(c) + len(x)), x))
        assert s == pytest.approx(ref, abs=1e-4)
    h.trainable(True)
    R_nb, W = torch.softmax(torch.randn(5, 3, 16), -1), torch.full((5, 3), 1 / 3)
    full = roma_loss(h, TOK, exs, R_nb, W, 0.8)
    g_full = torch.autograd.grad(full[0], list(h.deltas.values()))
    cached = roma_loss(h, TOK, exs, R_nb, W, 0.8, prefix=frozen_prefix(h, TOK, exs))
    g_cached = torch.autograd.grad(cached[0], list(h.deltas.values()))
    for a, b in zip(full, cached):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(g_full, g_cached):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    h.trainable(False)
    trained = {int(l): p.detach().clone() for l, p in h.deltas.items()}
    other = {l: torch.randn_like(t) * 0.3 for l, t in trained.items()}
    multi = score_example_multi(h, TOK, ex, [None, trained, other])
    assert multi[1] == pytest.approx(score_example(m, TOK, ex)[0], abs=1e-5)
    assert all(torch.equal(h.deltas[str(l)], t) for l, t in trained.items())  # left as found
    with torch.no_grad():
        for l, t in other.items():
            h.deltas[str(l)].copy_(t)
    assert multi[2] == pytest.approx(score_example(m, TOK, ex)[0], abs=1e-5)
    h.detach()
    assert multi[0] == pytest.approx(score_example(m, TOK, ex)[0], abs=1e-5)  # zero deltas = base


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_choice_loss_is_the_cross_entropy_of_the_scored_choices(family):
    """task_loss='choice': the loss is -log softmax(summed choice log-likelihoods)[gold], the very scores the
    evaluation ranks (score_example), averaged over the batch; the frozen-prefix path gives the same loss and
    gradients; the manifold term is the continuation loss's (r at the prompt's last token, the same in both)."""
    from retrofit.methods.roma.train import frozen_prefix

    m, exs, h = _frozen_with_random_deltas(family, 4)
    want = []
    for ex in exs:
        scores, _ = score_example(m, TOK, ex)
        want.append(-torch.log_softmax(torch.tensor(scores, dtype=torch.float64), 0)[ex.gold].item())
    h.trainable(True)
    R_nb, W = torch.softmax(torch.randn(4, 3, 16), -1), torch.full((4, 3), 1 / 3)
    loss, ce, man = roma_loss(h, TOK, exs, R_nb, W, 0.5, task_loss="choice")
    assert ce.item() == pytest.approx(sum(want) / len(want), rel=1e-4)
    assert loss.item() == pytest.approx(ce.item() + 0.5 * man.item(), rel=1e-6)
    _, _, man_cont = roma_loss(h, TOK, exs, R_nb, W, 0.5)
    assert man.item() == pytest.approx(man_cont.item(), rel=1e-5)
    g_full = torch.autograd.grad(loss, list(h.deltas.values()))
    pre = frozen_prefix(h, TOK, exs, task_loss="choice")
    assert [tuple(p.shape[:1]) for p in pre] == [(3,)] * 4
    cached = roma_loss(h, TOK, exs, R_nb, W, 0.5, prefix=pre, task_loss="choice")
    assert cached[1].item() == pytest.approx(ce.item(), rel=1e-5)
    g_cached = torch.autograd.grad(cached[0], list(h.deltas.values()))
    for a, b in zip(g_full, g_cached):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    h.trainable(False)
    h.detach()


def test_choice_loss_training_lowers_it_and_refuses_another_losses_prefix():
    from retrofit.methods.roma.train import frozen_prefix

    m = tiny_model("qwen2_moe")
    m.requires_grad_(False)
    exs = _examples(12)
    cfg = RomaConfig(num_layers=2, lam=0.0, lr=3e-2, epochs=4, batch_size=4, task_loss="choice")
    h0 = retrofit.attach(m, "roma", num_layers=2)
    before = roma_loss(h0, TOK, exs, task_loss="choice")[1].item()
    wrong = frozen_prefix(h0, TOK, exs)  # the continuation loss's [T, d] states
    h0.detach()
    with pytest.raises(ValueError, match="another task_loss"):
        train_roma(m, TOK, exs, cfg, prefix=wrong, progress=False)
    h, rep = train_roma(m, TOK, exs, cfg, progress=False)
    with torch.no_grad():
        after = roma_loss(h, TOK, exs, task_loss="choice")[1].item()
    h.detach()
    assert rep["config"]["task_loss"] == "choice"
    assert after < before - 0.01, (before, after)
    with pytest.raises(ValueError, match="task_loss must be one of"):
        RomaConfig(task_loss="gold")
