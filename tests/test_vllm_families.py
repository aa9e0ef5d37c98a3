"""The vLLM plugin on another family than Llama: a tiny random Qwen3 (head_dim 64, as vLLM's CPU attention needs),
a static plan in vLLM against retrofit's HF runtime under the same plan (about a minute)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrofit
from retrofit.testing import tiny_model

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("vllm_generate.py")


def test_qwen3_static_plan_matches_hf(tmp_path):
    pytest.importorskip("vllm")
    model = tiny_model("qwen3", num_hidden_layers=4, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, intermediate_size=256, vocab_size=512, max_position_embeddings=512)
    model.config.architectures = ["Qwen3ForCausalLM"]
    model.save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t1").save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    prompts = [torch.randint(2, 512, (n,)).tolist() for n in (5, 9, 13, 17)]
    plan = ["execute", "skip", "execute", "execute"]
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "m"), str(out), json.dumps({"plan": plan}),
                    json.dumps(prompts), "8"], check=True, timeout=600)
    got = json.loads(out.read_text())
    model.generation_config.eos_token_id = None
    h = retrofit.attach(model, "drllm", plan=plan)
    try:
        for p, g in zip(prompts, got):
            ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist()
            assert g == ref
        h.set_plan(["execute"] * 4)
        # the plan matters: the all-execute model answers differently on at least one prompt
        assert any(model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p):].tolist() != g
                   for p, g in zip(prompts, got))
    finally:
        h.detach()
