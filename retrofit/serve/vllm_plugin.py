"""vLLM general plugin (entry point ``vllm.general_plugins: retrofit = retrofit.serve.vllm_plugin:register``).

vLLM calls :func:`register` in every process it starts. It registers retrofit's model classes by name, lazily
(``module:Class`` strings, so nothing heavy is imported until a retrofit model is really built). A server picks
them with ``hf_overrides={"architectures": ["RetrofitLlamaForCausalLM"], "retrofit": {...}}``; see docs/serve.md.
"""

from __future__ import annotations

ARCHITECTURES = {f"Retrofit{a}": f"retrofit.serve.vllm_model:Retrofit{a}"
                 for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
