"""Dr.LLM and the plan evaluator keep every tensor they make on their inputs' device (CPU-only checks).

The suite runs on CPU, where torch's default device and the inputs' device are the same, so a tensor made
without ``device=`` goes unnoticed. Here the default device is made another one: each result is computed
normally and again inside ``with torch.device("meta"):`` with the same CPU model and inputs, and must come out
equal and on the CPU, and no torch call inside may return a meta tensor (a tensor that lands on the default
device instead holds no data there: the computation fails, its result is no CPU tensor, or the watch sees it;
some ops read a meta operand as uninitialized memory, so equal results alone are not enough). Where an input
sits on another device than the others (``.to(device)`` calls) the model or the hidden states are put on the
meta device instead, or the input can only be used once moved to the right device. Router decisions with
trained-style random routers on left-padded and unpadded batches, per-row plans with sub-batches and their beam
reorder, plain plans, window pooling and the evaluator's ``set_example`` / ``evaluate`` are covered.
"""

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import retrofit
from retrofit.methods.drllm import window_means, window_matrix
from retrofit.search import evaluator as evaluator_mod
from retrofit.search.evaluator import PlanEvaluator
from retrofit.testing import tiny_model
from retrofit.testing.search_toys import CharTokenizer, toy_examples

META = torch.device("meta")
CPU = torch.device("cpu")
PLAN_A = ["execute", "skip", "repeat", "execute"]
PLAN_B = ["skip", "repeat", "repeat", "skip"]


class _MetaWatch(TorchFunctionMode):
    """Records every torch call that returns a meta tensor (some ops read a meta operand as uninitialized CPU
    memory without an error, so a comparison of the results alone could pass by chance)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(torch.is_tensor(t) and t.device.type == "meta" for t in tree_leaves(out)):
            self.made.append(getattr(func, "__name__", str(func)))
        return out


@contextlib.contextmanager
def meta_default():
    """torch's default device is the meta device inside; no tensor may land there."""
    with META, _MetaWatch() as watch:
        yield
    assert watch.made == [], f"tensors made on the default device by: {sorted(set(watch.made))}"


pytestmark = pytest.mark.usefixtures("one_thread")


