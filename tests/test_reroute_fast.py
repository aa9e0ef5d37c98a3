"""reroute's schedules: 'fast' (the default) against 'paper' and against hand-written references.

* the frozen layers below the lowest adapted MoE layer run once per adaptation under no_grad (later steps replay
  their output), and the deltas are the ones the full forward + backward gives;
* 'paper' is the algorithm as first implemented (a reference loop here, written from the paper's description);
* ``window``: the loss of the last w positions, the prefix run once into a KV cache (its keys and values fixed):
  the same deltas as a full forward whose offsets act on the window tokens only;
* config validation.
"""

import pytest
import torch
import torch.nn.functional as F

import retrofit
from retrofit.arch import get_adapter
from retrofit.arch.gates import GateHook
from retrofit.methods.reroute import RerouteConfig
from retrofit.testing import MOE_FAMILIES, tiny_model

FAMILIES = MOE_FAMILIES + ["deepseek_v32", "glm_moe_dsa"]


def _ids(B=2, T=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (B, T), generator=g)


def _model(family, layers=6):
    model = tiny_model(family, num_hidden_layers=layers)
    return model.requires_grad_(False)  # frozen for the references too (detach restores the flags)


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _reference(model, ids, mask, layers, steps, lr, window=0, adapted=None, optimizer="adam"):
    """The adaptation written out once more: Adam (or SGD) on deltas [B, L, E] for the MoE ``layers`` (decoder
    indices; offsets only on those in ``adapted``, default all), the loss the sum over rows of each row's mean
    next-token loss. ``window`` > 0: the loss on the last ``window`` positions and the deltas added to the
    window's tokens only (every earlier token routes as the base model), which is the objective of a prefix
    computed once, without the deltas, into a KV cache."""
    hook = GateHook.install(model)  # run with no method attached (a method's hooks would adapt on these calls)
    B, T = ids.shape
    E = hook.num_experts()
    split = T - 1 - window if 0 < window < T - 1 else 0
    delta = torch.zeros(B, len(layers), E, requires_grad=True)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([delta], lr=lr)
    pos = _positions(mask)
    valid = (mask[:, split + 1:] * mask[:, split:-1]).bool()
    in_window = (torch.arange(T) >= split).float().view(1, T, 1)

    def offset(j):
        def f(z):  # z [B*T, E]
            return z + (delta[:, j, None, :] * in_window).reshape(B * T, E)
        return f

    try:
        for _ in range(steps):
            for j, l in enumerate(layers):
                if adapted is None or l in adapted:
                    hook.set_offset(l, offset(j), owner="reference")
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
            logits = logits[:, split:-1]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, split + 1:].reshape(-1),
                                 reduction="none").view(B, -1)
            loss = ((ce * valid).sum(1) / valid.sum(1).clamp_min(1)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        hook.clear("reference")
        hook.release()
    return delta.detach()


class _Calls:
    """Counts the forwards of each decoder layer's MoE block and whether grad mode was on in them."""

    def __init__(self, model):
        adapter = get_adapter(model)
        self.n, self.grad, self._h = {}, {}, []
        for i, layer in enumerate(adapter.layers(model)):
            self._h.append(layer.mlp.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def f(mod, args, out):
            self.n[i] = self.n.get(i, 0) + 1
            self.grad.setdefault(i, []).append(torch.is_grad_enabled())
        return f

    def remove(self):
        for h in self._h:
            h.remove()


# ---------------------------------------------------------------------------------------------- (i) truncation
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_layers_run_once_and_the_deltas_are_the_full_backward_s(family):
    """Adapting the upper MoE layers only: 'fast' (window 0, the paper's objective) runs the layers below once,
    under no_grad, and gives the deltas of 'paper' (full forward and backward every step) and of the reference."""
    model = _model(family)
    moe = get_adapter(model).moe_gates(model)
    upper = sorted(moe)[-2:]  # e.g. decoder layers 4, 5 of 6
    ids = _ids()
    mask = torch.ones_like(ids)
    steps = 4
    res = {}
    for schedule in ("paper", "fast"):
        kw = {} if schedule == "paper" else {"window": 0}
        h = retrofit.attach(model, "reroute", schedule=schedule, steps=steps, lr=0.1, layers=upper, **kw)
        calls = _Calls(model)
        h.adapt(ids, mask)
        calls.remove()
        res[schedule] = (h.delta.clone(), calls)
        moe_layers = h.moe_layers
        h.detach()
    ref = _reference(model, ids, mask, moe_layers, steps, 0.1, adapted=upper)
    (d_paper, c_paper), (d_fast, c_fast) = res["paper"], res["fast"]
    cols = [j for j, l in enumerate(sorted(moe)) if l in upper]
    assert (d_fast[:, cols].abs().sum(-1) > 0).all()  # every adapted layer's delta moved, in every row
    assert d_fast.norm() > 0.1
    torch.testing.assert_close(d_fast, d_paper, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d_fast, ref, atol=1e-5, rtol=1e-4)
    below = [i for i in c_fast.n if i < upper[0]]
    assert below and all(c_fast.n[i] == 1 for i in below)  # once, then replayed
    assert all(g is False for i in below for g in c_fast.grad[i])  # under no_grad
    assert all(c_paper.n[i] == steps for i in below)  # the paper schedule runs them every step
    assert all(c_fast.n[i] == steps for i in upper)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "glm_moe_dsa"])
