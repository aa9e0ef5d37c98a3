"""The MoE testbed conversion (retrofit.moe.moefy) on a tiny random Llama: exact split and weight mapping (Qwen2-MoE
with a shared expert, and Mixtral), the gate fit, GateHook on the result, the dense model untouched."""

import pytest
import torch

from retrofit.arch import get_adapter
from retrofit.arch.gates import GateHook
from retrofit.moe import moefy as M
from retrofit.moe.moefy import MoefyConfig, _complete, balanced_kmeans, build_moe, expert_split, moefy_model
from retrofit.testing import tiny_model


def _ids(B=4, T=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (B, T), generator=g)


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama", tie_word_embeddings=True).requires_grad_(False)


@pytest.mark.parametrize("arch,shared,experts", [("qwen2_moe", 32, 4), ("qwen2_moe", 64, 8), ("mixtral", 0, 4),
                                                  ("mixtral", 0, 8)])
def test_all_experts_active_reproduces_dense(dense, arch, shared, experts):
    ids = _ids()
    cfg = MoefyConfig(experts=experts, top_k=experts, shared=shared, arch=arch)
    moe, rep = moefy_model(dense, _ids(8, 32, seed=2), cfg, progress=False)
    assert get_adapter(moe).family == arch
    assert moe.config.num_experts_per_tok == experts
    if arch == "mixtral":
        assert moe.config.num_local_experts == experts
        assert moe.config.intermediate_size * experts == dense.config.intermediate_size
    else:
        assert moe.config.num_experts == experts and moe.config.norm_topk_prob
        assert moe.config.moe_intermediate_size * experts + shared == dense.config.intermediate_size
        assert moe.config.shared_expert_intermediate_size == shared
    if arch == "mixtral":
        assert moe.config.sliding_window is None
    else:  # Qwen2-MoE stores sliding_window 0 when unused
        assert not moe.config.use_sliding_window and set(moe.config.layer_types) == {"full_attention"}
    assert moe.config.tie_word_embeddings
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        ref, out = dense(ids).logits, moe(ids).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert rep["mean"]["rel_err_fit"] < 1e-10