def _left_padded(g, lengths, T):
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, T - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[r, T - n:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _routed_model(seed=4):
    """Tiny llama with strong random routers (rows of one batch get different plans, repeats included)."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm", bottleneck=8)
    h.init_routers(seed=seed)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in h.routers.router:
            r.fc1.weight.normal_(0, 3.0, generator=g)
            r.fc2.weight.normal_(0, 3.0, generator=g)
            r.fc2.bias.normal_(0, 1.0, generator=g)
    return model, h


def _run_routed(model, h, ids, mask, pos):
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=pos).logits
        plans_padded = h.last_plans
        plain = model(ids).logits  # no mask: the pooling for unpadded rows (kept per length)
        plans_plain = h.last_plans
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    return padded, plans_padded, plain, plans_plain, gen, h.stats()


def _assert_same(got, want):
    if torch.is_tensor(want):
        assert torch.is_tensor(got) and got.device == CPU
        assert torch.equal(got, want)
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    else:
        assert got == want


def test_router_decisions_do_not_depend_on_the_default_device():
    """Routers deciding on a left-padded batch, an unpadded one and in generate(): the same logits, plans and
    stats with the meta device as torch's default (run first, on fresh pooling / bias caches)."""
    g = torch.Generator().manual_seed(7)
    ids, mask, pos = _left_padded(g, [10, 7, 10, 4, 9, 6], 10)
    model, h = _routed_model()
    with meta_default():
        got = _run_routed(model, h, ids, mask, pos)
    model2, h2 = _routed_model()
    want = _run_routed(model2, h2, ids, mask, pos)
    plans = want[1] + want[3]
    assert len({tuple(p) for p in plans}) > 2 and any("repeat" in p for p in plans) and any("skip" in p for p in plans)
    _assert_same(got, want)
    # and again with the caches warm (the second request of a session)
    with meta_default():
        again = _run_routed(model, h, ids, mask, pos)
    _assert_same(again[:5], want[:5])


def test_plans_without_routers_do_not_depend_on_the_default_device():
    """Execute everywhere (no routers, no plan), per-row plans with sub-batches and one plan for every row:
    the same logits, plans and stats with the meta device as torch's default."""
    g = torch.Generator().manual_seed(8)
    ids, mask, pos = _left_padded(g, [8, 5, 8, 3], 8)
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1

    def set_plan(plan):
        # a plan is the caller's data, made before the forward: with the CPU as default, as a caller would
        with torch.device(CPU):
            h.set_plan(plan)

    def run():
        with torch.no_grad():
            set_plan(None)
            base = model(ids, attention_mask=mask, position_ids=pos).logits
            plans0 = h.last_plans
            set_plan([PLAN_A, PLAN_B, PLAN_A, PLAN_B])
            rows = model(ids, attention_mask=mask, position_ids=pos).logits
            plans1 = h.last_plans
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            set_plan(PLAN_B)
            one = model(ids).logits
        return base, plans0, rows, plans1, gen, one, h.stats()

    with meta_default():
        got = run()
    h.reset_stats()
    want = run()
    _assert_same(got, want)
    assert want[1] == [["execute"] * 4] * 4 and want[3] == [PLAN_A, PLAN_B, PLAN_A, PLAN_B]


class _CpuOnlyIndex:
    """A beam index that can only be used once moved to the CPU (the device the sub-batch rows live on)."""

    def __init__(self, t):
        self.t = t
        self.devices = []

    def to(self, device):
        self.devices.append(device)
        if device is None or torch.device(device) != CPU:
            raise RuntimeError(f"beam_idx moved to {device!r}, not to the rows' device")
        return self.t


def test_beam_reorder_of_sub_batch_caches_does_not_depend_on_the_default_device():
    """generate()'s beam reorder on a cache whose slots hold sub-batches: the same keys / values with the meta
    device as default, and beam_idx is moved onto the rows' device before it is used."""
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 128, (4, 7), generator=g)
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm")
    h.sub_batch_multiple = 1
    h.set_plan([PLAN_A, PLAN_A, PLAN_B, PLAN_B])  # beams of one prompt share its plan
    beam_idx = torch.tensor([1, 1, 3, 2])

    def prefill():
        with torch.no_grad():
            return model(ids, use_cache=True).past_key_values

    def contents(pkv):
        return [(x.keys.clone(), x.values.clone()) for x in pkv.layers if getattr(x, "keys", None) is not None]

    ref = prefill()
    assert any(x.keys.shape[0] < 4 for x in ref.layers if x.keys is not None)  # some slots hold sub-batches
    ref.reorder_cache(beam_idx)
    want = contents(ref)
    pkv = prefill()
    with meta_default():
        pkv.reorder_cache(beam_idx)
    _assert_same(contents(pkv), want)
    pkv = prefill()
    spy = _CpuOnlyIndex(beam_idx)
    pkv.reorder_cache(spy)
    assert spy.devices
    _assert_same(contents(pkv), want)
    # the reorder really reordered: row 0 of a slot holding rows {0, 1} now holds row 1's history
    before = contents(prefill())
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(before, want))