def test_confidence_choice_gives_the_same_layers_and_deltas(family):
    """Layers chosen by confidence (the first step runs every layer live): both schedules agree on the layers
    and the deltas; after the first step the layers below the lowest chosen one are replayed."""
    model = _model(family)
    ids = _ids(seed=4)
    out = {}
    for schedule in ("paper", "fast"):
        kw = {} if schedule == "paper" else {"window": 0}
        h = retrofit.attach(model, "reroute", schedule=schedule, steps=4, lr=0.1, num_layers=2,
                            layer_order="most_confident", **kw)
        calls = _Calls(model)
        h.adapt(ids)
        calls.remove()
        out[schedule] = (h.delta.clone(), h.layer_mask.clone(), h.stats()["last"]["chosen_layers"], calls.n)
        h.detach()
    assert out["fast"][2] == out["paper"][2]
    assert torch.equal(out["fast"][1], out["paper"][1])
    assert out["fast"][0].norm() > 0.1
    torch.testing.assert_close(out["fast"][0], out["paper"][0], atol=1e-5, rtol=1e-4)
    lowest = min(min(r) for r in out["fast"][2])
    assert all(out["fast"][3][i] == 1 for i in out["fast"][3] if i < lowest)


# ---------------------------------------------------------------------------------------------- (ii) paper
@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
def test_paper_schedule_is_the_algorithm_as_before(family):
    """schedule='paper' with its defaults (5 Adam steps at lr 0.05 on the whole context, every MoE layer)
    gives the deltas of the reference loop, on a left-padded batch too."""
    model = _model(family)
    assert RerouteConfig(schedule="paper").effective_steps == 5
    ids = _ids(B=2, T=12, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    h = retrofit.attach(model, "reroute", schedule="paper")
    h.adapt(ids, mask)
    got = h.delta.clone()
    h.detach()
    ref = _reference(model, ids, mask, h.moe_layers, 5, 0.05)
    assert got.norm() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_paper_schedule_readapts_every_128_tokens_and_fast_at_prefill_only():
    model = _model("qwen3_moe", layers=2)
    ids = _ids(B=1, T=6, seed=8)
    model.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=131, do_sample=False, pad_token_id=0)
    counts = {}
    for schedule in ("paper", "fast"):
        h = retrofit.attach(model, "reroute", schedule=schedule, steps=1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        assert out.shape[1] == 6 + 131
        counts[schedule] = h.stats()["adaptations"]
        h.detach()
    assert counts == {"paper": 2, "fast": 1}


# ---------------------------------------------------------------------------------------------- (b) window
@pytest.mark.parametrize("family", FAMILIES)
def test_window_is_the_loss_of_the_last_positions_against_a_fixed_prefix(family):
    """window w < T - 1: the prefix runs once (no grad) into a cache; the deltas equal the reference's (a full
    forward whose offsets act on the window tokens only, loss on the last w positions), the first step's loss
    is the base model's on those positions, and they differ from the whole-context deltas. SGD: the deltas are
    linear in the gradients, so float summation order stays at float size (Adam's first steps are about
    lr * sign(gradient) and turn an order-1e-7 difference of a near-zero gradient into order lr)."""
    model = _model(family, layers=4)
    ids = _ids(B=2, T=16, seed=9)
    mask = torch.ones_like(ids)
    w = 5
    kw = dict(steps=3, lr=50.0, optimizer="sgd")
    h = retrofit.attach(model, "reroute", window=w, **kw)
    calls = _Calls(model)
    h.adapt(ids, mask)
    calls.remove()
    got, first = h.delta.clone(), [r[0] for r in h.stats()["last"]["step_losses"]]
    h.detach()
    ref = _reference(model, ids, mask, h.moe_layers, 3, 50.0, window=w, optimizer="sgd")
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, -w - 1:-1].float()
    base = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -w:].reshape(-1),
                           reduction="none").view(2, w).mean(1)
    torch.testing.assert_close(torch.tensor(first), base, atol=1e-5, rtol=1e-4)
    assert got.norm() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-3)
    h = retrofit.attach(model, "reroute", window=0, **kw)
    h.adapt(ids, mask)
    assert (h.delta - got).abs().max() > 1e-2  # the window changes the objective
    h.detach()
    # the prefix forward + 3 window steps, the lowest MoE layer included (every layer is adapted)
    lowest = min(get_adapter(model).moe_gates(model))
    assert calls.n[lowest] == 1 + 3
    # Adam (the default): the same up to the amplified float noise
    h = retrofit.attach(model, "reroute", window=w, steps=3, lr=0.1)
    h.adapt(ids, mask)
    got = h.delta.clone()
    h.detach()
    ref = _reference(model, ids, mask, h.moe_layers, 3, 0.1, window=w)
    torch.testing.assert_close(got, ref, atol=3e-3, rtol=0)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_window_left_padded_batch_equals_rows_alone(family):
    model = _model(family, layers=4)
    a, b = _ids(B=1, T=13, seed=10), _ids(B=1, T=8, seed=11)
    batch = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 5:], mask[1, 5:] = b[0], 1
    h = retrofit.attach(model, "reroute", steps=3, lr=0.1, window=4, num_layers=2)
    h.adapt(batch, mask)
    d_batch, chosen = h.delta.clone(), h.stats()["last"]["chosen_layers"]
    for r, x in enumerate((a, b)):
        h.adapt(x)
        assert h.stats()["last"]["chosen_layers"][0] == chosen[r]
        torch.testing.assert_close(d_batch[r], h.delta[0], atol=2e-3, rtol=0)
    h.detach()