def test_weight_mapping(dense):
    E, k = 4, 2
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    splits = [(torch.empty(0, dtype=torch.long), perm.view(E, -1)) for _ in dense.model.layers]  # any partition
    gates = [torch.randn(E, 64) for _ in dense.model.layers]
    moe = build_moe(dense, splits, gates, k, arch="mixtral")
    d, m = dense.model.layers[1].mlp, moe.model.layers[1].mlp
    idx = splits[1][1][0]
    assert tuple(m.experts.gate_up_proj.shape) == (E, 2 * 24, 64)
    assert tuple(m.experts.down_proj.shape) == (E, 64, 24)
    assert torch.equal(m.experts.gate_up_proj[0, :24], d.gate_proj.weight[idx])
    assert torch.equal(m.experts.gate_up_proj[0, 24:], d.up_proj.weight[idx])
    assert torch.equal(m.experts.down_proj[0], d.down_proj.weight[:, idx] * k)
    assert torch.equal(m.gate.weight, gates[1])
    # attention and norms copied verbatim
    assert torch.equal(moe.model.layers[3].self_attn.q_proj.weight, dense.model.layers[3].self_attn.q_proj.weight)
    assert torch.equal(moe.model.layers[3].post_attention_layernorm.weight,
                       dense.model.layers[3].post_attention_layernorm.weight)
    # with equal gate logits, top-k < E keeps the k chosen experts' plain sum: the k scale undoes the 1/k weights
    x = torch.randn(5, 64)
    with torch.no_grad():
        m.gate.weight.zero_()
        y = m(x[None])[0]
        _, ind = torch.topk(torch.softmax(torch.zeros(5, E), -1), k, -1)
        a = torch.nn.functional.silu(x @ d.gate_proj.weight.T) * (x @ d.up_proj.weight.T)
        ref = torch.stack([sum(a[t, splits[1][1][e]] @ d.down_proj.weight[:, splits[1][1][e]].T
                               for e in ind[t].tolist()) for t in range(5)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # Qwen2-MoE: the shared expert holds its neurons, its down projection × 2 against sigmoid(0) of a zero gate
    sh, rest = perm[:32].sort().values, perm[32:].view(E, -1)
    moe2 = build_moe(dense, [(sh, rest)] * len(dense.model.layers), gates, k, arch="qwen2_moe")
    m2 = moe2.model.layers[1].mlp
    assert torch.equal(m2.shared_expert.gate_proj.weight, d.gate_proj.weight[sh])
    assert torch.equal(m2.shared_expert.up_proj.weight, d.up_proj.weight[sh])
    assert torch.equal(m2.shared_expert.down_proj.weight, d.down_proj.weight[:, sh] * 2)
    assert not m2.shared_expert_gate.weight.any()
    assert torch.equal(m2.experts.down_proj[3], d.down_proj.weight[:, rest[3]] * k)
    assert m2.experts.gate_up_proj.data_ptr() != d.gate_proj.weight.data_ptr()


@pytest.mark.parametrize("arch,shared", [("qwen2_moe", 32), ("mixtral", 0)])
def test_gate_fit_beats_random_routing(dense, arch, shared):
    calib = _ids(16, 64, seed=3)
    cfg = MoefyConfig(experts=4, top_k=1, steps=150, batch=512, shared=shared, arch=arch)
    moe, rep = moefy_model(dense, calib, cfg, progress=False)
    mean = rep["mean"]
    # held-out calibration tokens, per layer mean of ||y_moe - y_dense||^2 / ||y_dense||^2
    assert mean["rel_err_fit"] < mean["rel_err_random"] - 0.02
    assert mean["rel_err_oracle"] < mean["rel_err_random"]
    assert 0 < mean["rel_err_fit"] < 1.0
    if shared:  # the routed experts add to the shared one
        assert mean["rel_err_fit"] < mean["rel_err_shared_only"] - 0.05
    assert mean["topk_hit"] > 1 / 4 + 0.05  # better than chance at picking the oracle expert
    # the converted Mixtral block itself (real gate forward, top-k, renorm), on fresh tokens: fitted routing is
    # closer to the dense MLP than random routing through the GateHook
    x = M.capture_mlp_inputs(dense, list(_ids(4, 48, seed=9)), progress=False)
    hook = GateHook.install(moe)
    g = torch.Generator().manual_seed(0)
    err_fit, err_rnd = [], []
    with torch.no_grad():
        for l in hook.layers:
            ref = dense.model.layers[l].mlp(x[l])
            err_fit.append(((moe.model.layers[l].mlp(x[l][None])[0] - ref) ** 2).sum() / (ref ** 2).sum())
            hook.set_offset(l, lambda z: torch.randn(z.shape, generator=g).to(z))
            err_rnd.append(((moe.model.layers[l].mlp(x[l][None])[0] - ref) ** 2).sum() / (ref ** 2).sum())
    hook.release()
    assert sum(err_fit) / len(err_fit) < sum(err_rnd) / len(err_rnd) - 0.02


@pytest.mark.parametrize("arch,shared", [("qwen2_moe", 32), ("mixtral", 0)])
def test_gatehook_on_converted_model(dense, arch, shared):
    cfg = MoefyConfig(experts=4, top_k=2, steps=20, shared=shared, arch=arch)
    moe, _ = moefy_model(dense, _ids(8, 32, seed=4), cfg, progress=False)
    gates = get_adapter(moe).moe_gates(moe)
    assert sorted(gates) == list(range(dense.config.num_hidden_layers))
    ids = _ids(2, 16)
    with torch.no_grad():
        ref = moe(ids).logits
    hook = GateHook.install(moe)
    assert hook.num_experts() == 4 and hook.top_k() == 2
    with torch.no_grad(), hook.recording() as rec:
        same = moe(ids).logits
    assert torch.equal(same, ref)
    idx = rec.cat("indices")
    assert set(idx) == set(gates) and tuple(idx[0].shape) == (32, 2)
    w = rec.cat("weights")[0]
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    with torch.no_grad():
        hook.set_offset(0, torch.tensor([100.0, 100.0, -100.0, -100.0]))
        with hook.recording() as rec2:
            moved = moe(ids).logits
    assert set(rec2.cat("indices")[0].flatten().tolist()) == {0, 1}
    assert not torch.allclose(moved, ref)
    hook.release()
    assert all("forward" not in g.__dict__ for g in gates.values())
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, ref)


def test_dense_model_unchanged(dense):
    before = {n: p.detach().clone() for n, p in dense.state_dict().items()}
    ids = _ids(2, 16)
    with torch.no_grad():
        ref = dense(ids).logits
    moe, _ = moefy_model(dense, _ids(8, 32, seed=5), MoefyConfig(experts=4, top_k=2, steps=20, shared=32),
                         progress=False)
    with torch.no_grad():  # converted weights are copies: changing the MoE leaves the dense model alone
        moe.model.layers[0].self_attn.q_proj.weight.add_(1.0)
        moe.model.layers[0].mlp.experts.down_proj.add_(1.0)
        moe.model.layers[0].mlp.shared_expert.up_proj.weight.add_(1.0)
    after = dense.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(p.requires_grad for p in dense.parameters())
    assert not dense.model.layers[0].mlp._forward_pre_hooks  # the capture hooks are gone
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, ref)


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    truth = torch.arange(40) % 4
    feats = centers[truth] + 0.3 * torch.randn(40, 16, generator=g)
    lab = balanced_kmeans(feats, 4, iters=10, seed=1)
    assert torch.bincount(lab, minlength=4).tolist() == [10, 10, 10, 10]
    # a bijection between found and planted clusters
    pairs = {(int(a), int(b)) for a, b in zip(lab, truth)}
    assert len(pairs) == 4
    with pytest.raises(ValueError):
        balanced_kmeans(feats[:39], 4)


