"""Gaps the mutation run left in the plan search (retrofit.search.mcts) and the plan evaluator
(retrofit.search.evaluator).

The search: budget parsing at its edges and its error messages; both trees on plan spaces small enough to be
searched to the end (which plans they visit for one seed, that they stop once every plan is evaluated, what they
return), the budget in the prefix tree, ``p_random=0`` never picking a random child whatever the draw, the
reported seconds. The evaluator: the packed trie by hand, what the decoder layers are called with (the same
arguments as the model's own forward gives them, in the model's dtype), its counters, the default cache bound and
the default decoding length, and the generative prompt tokenised without special tokens (a real Hugging Face
tokenizer adds BOS by default).
"""

import itertools
import random
import time

import pytest
import torch

from retrofit.core.data import Example
from retrofit.core.plans import plan_passes
from retrofit.search.evaluator import PlanEvaluator, _Packed
from retrofit.search.mcts import MCTSConfig, SearchResult, budget_passes, evaluate_checked, mcts_search
from retrofit.testing import tiny_model
from retrofit.testing.search_toys import CharTokenizer, toy_examples

ACTS = ("skip", "execute", "repeat")
_CODE = {"skip": "s", "execute": "e", "repeat": "r"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _code(p):
    return "".join(_CODE[a] for a in p)


def _search(L, fn, *, rng=None, seed=0, budget=None, **kw):
    """Run the search with an oracle ``fn``; return (the plans evaluated, call by call, as codes) and the result."""
    calls = []

    def evaluate(plans):
        assert all(len(p) == L for p in plans), plans  # every plan the search asks about is a whole plan
        calls.append([_code(p) for p in plans])
        return [fn(p) for p in plans]

    res = mcts_search(evaluate, L, MCTSConfig(**kw), rng if rng is not None else random.Random(seed), budget=budget)
    assert isinstance(res, SearchResult)
    return calls, res


def _two_passes(p):
    return plan_passes(p) >= 2


# ----------------------------------------------------------------------------------------- budget parsing
def test_budget_fraction_edges_and_messages():
    assert budget_passes(2.0, 30) == 60 and budget_passes("2.0", 5) == 10  # 2.0 (every layer repeated) is allowed
    for bad, msg in [(2.5, "a fractional budget must be <= 2.0 (all layers repeated), got 2.5"),
                     ("2.01", "a fractional budget must be <= 2.0 (all layers repeated), got 2.01"),
                     (0, "budget must be > 0, got 0"), (-0.5, "budget must be > 0, got -0.5"),
                     ("-3", "budget must be > 0, got -3"),
                     ("abc", "budget 'abc': give a fraction like 0.9 or a number of layers like 27"),
                     ("0.9x", "budget '0.9x': give a fraction like 0.9 or a number of layers like 27")]:
        with pytest.raises(ValueError) as e:
            budget_passes(bad, 30)
        assert str(e.value) == msg


def test_evaluate_must_answer_every_plan():
    with pytest.raises(ValueError) as e:
        evaluate_checked(lambda plans: [True], [("execute",), ("skip",)])
    assert str(e.value) == "evaluate() returned 1 answers for 2 plans"
    with pytest.raises(ValueError) as e:
        mcts_search(lambda plans: [], 3, MCTSConfig(simulations=4), random.Random(0))
    assert str(e.value) == "evaluate() returned 0 answers for 1 plans"


# ----------------------------------------------------------------------------------------- the path tree
def test_path_tree_searches_a_small_space_to_the_end():
    """Three layers, budget 3: 17 plans have at most 3 passes, all reachable from the base plan by Dr.LLM's
    edits. With far more simulations than plans the search evaluates each once, stops when the tree is used up
    (16 simulations, not 200) and returns the first 2-pass plan with one unique layer it met."""
    t0 = time.perf_counter()
    calls, res = _search(3, _two_passes, simulations=200, batch=1, seed=0)
    elapsed = time.perf_counter() - t0
    assert calls == [["eee"], ["ees"], ["ses"], ["ese"], ["ess"], ["esr"], ["sse"], ["rss"], ["sss"], ["see"],
                     ["ser"], ["rse"], ["ssr"], ["sre"], ["res"], ["srs"], ["ers"]]
    assert len({p for c in calls for p in c}) == 17 == sum(plan_passes(p) <= 3
                                                                for p in itertools.product(ACTS, repeat=3))
    assert (_code(res.plan), res.found, res.reward, res.compute) == ("rss", True, 1.0, 2)
    assert (res.simulations, res.configs, res.base_correct) == (16, 17, True)
    assert [_code(p) for p in res.good_plans] == ["eee", "ees", "ese", "esr", "rss", "see", "ser", "rse", "ssr",
                                                  "sre", "res", "srs", "ers"]
    assert 0.0 <= res.seconds <= elapsed
    # in rounds of three: the same plans, one batch per round, the last round short
    calls, res = _search(3, _two_passes, simulations=200, batch=3, seed=1)
    assert calls == [["eee"], ["ees", "ses", "sse"], ["ess", "sss", "ese"], ["rss", "rse", "see"],
                     ["sre", "esr", "ssr"], ["ser", "res", "srs"], ["ers"]]
    assert (_code(res.plan), res.simulations, res.configs) == ("rss", 16, 17)


class _FixedDraw(random.Random):
    """A seeded generator whose ``random()`` always returns ``draw`` (integers, shuffles: Mersenne Twister)."""

    getrandbits = random.Random.getrandbits  # keep the integer draws on the Mersenne Twister

    def __init__(self, seed, draw):
        super().__init__(seed)
        self.draw = draw

    def random(self):
        return self.draw


def test_p_random_zero_never_picks_a_random_child():
    # with p_random = 0 every descent follows UCB: the uniform draw compared with p_random cannot matter, even
    # when it is exactly 0.0
    a, ra = _search(6, _two_passes, rng=_FixedDraw(3, 0.0), simulations=40, batch=2, p_random=0.0)
    b, rb = _search(6, _two_passes, rng=_FixedDraw(3, 0.5), simulations=40, batch=2, p_random=0.0)
    assert a == b and ra.plan == rb.plan and ra.simulations == rb.simulations == 40


# ----------------------------------------------------------------------------------------- the prefix tree
def test_prefix_tree_searches_a_small_space_to_the_end():
    """Two layers: the tree holds 3 + 1 + 9 = 13 nodes below the root (execute / skip / repeat at layer 0, the
    double skip, then each action at layer 1); every simulation adds one, so the search stops after 13 of its
    100 simulations, in the middle of a round, and never asks about a plan longer than the model."""
    calls, res = _search(2, _two_passes, simulations=100, batch=3, seed=0, tree="prefix")
    assert calls == [["ee"], ["re", "se"], ["ss"], ["sr", "er"], ["es", "rs", "rr"]]
    assert (_code(res.plan), res.found, res.simulations, res.configs, res.base_correct) == ("sr", True, 13, 9, True)
    assert [_code(p) for p in res.good_plans] == ["ee", "sr", "rs"]  # 'er', 're', 'rr': over the budget of 2
    # one layer, rounds of eight: the three children of the root end the search in the first round
    calls, res = _search(1, _two_passes, simulations=50, batch=8, seed=0, tree="prefix")
    assert res.simulations == 3 and sorted(p for c in calls for p in c) == ["e", "r", "s"]


def test_prefix_tree_without_pruning_spends_every_simulation():
    # prune_exhausted=False: a complete plan may be visited again (it is not re-evaluated), all 7 simulations run
    calls, res = _search(1, _two_passes, simulations=7, batch=2, seed=0, tree="prefix", prune_exhausted=False)
    assert calls == [["e"], ["s", "r"]]
    assert (res.simulations, res.configs, res.found, res.base_correct) == (7, 3, False, False)


def test_prefix_tree_respects_the_budget():
    # correct iff the plan has at least 2 passes: within budget 1 no plan earns the reward
    calls, res = _search(2, _two_passes, simulations=60, seed=0, tree="prefix", budget=1)
    assert not res.found and res.plan == ("execute", "execute") and res.good_plans == [] and res.base_correct
    assert {p for c in calls for p in c} == {"ee", "es", "er", "se", "ss", "sr", "re", "rs", "rr"}
    # a budget above L: 3 passes are needed, only allowed with budget 3
    need3 = lambda p: plan_passes(p) >= 3  # noqa: E731
    _, res = _search(2, need3, simulations=60, seed=0, tree="prefix", budget=3)
    assert res.found and res.compute == 3 and _code(res.plan) in ("re", "er")
    _, res = _search(2, need3, simulations=60, seed=0, tree="prefix")
    assert not res.found


# ----------------------------------------------------------------------------------------- the packed trie
def test_packed_trie_by_hand():
    # two requests sharing the context [5, 6]: seq[:-1] of each becomes a path of the trie
    pk = _Packed([([5, 6], [7, 8]), ([5, 6], [9])])
    assert pk.tokens == [5, 6, 7]
    assert pk.depth == [0, 1, 2]  # the position ids: depth in the trie, from 0
    assert pk.targets == [[(1, 7), (2, 8)], [(1, 9)]]
    pk = _Packed([([5], [6, 7]), ([8], [6])])  # no shared context: two roots, both at depth 0
    assert pk.tokens == [5, 6, 8] and pk.depth == [0, 1, 0]
    assert pk.targets == [[(0, 6), (1, 7)], [(2, 6)]]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        m = pk.mask(dtype)
        assert m.dtype == dtype and m.shape == (1, 1, 3, 3)
        lo = torch.finfo(dtype).min
        want = torch.tensor([[0, lo, lo], [0, 0, lo], [lo, lo, 0]], dtype=dtype)  # each token sees its ancestors
        assert torch.equal(m[0, 0], want)


# ----------------------------------------------------------------------------------------- the evaluator
def test_layers_get_the_models_own_arguments_in_its_dtype():
    """One choice: the trie is the plain sequence, so every layer call must get what the model's own forward
    (the adapter's ``prepare``) gives it: the same positions and rotary embeddings, no cache; the mask is the
    additive causal mask in the model's dtype."""
    m = tiny_model("llama", seed=1, dtype=torch.bfloat16)
    tok = CharTokenizer(m.config.vocab_size)
    ev = PlanEvaluator(m, tok)
    assert ev.dtype == torch.bfloat16 and ev.device == torch.device("cpu") and ev.L == 4
    seen = []
    handles = [layer.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw), with_kwargs=True)
               for layer in ev.layers]
    try:
        ex = Example("one/0", "Question: hi?\nAnswer:", ["yes"], 0)
        ev.set_example(ex)
        ev.evaluate([("execute", "skip", "repeat", "execute")])
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 4  # layers 0, 2 (twice) and 3
    ids = torch.tensor([tok(ex.prompt + " yes")["input_ids"][:-1]])
    _, ref = ev.adapter.prepare(m, ids)
    for kw in seen:
        assert set(kw) == set(ref) == {"attention_mask", "position_embeddings", "position_ids", "past_key_values",
                                       "use_cache"}
        assert torch.equal(kw["position_ids"], ref["position_ids"])
        assert kw["position_ids"][0].tolist() == list(range(ids.shape[1]))
        assert all(torch.equal(a, b) for a, b in zip(kw["position_embeddings"], ref["position_embeddings"]))
        assert kw["past_key_values"] is None and kw["use_cache"] is False
        mask = kw["attention_mask"]
        assert mask.dtype == torch.bfloat16 and mask.shape == (1, 1, ids.shape[1], ids.shape[1])
        assert torch.equal(mask[0, 0] == 0, torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril())