def test_window_during_generation_readapts_on_the_last_window():
    model = _model("mixtral", layers=3)
    ids = _ids(B=2, T=10, seed=12)
    h = retrofit.attach(model, "reroute", steps=2, interval=4, window=6)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False, pad_token_id=0)
    st = h.stats()
    assert out.shape == (2, 19) and st["adaptations"] == 3 and st["schedule"] == "fast" and st["window"] == 6
    assert all(p.grad is None for p in model.parameters())
    h.detach()


# ---------------------------------------------------------------------------------------------- (iii) config
def test_schedule_defaults_and_validation():
    fast, paper = RerouteConfig(), RerouteConfig(schedule="paper")
    assert fast.schedule == "fast"
    assert (paper.effective_steps, paper.effective_interval, paper.window) == (5, 128, 0)
    assert (fast.effective_steps, fast.effective_interval, fast.window) == (3, 0, 0)
    assert RerouteConfig(steps=2, interval=7, window=0).effective_steps == 2
    assert RerouteConfig(schedule="paper", interval=0).effective_interval == 0
    for kw, msg in [(dict(schedule="slow"), "schedule must be one of"),
                    (dict(window=-1), "window must be an integer >= 0"),
                    (dict(window=None), "window must be an integer"),
                    (dict(steps=-2), "steps must be an integer >= 0 or None"),
                    (dict(interval=-1), "interval must be an integer >= 0 or None"),
                    (dict(window="8"), "window must be an integer"),
                    (dict(window=2.0), "window must be an integer"),
                    (dict(window=True), "window must be an integer"),
                    (dict(schedule="paper", window=64), "needs schedule='fast'")]:
        with pytest.raises(ValueError, match=msg):
            RerouteConfig(**kw)
    cfg = RerouteConfig()
    cfg.window = 32  # assignment re-validates
    with pytest.raises(ValueError, match="needs schedule='fast'"):
        cfg.schedule = "paper"
    assert cfg.schedule == "fast" and cfg.window == 32
