"""The expert + gate distillation of the MoE testbed (retrofit.moe.distill, issue 17) on a tiny random Llama
converted in the test: it lowers the KL to the dense model, a killed run resumes to the same weights, the frozen
parts stay bit-identical, bad settings are refused, and the distillation text never reads held-out data."""

import copy

import pytest
import torch

from retrofit.moe import distill as D
from retrofit.moe.distill import DistillConfig, distill_moe, mean_kl, trainable_names
from retrofit.moe.moefy import SHAKESPEARE_HELDOUT_START, MoefyConfig, moefy_model
from retrofit.testing import tiny_model


def _ids(B, T, seed):
    return torch.randint(3, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    # initializer_range 0.1: outputs far enough from uniform for a KL worth reducing
    dense = tiny_model("llama", tie_word_embeddings=True, initializer_range=0.1).requires_grad_(False)
    moe, _ = moefy_model(dense, _ids(8, 32, 2), MoefyConfig(experts=4, top_k=1, shared=32, steps=30),
                         progress=False)
    return dense, moe


def _cfg(**kw):
    base = dict(steps=6, batch=4, seq_len=32, lr=3e-3, warmup=1, val_seqs=4, checkpoint_every=2, pool=16)
    return DistillConfig(**{**base, **kw})


def test_distillation_reduces_kl_and_keeps_frozen_parts(pair):
    dense, moe0 = pair
    moe = copy.deepcopy(moe0)
    train, val = _ids(1024, 32, 5), _ids(8, 32, 6)
    dense_before = {n: p.clone() for n, p in dense.named_parameters()}
    before = {n: p.clone() for n, p in moe.named_parameters()}
    names = set(trainable_names(moe))
    assert names and all(".mlp." in n for n in names)
    assert any(n.endswith("mlp.gate.weight") for n in names) and any("experts" in n for n in names)
    kl0 = mean_kl(moe, dense, val)
    rep = distill_moe(moe, dense, train, val, _cfg(steps=200, batch=8, lr=1e-3), progress=False)
    kl1 = mean_kl(moe, dense, val)
    assert kl0 > 0.05
    assert rep["val_kl_before"] == pytest.approx(kl0, rel=1e-4) and rep["val_kl_after"] == pytest.approx(kl1, rel=1e-4)
    assert kl1 < 0.8 * kl0, (kl0, kl1)  # held-out sequences: the MoE moved toward the dense model
    assert rep["train_kl_last10"] < rep["train_kl_first"]
    for n, p in moe.named_parameters():
        if n in names:
            continue
        assert torch.equal(p, before[n]), f"frozen {n} changed"  # attention, embeddings, norms, head
    assert any(not torch.equal(p, before[n]) for n, p in moe.named_parameters() if n in names)
    assert all(torch.equal(p, dense_before[n]) for n, p in dense.named_parameters())  # teacher untouched
    assert not any(p.requires_grad for p in moe.parameters())  # left frozen again
    # without train_gates the router gates stay as fitted
    moe2 = copy.deepcopy(moe0)
    distill_moe(moe2, dense, train, val, _cfg(steps=3, train_gates=False), progress=False)
    for n, p in moe2.named_parameters():
        if n.endswith("mlp.gate.weight"):
            assert torch.equal(p, dict(moe0.named_parameters())[n])


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(pair, tmp_path):
    dense, moe0 = pair
    train, val = _ids(16, 32, 7), _ids(4, 32, 8)
    cfg = _cfg(steps=7, checkpoint_every=2)

    full = copy.deepcopy(moe0)
    distill_moe(full, dense, train, val, cfg, ckpt_dir=tmp_path / "a", progress=False)

    def kill(step, loss):
        if step == 4:  # 5 steps done, last checkpoint after step 4: the 5th is lost like in a real kill
            raise Killed

    part = copy.deepcopy(moe0)
    with pytest.raises(Killed):
        distill_moe(part, dense, train, val, cfg, ckpt_dir=tmp_path / "b", callback=kill, progress=False)
    state = torch.load(tmp_path / "b" / "distill_ckpt.pt", weights_only=False)
    assert state["step"] == 4 and len(state["log"]) == 4
    assert not list((tmp_path / "b").glob("*.tmp"))  # atomic save leaves no partial file
    resumed = copy.deepcopy(moe0)  # a fresh process: the weights come from the checkpoint
    seen = []
    rep = distill_moe(resumed, dense, train, val, cfg, ckpt_dir=tmp_path / "b", progress=False,
                      callback=lambda s, l: seen.append(s))
    assert seen == [4, 5, 6]  # continued, did not restart
    assert rep["steps_done"] == 7
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    # more steps on a rerun continue from the finished checkpoint
    seen.clear()
    distill_moe(resumed, dense, train, val, _cfg(steps=9, checkpoint_every=2), ckpt_dir=tmp_path / "b",
                progress=False, callback=lambda s, l: seen.append(s))
    assert seen == [7, 8]
    # other settings are refused rather than silently mixed
    with pytest.raises(ValueError, match="other distillation settings"):
        distill_moe(copy.deepcopy(moe0), dense, train, val, _cfg(steps=7, lr=1e-3), ckpt_dir=tmp_path / "b",
                    progress=False)


def test_config_errors():
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=-1)
    with pytest.raises(ValueError, match="lr"):
        DistillConfig(lr=0)
    with pytest.raises(ValueError, match="batch"):
        DistillConfig(batch=0)
    with pytest.raises(ValueError, match="unknown distillation source"):
        DistillConfig(sources=("arc_easy_test",))
    with pytest.raises(ValueError, match="empty"):
        DistillConfig(sources=())
    with pytest.raises(ValueError, match="duplicate"):
        DistillConfig(sources=("gsm8k_train", "gsm8k_train"))
    with pytest.raises(TypeError, match="DistillConfig"):
        distill_moe(None, None, _ids(2, 8, 0), _ids(1, 8, 0), {"steps": 1})
    assert "steps" not in DistillConfig().resume_key()