def test_counters_and_the_call_order_error():
    m = tiny_model("llama", seed=0, initializer_range=0.5)
    ev = PlanEvaluator(m, CharTokenizer(m.config.vocab_size))
    assert ev.stats == {"configs": 0, "block_passes": 0, "cache_hits": 0}
    with pytest.raises(RuntimeError) as e:
        ev.evaluate([("execute",) * 4])
    assert str(e.value) == "call set_example(example) first"
    ev.set_example(toy_examples(1)[0])
    E, S, R = "execute", "skip", "repeat"
    ev.evaluate([(E, E, E, E), (E, E, S, R)])
    assert ev.stats == {"configs": 2, "block_passes": 6, "cache_hits": 0}
    ev.evaluate([(E, E, S, E)])  # starts from the cached (E, E, S)
    assert ev.stats == {"configs": 3, "block_passes": 7, "cache_hits": 1}
    ev.reset_stats()
    assert ev.stats == {"configs": 0, "block_passes": 0, "cache_hits": 0}


def _cache_fill_plans(L, n_prefixes):
    """Plans of L actions whose proper prefixes (lengths 1..L-1) number exactly ``n_prefixes``."""
    plans = [h + ("execute",) * (L - 4) for h in itertools.product(ACTS, repeat=4)]
    have = len({p[:k] for p in plans for k in range(1, L)})
    extra = n_prefixes - have  # one more plan, leaving plans[0] at layer L-1-extra: extra new prefixes
    assert 0 < extra < L - 4
    d = L - 1 - extra
    plans.append(plans[0][:d] + ("skip",) + plans[0][d + 1:])
    assert len({p[:k] for p in plans for k in range(1, L)}) == n_prefixes
    return plans


