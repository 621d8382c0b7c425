"""GGUF files -> HF folders, through transformers' GGUF reader (dequantized to float).

Real small models reach this project as GGUF files inside pip packages (no hub at run time); this
turns one into an ordinary HF folder (config, tokenizer with chat template, safetensors) that every
other stage reads. Needs the extra `gguf`: torch, gguf and accelerate (transformers refuses a GGUF file
without accelerate).
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

from enchtable_jax.converters.hf import DEFAULT_SHARD_SIZE, write_hf
from enchtable_jax.converters.outputs import check_output
from enchtable_jax.converters.torch_bin import tensor_to_numpy
from enchtable_jax.errors import EnchtableError, MissingExtraError
from enchtable_jax.models.config import ModelConfig

MAGIC = b"GGUF"
EXTRA = ("torch", "gguf", "accelerate")  # what transformers needs to read GGUF, beyond itself


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def require_gguf_extra() -> None:
    """Raise one MissingExtraError (an ImportError) naming the extra when any package of it is missing."""
    missing = []
    for module in EXTRA:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"converting GGUF needs {', '.join(EXTRA)} (missing: {', '.join(missing)}): "
                          "pip install 'enchtable-jax[gguf]'")


def gguf_to_hf(gguf_file: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False,
               shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Dequantize `gguf_file` into an HF folder at `out` (atomic); returns the folder's path."""
    require_gguf_extra()
    import torch
    import transformers

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: GGUF file not found")
    out = check_output(out, {"gguf_file": gguf_file}, overwrite, "out")  # before any work
    if not is_gguf_file(gguf_file):
        raise EnchtableError(f"{gguf_file}: not a GGUF file (it does not start with {MAGIC!r})")
    # transformers reads the GGUF file from a folder of its own holding only a link to it: files that happen to lie
    # beside the GGUF (a config.json or tokenizer_config.json, perhaps asking for remote code) are never read, no
    # code of the folder runs, and nothing is downloaded.
    with tempfile.TemporaryDirectory() as alone:
        name = "model.gguf"
        (Path(alone) / name).symlink_to(gguf_file.resolve())
        offline = {"gguf_file": name, "trust_remote_code": False, "local_files_only": True}
        tokenizer = transformers.AutoTokenizer.from_pretrained(alone, **offline)
        model = transformers.AutoModelForCausalLM.from_pretrained(alone, dtype=getattr(torch, dtype), **offline)
    raw = model.config.to_dict()
    raw.pop("quantization_config", None)  # the weights written are plain floats
    raw.pop("_name_or_path", None)  # where the GGUF file lay: the folder would differ by the source's location
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
        return write_hf(out, config, params, like=tok_dir, shard_size=shard_size, overwrite=overwrite)