@pytest.mark.parametrize("method", ["coact", "weights", "random"])
def test_expert_split_is_partition(dense, method):
    mlp = dense.model.layers[0].mlp
    act = torch.randn(64, 96)
    sh, idx = expert_split(act, mlp, 8, method)
    assert sh.numel() == 0 and tuple(idx.shape) == (8, 12)
    assert torch.equal(idx.flatten().sort().values, torch.arange(96))
    sh, idx = expert_split(act, mlp, 4, method, shared=32)
    assert sh.numel() == 32 and tuple(idx.shape) == (4, 16)
    assert torch.equal(torch.cat([sh, idx.flatten()]).sort().values, torch.arange(96))
    # the shared expert takes the neurons that dominate: a neuron made huge on one token ranks first
    act2 = act.clone()
    act2[0, 7] = 1e4
    assert 7 in expert_split(act2, mlp, 4, method, shared=8)[0].tolist()


def test_config_errors_and_save_roundtrip(dense, tmp_path):
    with pytest.raises(ValueError):
        MoefyConfig(experts=4, top_k=5).validate()
    with pytest.raises(ValueError):
        MoefyConfig(experts=5, top_k=2, shared=0, arch="mixtral").validate(96)
    with pytest.raises(ValueError):
        MoefyConfig(experts=4, top_k=2, shared=8, arch="mixtral").validate(96)
    with pytest.raises(ValueError):
        MoefyConfig(experts=4, top_k=2, shared=96).validate(96)
    with pytest.raises(ValueError):
        moefy_model(tiny_model("mixtral"), _ids(), MoefyConfig(experts=4, top_k=2))
    from transformers import AutoModelForCausalLM

    moe, _ = moefy_model(dense, _ids(8, 32, seed=6), MoefyConfig(experts=4, top_k=2, steps=10, shared=32),
                         progress=False)
    moe.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(2, 16)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, moe(ids).logits)
    assert not _complete(tmp_path / "nothing")
    assert M.testbed_dir(16, 4).name == "smollm2-moe-e16k4" and M.testbed_dir().parent.name == "moe"
    assert M.testbed_dir(8, 2, arch="mixtral", shared=0).name == "smollm2-moe-e8k2-mixtral"


def test_sequential_fit_sees_the_converted_stream(dense, monkeypatch):
    """Layer l's gate is fitted on exactly the MLP inputs the finished MoE produces (layers < l converted)."""
    seen = []
    orig = M.fit_gate

    def spy(x, *a, **k):
        seen.append(x.clone())
        return orig(x, *a, **k)

    monkeypatch.setattr(M, "fit_gate", spy)
    ids = _ids(8, 32, seed=7)
    moe, _ = moefy_model(dense, ids, MoefyConfig(experts=4, top_k=2, shared=32, steps=30), progress=False)
    got = M.capture_mlp_inputs(moe, list(ids), progress=False)
    dense_in = M.capture_mlp_inputs(dense, list(ids), progress=False)
    assert len(seen) == len(got) == dense.config.num_hidden_layers
    for l, (a, b) in enumerate(zip(seen, got)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (seen[-1] - dense_in[-1]).abs().max() > 1e-2  # and that stream differs from the dense one


@pytest.mark.slow
@pytest.mark.data
def test_real_testbed_if_built():
    """The SmolLM2 testbed in the cache (built by `retrofit moefy`; skipped when absent): GateHook works on it
    and its fitted routing beats random routing on held-out Shakespeare."""
    try:
        moe, tok = M.load_testbed(build=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert type(moe).__name__ == "Qwen2MoeForCausalLM" and not any(p.requires_grad for p in moe.parameters())
    assert moe.config.shared_expert_intermediate_size == 768 and moe.config.moe_intermediate_size == 96
    ids = torch.tensor(tok(M.heldout_text()[:3000], add_special_tokens=False)["input_ids"][:256])[None]
    hook = GateHook.install(moe)
    assert hook.layers == list(range(30)) and hook.num_experts() == 8 and hook.top_k() == M.MoefyConfig.top_k
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fit = float(moe(ids, labels=ids).loss)
        for l in hook.layers:
            hook.set_offset(l, lambda z: torch.randn(z.shape, generator=g).to(z))
        rnd = float(moe(ids, labels=ids).loss)
    hook.release()
    assert fit < rnd - 0.2 and fit < 5.5  # the default (top-4, distilled) build: about 3.98 vs 4.35 nats per token
