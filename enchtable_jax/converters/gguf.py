"""GGUF files -> HF folders, through transformers' GGUF reader (dequantized to float).

Real small models reach this project as GGUF files inside pip packages (no hub at run time); this
turns one into an ordinary HF folder (config, tokenizer with chat template, safetensors) that every
other stage reads. Needs the optional `transformers`, `gguf` and `torch` packages.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from enchtable_jax.converters.hf import write_hf
from enchtable_jax.converters.torch_bin import tensor_to_numpy
from enchtable_jax.models.config import ModelConfig


def gguf_to_hf(gguf_file: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Dequantize `gguf_file` into an HF folder at `out` (atomic); returns the folder's path."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError("converting GGUF needs: pip install 'enchtable-jax[gguf]'") from e
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: GGUF file not found")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    raw = model.config.to_dict()
    raw.pop("quantization_config", None)  # the weights written are plain floats
    raw["architectures"] = [type(model).__name__]
    raw["dtype"] = dtype
    config = ModelConfig.from_hf(raw, source=f"{gguf_file} (GGUF metadata)")
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    params = {name: tensor_to_numpy(t) for name, t in state.items()}
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        model.generation_config.save_pretrained(tok_dir)
        return write_hf(out, config, params, like=tok_dir, overwrite=overwrite)
