"""Integration checks on the real default model, SmolLM2-135M-Instruct (30 layers)."""

import pytest
import torch

import retrofit
from retrofit.artifacts import fingerprint

pytestmark = pytest.mark.slow


def test_smollm2_identity_skip_plan_and_cache(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and type(model).__name__ == "LlamaForCausalLM"
    fp = fingerprint(model)
    enc = tok(["Question: What do plants need to make food?\nAnswer:", "The capital of France is"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**enc).logits
        h = retrofit.attach(model, "drllm")
        assert torch.equal(model(**enc).logits, base)
        plan = ["execute"] * 30
        for i in (20, 21, 22, 23, 24):
            plan[i] = "skip"
        h.set_plan(plan)
        skipped = model(**enc).logits
        assert not torch.equal(skipped, base)
        # Skipping 5 upper-middle layers keeps the model sensible: the same top-1 next token on many positions.
        real = enc.attention_mask.bool()
        agree = (skipped.argmax(-1) == base.argmax(-1))[real].float().mean().item()
        # measured 0.39 = 7 of the 18 real positions; > 0.3 (at least 6 of 18) leaves one position to float noise
        assert agree > 0.3
        # the skip plan's logits are those of running the other 25 blocks by hand, with the model's own masks
        from retrofit.arch import get_adapter

        a = get_adapter(model)
        hid, kw = a.prepare(model, enc.input_ids, enc.attention_mask)
        for i, layer in enumerate(a.layers(model)):
            if plan[i] == "execute":
                hid = a.call_layer(layer, hid, kw)
        torch.testing.assert_close(skipped[real], a.head(model, hid)[real], rtol=1e-4, atol=1e-4)
        model.generation_config.eos_token_id = None
        h.reset_stats()
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        assert h.stats()["sequences"] == 2 and h.stats()["mean_layers_executed"] == 25.0
        ids, mask = enc.input_ids, enc.attention_mask
        for _ in range(8):  # step-by-step recomputation without a cache
            nxt = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        assert torch.equal(gen, ids)
        h.detach()
        assert torch.equal(model(**enc).logits, base)
    assert fingerprint(model) == fp