def _data_or_skip():
    from retrofit.core.data import data_dir

    root = data_dir()
    if not (root / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"shared data folder {root} not found")
    return root


def test_text_sources_never_read_heldout_data():
    root = _data_or_skip()
    files = D.source_files(DistillConfig().sources)
    rel = {s: p.relative_to(root).as_posix() for s, p in files.items()}
    # the files the benchmarks score (ARC-Easy, the RoMA second tasks, steer's XCOPA / MGSM, GSM8K test, FLORES
    # dev/test) are never distillation text
    for r in rel.values():
        assert not any(r == h or r.startswith(h + "/") for h in D.HELDOUT_FILES), r
        assert not r.startswith("arc_easy") and "test" not in r.split("/")[-1]
    assert rel["gsm8k_train"] == "gsm8k/train.jsonl" and rel["flores_eng_train"].endswith("eng_Latn/train.tsv")
    # Shakespeare: only the head; the benchmarks' perplexity text (chars 1,000,000+) is never read
    head = D.distill_texts("shakespeare_head")
    assert len(head) == 1 and D.SHAKESPEARE_HEAD[1] <= SHAKESPEARE_HELDOUT_START
    full = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    assert head[0] == full[:D.SHAKESPEARE_HEAD[1]] and full[SHAKESPEARE_HELDOUT_START:][:2000] not in head[0]
    # BoolQ: passages only (no question, no answer); GSM8K: train solutions, none of the test questions
    boolq = D.distill_texts("boolq_passages")
    assert boolq and not any("\nQuestion:" in p or p.startswith("Passage:") for p in boolq)
    import json

    test_q = {json.loads(line)["question"] for line in open(root / "gsm8k" / "test.jsonl", encoding="utf-8")}
    train_docs = D.distill_texts("gsm8k_train")
    assert len(train_docs) == 7473 and not any(d.split("\n")[0] in test_q for d in train_docs)
    # the packed sequences come from those sources, interleaved
    from transformers import AutoTokenizer

    from retrofit.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    cfg = DistillConfig(pool=12, val_seqs=4, seq_len=64)
    train, val = D.distill_data(tok, cfg)
    assert train.shape == (12, 64) and val.shape == (4, 64)
    assert not any(torch.equal(v, t) for v in val for t in train)
    shakes = [tok.decode(r) for r in torch.cat([train, val])[3::4]]  # every 4th row: the Shakespeare stream
    assert all(s.strip()[:20] in head[0] for s in shakes)


def test_testbed_folders_and_atomic_save(pair, tmp_path):
    from transformers import AutoTokenizer

    from retrofit.models import default_model_dir
    from retrofit.moe import moefy as M

    assert M.testbed_dir().name == "smollm2-moe-e8k4"  # the default testbed: 8 experts, top-4
    assert M.testbed_dir(8, 2).name == "smollm2-moe-e8k2"
    assert M.testbed_dir(distilled=False).name == "smollm2-moe-e8k4-gates"
    assert M.distill_checkpoint_dir(tmp_path / "tb").name == "tb.distill-ckpt"
    _, moe = pair
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    out = tmp_path / "tb"
    M._save_atomic(moe, tok, {"config": {}}, out)
    assert M._complete(out) and M._complete(out, distilled=False) and not M._complete(out, distilled=True)
    M._save_atomic(moe, tok, {"config": {}, "distill": {"steps_done": 1}}, out)  # replaces the old build
    assert M._complete(out, distilled=True) and not M._complete(out, distilled=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]  # no .tmp / .old left behind
    with pytest.raises(TypeError, match="distill must be"):
        M.build_testbed(out=tmp_path / "x", distill="yes")


def test_cli_refuses_bad_distill_settings():
    from typer.testing import CliRunner

    from retrofit.cli import app

    r = CliRunner().invoke(app, ["moefy", "--distill-lr", "0"])
    assert r.exit_code != 0 and "lr must be > 0" in r.output
    r = CliRunner().invoke(app, ["moefy", "--distill-sources", "arc_easy_test"])
    assert r.exit_code != 0 and "unknown distillation source" in r.output


def test_opt_in_arc_train_qa_source_reads_train_questions_only():
    _data_or_skip()
    from retrofit.core.data import load_task

    assert "arc_easy_train_qa" not in DistillConfig().sources  # opt-in: the default build is unchanged
    texts = D.distill_texts("arc_easy_train_qa")
    train = load_task("arc_easy", "train")
    assert len(texts) == len(train) and texts[0] == f"{train[0].prompt} {train[0].choices[train[0].gold]}"
    assert all(t.startswith("Question: ") and "\nAnswer: " in t for t in texts)
    seen = {t.split("\nAnswer:")[0] for t in texts}
    for split in ("test", "validation"):
        assert not seen & {e.prompt for e in load_task("arc_easy", split)}, split