def test_the_default_cache_bound_is_6000_prefixes():
    """The prefix cache keeps at most 6000 entries besides the embeddings: one more and it is emptied, so a plan
    that shares 76 layers with a cached prefix runs them all again."""
    L = 77
    m = tiny_model("llama", seed=0, num_hidden_layers=L, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                   num_key_value_heads=1)
    tok = CharTokenizer(m.config.vocab_size)
    ex = Example("c/0", "Q:", ["a", "b"], 0)
    for n, kept in ((5999, True), (6000, False)):
        ev = PlanEvaluator(m, tok)
        ev.set_example(ex)
        plans = _cache_fill_plans(L, n)
        ev.evaluate(plans)
        ev.reset_stats()
        again = plans[-1][:-1] + ("skip",)  # shares its first 76 actions with a plan already run
        assert plan_passes(again) == 71
        ev.evaluate([again])
        if kept:  # root + 5999 prefixes = 6000 entries: all kept, nothing runs
            assert ev.stats == {"configs": 1, "block_passes": 0, "cache_hits": 1}
        else:  # 6001 entries: the cache was emptied, the 71 executed layers run again
            assert ev.stats == {"configs": 1, "block_passes": 71, "cache_hits": 0}


class _ZeroTokenizer(CharTokenizer):
    """Token 0 decodes to 'x' (the rigged model below always predicts token 0)."""

    def decode(self, ids) -> str:
        return "".join("x" if i == 0 else super(_ZeroTokenizer, self).decode([i]) for i in ids)


