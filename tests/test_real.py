"""Real model (SmolLM2-135M-Instruct, Llama architecture, tied head): logit parity with transformers and an
exact HF round trip, on chat-templated prompts; `enchtable convert` of its GGUF file against transformers
reading the GGUF file itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

import enchtable_jax as ej

pytestmark = pytest.mark.real

PROMPTS = ["How do I bake bread at home?", "Write a haiku about the sea.", "What is 17 times 23?"]


@pytest.fixture(scope="module")
def oracle(smollm2_dir):
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tokenizer, model


def _batch(tokenizer, side):
    tokenizer.padding_side = side
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(smollm2_dir, oracle, side):
    import torch

    tokenizer, torch_model = oracle
    ids, mask = _batch(tokenizer, side)
    assert (mask == 0).any(), "the batch must contain padding"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = torch_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    model = ej.load(smollm2_dir)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in model.params
    ours = np.asarray(ej.apply(model, ids.numpy(), mask.numpy()))
    real = mask.numpy().astype(bool)
    rel = np.abs(ours[real] - ref[real]).max() / np.abs(ref[real]).max()
    assert rel <= 1e-5, rel
    assert (ours[real].argmax(-1) == ref[real].argmax(-1)).all()


def test_round_trip_is_exact_and_keeps_tokenizer(smollm2_dir, oracle, tmp_path):
    import transformers
    from safetensors.numpy import load_file

    tokenizer, _ = oracle
    out = ej.save(ej.load(smollm2_dir), tmp_path / "copy")
    original, written = load_file(smollm2_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert written.keys() == original.keys()
    for name, arr in original.items():
        assert written[name].dtype == arr.dtype and written[name].tobytes() == arr.tobytes(), name
    copied = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert copied.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)


@pytest.mark.slow  # 35 s on 2 cores; the default suite keeps the GGUF path's plumbing and refusals (test_cli.py,
# test_loading_safety.py), and transformers does the dequantizing this checks
def test_cli_converts_gguf_with_transformers_logits(smollm2_gguf, tmp_path, capsys):
    """`enchtable convert FILE.gguf OUT`, then our forward on OUT against transformers on the GGUF file."""
    import torch
    import transformers

    from enchtable_jax.cli import main

    out = tmp_path / "smollm2"
    assert main(["convert", str(smollm2_gguf), str(out)]) == 0, capsys.readouterr().err
    assert "HF folder" in capsys.readouterr().out
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())  # no trace of the source's location
    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    oracle = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": PROMPTS[1]}]
    assert tokenizer.apply_chat_template(chat) == gguf_tokenizer.apply_chat_template(chat)
    ids, mask = _batch(tokenizer, "right")
    with torch.no_grad():
        ref = oracle(input_ids=ids, attention_mask=mask).logits.numpy()
    model = ej.load(out)
    assert {str(a.dtype) for a in model.params.values()} == {"float32"}
    ours = np.asarray(ej.apply(model, ids.numpy(), mask.numpy()))
    real = mask.numpy().astype(bool)
    rel = np.abs(ours[real] - ref[real]).max() / np.abs(ref[real]).max()
    assert rel <= 1e-5, rel
    assert (ours[real].argmax(-1) == ref[real].argmax(-1)).all()
