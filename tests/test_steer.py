import json

import pytest
import torch

import retrofit
from retrofit.arch.gates import GateHook
from retrofit.artifacts import ArtifactError
from retrofit.methods.steer import (SteerConfig, attach_fit, expert_usage, fit_steering, load_texts, middle_layers,
                                    steer_logits, steering_masks)
from retrofit.testing import MOE_FAMILIES, tiny_model


def _ids(B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (B, T), generator=g)


class _Tok:
    """A byte-level stand-in tokenizer for the tiny models (ids 3..127)."""
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (b % 125) for b in text.encode()]}


def test_config_validation():
    with pytest.raises(ValueError):
        SteerConfig(mode="medium")
    with pytest.raises(ValueError):
        SteerConfig(lam=float("nan"))
    with pytest.raises(ValueError):
        SteerConfig(experts={"x": [1]})
    with pytest.raises(ValueError):
        SteerConfig(layer_range=[0.7, 0.3])
    assert SteerConfig(experts={"2": [3, 1]}).experts == {2: [1, 3]}


def test_usage_and_mask_from_hand_built_recording():
    # 2 sequences x 3 tokens, E = 4, k = 2; sequence 1's last token is padding
    idx = torch.tensor([[0, 1], [0, 2], [0, 1],
                        [3, 2], [3, 1], [0, 1]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    a = expert_usage(idx, valid, 4)
    torch.testing.assert_close(a, torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0], [0.0, 0.5, 0.5, 1.0]], dtype=torch.float64))
    task = {5: a}
    general = {5: torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)}
    masks, deltas = steering_masks(task, general, tau=0.05, layers=[5])
    torch.testing.assert_close(deltas[5], torch.tensor([0.0, 7 / 12 - 0.5, 5 / 12 - 0.5, 0.0], dtype=torch.float64))
    assert masks[5].tolist() == [False, True, False, False]
    assert middle_layers(list(range(30)), 30) == list(range(10, 20))
    assert middle_layers([1, 2, 3], 4) == [2]
    assert middle_layers(list(range(12)), 12, (0.0, 0.25)) == [0, 1, 2]


def test_fit_uses_recording_like_hand_computation():
    model = tiny_model("olmoe")
    tok = _Tok()
    task = ["one two three four", "five six"]
    gen = ["the cat sat on the mat today", "hello"]
    fit = fit_steering(model, tok, task, gen, tau=-1.0, layers=[1, 2])
    assert fit.layers == [1, 2] and all(m.all() for m in fit.masks.values())  # tau=-1 keeps every expert
    # by hand, one text at a time
    hook = GateHook.install(model)
    for l in (1, 2):
        def mean_use(texts):
            rows = []
            for t in texts:
                ids = torch.tensor([tok(t)["input_ids"]])
                with torch.no_grad(), hook.recording() as rec:
                    model(ids, use_cache=False)
                hit = torch.zeros(ids.shape[1], 8)
                hit.scatter_(1, rec.indices[l][0], 1.0)
                rows.append(hit.mean(0))
            return torch.stack(rows).mean(0).double()
        torch.testing.assert_close(fit.deltas[l], mean_use(task) - mean_use(gen), atol=1e-6, rtol=0)
    hook.release()
    fit2 = fit_steering(model, tok, task, gen, tau=0.2)
    assert fit2.layers == [2] and fit2.layer_range == pytest.approx([1 / 3, 2 / 3])
    assert fit2.experts[2] == torch.nonzero(fit2.deltas[2] > 0.2).flatten().tolist()
    assert not hasattr(model, "_retrofit_gate_hook")