def test_generation_stops_after_256_new_tokens_by_default():
    m = tiny_model("llama", seed=0, num_hidden_layers=1, hidden_size=16, intermediate_size=16,
                   num_attention_heads=2, num_key_value_heads=1)
    with torch.no_grad():
        m.model.norm.weight.zero_()  # every logit 0: greedy decoding picks token 0 every step, never EOS
    ev = PlanEvaluator(m, _ZeroTokenizer(m.config.vocab_size))
    ev.set_example(Example("g/0", "Q: 7?\nA:", [], "7", kind="gen"))
    r = ev.evaluate([("execute",)])[0]
    assert r.text == "x" * 256 and r.pred is None and not r.correct


def _hf_char_tokenizer():
    """A real Hugging Face fast tokenizer (one token per character) that, like Llama's, adds BOS by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_generative_prompt_is_tokenised_without_special_tokens():
    tok = _hf_char_tokenizer()
    prompt = "Question: 1+1?\nAnswer:"
    assert tok(prompt)["input_ids"][0] == tok.bos_token_id  # the tokenizer's default adds BOS
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] != tok.bos_token_id and len(ids) == len(prompt)
    m = tiny_model("llama", seed=0, initializer_range=0.5)
    ev = PlanEvaluator(m, tok, max_new_tokens=2)
    fed = []
    h = m.model.embed_tokens.register_forward_hook(lambda mod, args, out: fed.append(args[0][0].tolist()))
    try:
        ev.set_example(Example("g/0", prompt, [], "2", kind="gen"))
        r = ev.evaluate([("execute", "skip", "repeat", "execute")])[0]
    finally:
        h.remove()
    assert fed and fed[0] == ids  # the model sees the prompt exactly, no BOS in front
    assert all(f[: len(ids)] == ids for f in fed) and r.gold == "2"