def test_window_means_and_pooling_stay_on_the_hidden_states_device():
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(3, 9, 16, generator=g)
    _, mask, _ = _left_padded(g, [9, 5, 2], 9)
    want = [window_means(hidden, mask, 4), window_means(hidden, None, 4)]
    with meta_default():
        got = [window_means(hidden, mask, 4), window_means(hidden, None, 4)]
    _assert_same(got, want)
    # a row of 2 real tokens fills windows 0 and 2 (rank r goes to window floor(r * W / n))
    assert torch.equal(want[0][1], torch.tensor([[True] * 4, [True] * 4, [True, False, True, False]]))
    # a mask on another device than the hidden states is moved onto theirs
    means, valid = window_means(hidden.to(META), mask, 4)
    assert means.device == META and valid.device == META and means.shape == (3, 4, 16)

    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", num_windows=4)
    wm = [window_matrix(mask, 4), window_matrix(torch.ones(1, 9, dtype=torch.long), 4)]
    want = [h._pooling(mask, hidden), h._pooling(None, hidden)]
    _assert_same([want[0][:2], want[1][0][:1], want[1][1][:1]], [wm[0], wm[1][0], wm[1][1]])
    h2 = retrofit.attach(tiny_model("llama"), "drllm", num_windows=4)
    with meta_default():
        got = [h2._pooling(mask, hidden), h2._pooling(None, hidden)]
    _assert_same([g[:3] for g in got], [w[:3] for w in want])
    assert [g[3] for g in got] == [w[3] for w in want] == [False, True]  # a row of 2 tokens leaves windows empty
    for p in (h._pooling(mask, hidden.to(META)), h._pooling(None, hidden.to(META))):
        assert all(x.device == META for x in p[:3])
        assert p[0].shape == (3, 4, 9)


def _scores(ev, ex, plans):
    ev.set_example(ex)
    return [(r.scores, r.pred, r.correct) for r in ev.evaluate(plans)]


def test_plan_evaluator_does_not_depend_on_the_default_device(monkeypatch):
    """set_example / evaluate: the same scores with the meta device as default. The packed attention mask is
    built on the CPU (where its Python loop fills it) and then moved to the model's device; only that helper
    runs with the CPU as default, since a meta tensor cannot be copied anywhere."""
    m = tiny_model("llama", seed=0, initializer_range=0.5)
    tok = CharTokenizer(m.config.vocab_size)
    ex = toy_examples(2)[1]
    E, S, R = "execute", "skip", "repeat"
    plans = [(E, E, E, E), (S, R, E, S), (R, E, S, R), (E, S, S, E)]
    want = _scores(PlanEvaluator(m, tok), ex, plans)
    assert len({tuple(s) for s, _, _ in want}) == len(plans)
    orig = evaluator_mod._Packed.mask

    def cpu_mask(self, dtype):
        with torch.device(CPU):
            return orig(self, dtype)

    monkeypatch.setattr(evaluator_mod._Packed, "mask", cpu_mask)
    ev = PlanEvaluator(m, tok)
    # an embedding of meta token ids reads uninitialized CPU memory (no error), so the ids are checked as well
    seen = _embedded_ids(m)
    with meta_default():
        got = _scores(ev, ex, plans)
    assert seen == [CPU]
    assert got == want
    assert ev._cache[()].device == CPU and ev._tgt_nodes.device == CPU


def _embedded_ids(model):
    """Devices of the token ids each call of the model's input embedding gets."""
    seen = []
    model.model.embed_tokens.register_forward_pre_hook(lambda mod, args: seen.append(args[0].device))
    return seen


def test_plan_evaluator_puts_its_example_on_the_model_device():
    """A model on another device (meta stands in for an accelerator): every tensor of the example goes there."""
    m = tiny_model("llama", seed=0).to(META)
    tok = CharTokenizer(m.config.vocab_size)
    ev = PlanEvaluator(m, tok)
    seen = _embedded_ids(m)
    ev.set_example(toy_examples(1)[0])
    assert seen == [META]
    kw = ev._kwargs
    assert kw["attention_mask"].device == META and kw["position_ids"].device == META
    assert all(t.device == META for t in kw["position_embeddings"])
    assert ev._tgt_nodes.device == META and ev._cache[()].device == META
    T = kw["attention_mask"].shape[-1]
    assert kw["attention_mask"].shape == (1, 1, T, T) and kw["position_ids"].shape == (1, T)