def test_steer_logits_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    mask = torch.tensor([True, False, True, False])
    std = z.std(-1, correction=0)
    soft = steer_logits(z, mask, "soft", lam=0.5)
    exp = z.clone()
    exp[:, 0] += 0.5 * std
    exp[:, 2] += 0.5 * std
    torch.testing.assert_close(soft, exp)
    hard = steer_logits(z, mask, "hard", eps=0.1)
    torch.testing.assert_close(hard, torch.tensor([[6.1, 2.0, 6.1, 6.0], [4.1, 0.0, 4.1, 4.0]]))
    assert torch.equal(steer_logits(z, mask, "soft", lam=0.0), z)
    zb = z.to(torch.bfloat16)
    assert steer_logits(zb, mask, "soft").dtype == torch.bfloat16


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_attach_offsets_match_hand_computed_gate_logits(family):
    model = tiny_model(family)
    ids = _ids()
    hook = GateHook.install(model)
    layer = hook.layers[len(hook.layers) // 2]
    E = hook.num_experts()
    with torch.no_grad(), hook.recording() as rec:
        base = model(ids).logits
    z0 = rec.logits[layer][0]
    experts = [1, E - 2]
    for mode in ("soft", "hard"):
        h = retrofit.attach(model, "steer", experts={layer: experts}, mode=mode, lam=0.5, eps=0.01)
        # the steered layer's inputs are unchanged (earlier layers untouched), so its logits are z0 steered
        with torch.no_grad(), hook.recording() as rec2:
            out = model(ids).logits
        z1 = rec2.logits[layer][0]
        mask = torch.zeros(E, dtype=torch.bool)
        mask[experts] = True
        if mode == "soft":
            exp = z0.float() + 0.5 * z0.float().std(-1, keepdim=True, correction=0) * mask
        else:
            exp = torch.where(mask, z0.float().max(-1, keepdim=True).values + 0.01, z0.float())
        torch.testing.assert_close(z1.float(), exp, atol=1e-5, rtol=1e-5)
        if mode == "hard":  # the task experts are always selected (for grouped routing: when their group is)
            sel = rec2.indices[layer][0]
            if hook.scoring != "sigmoid_grouped":
                assert (sel.sort(-1).values == torch.tensor(sorted(experts))).all()
        assert not torch.equal(out, base)
        for l in hook.layers:
            if l < layer:
                assert torch.equal(rec2.logits[l][0], rec.logits[l][0])
        assert h.stats()["token_rows"] > 0
        h.detach()
    hook.release()
    assert not hasattr(model, "_retrofit_gate_hook")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lambda0_identity_and_detach_exact(family):
    model = tiny_model(family)
    ids = _ids()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base = model(ids).logits
    layers = GateHook.install(model).layers
    model._retrofit_gate_hook.release()
    h = retrofit.attach(model, "steer", experts={l: [0, 3] for l in layers}, lam=0.0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    h.detach()
    h = retrofit.attach(model, "steer", experts={l: [0, 3] for l in layers}, lam=2.0)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base)
    h.detach()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    assert all(torch.equal(p, ref[n]) for n, p in model.named_parameters())
    assert not any("forward" in g.__dict__ for g in retrofit.arch.get_adapter(model).moe_gates(model).values())


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2_moe")
    tok = _Tok()
    fit = fit_steering(model, tok, ["a b c d e", "f g h"], ["zzzz yyyy", "q"], tau=0.0, layers=[1, 2])
    h = attach_fit(model, fit, mode="hard", eps=0.05)
    ids = _ids()
    with torch.no_grad():
        out1 = model(ids).logits
    h.save(tmp_path / "steer")
    h.detach()
    meta = json.loads((tmp_path / "steer" / "retrofit.json").read_text())
    assert meta["method"] == "steer" and meta["config"]["mode"] == "hard" and meta["config"]["tau"] == 0.0
    assert "base_model" in meta and meta["extra"]["layers"] == [1, 2]
    h2 = retrofit.attach(model, "steer", routers=tmp_path / "steer")
    assert {l: m.tolist() for l, m in h2.masks.items()} == {l: m.tolist() for l, m in fit.masks.items()}
    torch.testing.assert_close(h2.deltas[1], fit.deltas[1].float())
    assert h2.config.mode == "hard" and h2.config.eps == 0.05
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out1)
    h2.detach()
    h3 = retrofit.load(model, tmp_path / "steer", mode="soft")  # override the saved mode
    assert h3.config.mode == "soft"
    h3.detach()
    with pytest.raises(ArtifactError):
        retrofit.attach(tiny_model("qwen2_moe", seed=5), "steer", routers=tmp_path / "steer")


def test_load_texts(tmp_path):
    import pathlib

    data = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    (tmp_path / "a.tsv").write_text("What is 2+2?\t4\nAnd 3+3?\t6\n")
    assert load_texts(tmp_path / "a.tsv") == ["What is 2+2?", "And 3+3?"]
    (tmp_path / "f.tsv").write_text("index_id\tcategory\ttext\n1\tx\tHello there.\n")
    assert load_texts(tmp_path / "f.tsv") == ["Hello there."]
    (tmp_path / "x.jsonl").write_text(json.dumps({"premise": "P.", "choice1": "A.", "choice2": "B.", "label": 1})
                                      + "\n")
    assert load_texts(tmp_path / "x.jsonl") == ["P. B."]
    if (data / "mgsm").is_dir():
        assert len(load_texts(data / "mgsm" / "mgsm_en.tsv", limit=5)) == 5
        assert len(load_texts(data / "flores_sib200" / "eng_Latn" / "dev.tsv")) == 99


def test_cli_fit(tmp_path):
    """`retrofit steer fit` on a tiny MoE saved with SmolLM2's tokenizer (skipped without the default model)."""
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from retrofit.methods.steer.cli import register
    from retrofit.models import cache_dir

    src = cache_dir() / "smollm2-135m-instruct"
    if not (src / "tokenizer.json").is_file():
        pytest.skip("the default model's tokenizer is not converted here")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = tiny_model("mixtral", vocab_size=len(tok), num_hidden_layers=6)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "task.txt").write_text("two plus two is four\nhow many apples are left\n")
    (tmp_path / "gen.tsv").write_text("index_id\tcategory\ttext\n1\tx\tThe weather is nice.\n2\ty\tHe went home.\n")
    app = typer.Typer()

    @app.callback()
    def _root():
        pass

    register(app)
    res = CliRunner().invoke(app, ["steer", "fit", "--task-data", str(tmp_path / "task.txt"), "--general-data",
                                   str(tmp_path / "gen.tsv"), "--out", str(tmp_path / "art"), "--model",
                                   str(tmp_path / "m"), "--tau", "0.0", "--mode", "hard"])
    assert res.exit_code == 0, res.output
    assert "layers [2, 3]" in res.output
    h = retrofit.attach(model, "steer", routers=tmp_path / "art")
    assert h.config.mode == "hard" and sorted(h.masks) == [2, 3]
    h.detach()
