"""Generation against transformers' `generate` (greedy) on tiny random models; the cached forward against the
full forward; sampling determinism; a real-model check on SmolLM2-135M-Instruct.

Oracles: transformers' PyTorch `generate(do_sample=False)` with the same left-padded prompts and eos ids,
and this package's own uncached `forward` (itself checked against transformers in test_models.py).
"""

from __future__ import annotations

import importlib
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import enchtable_jax
from enchtable_jax.eval.generate import (
    batch_bucket,
    batch_members,
    eos_ids,
    generate,
    generate_ids,
    width_bucket,
)
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.transformer import forward, forward_cached, init_cache

LENGTHS = (3, 9, 14, 6, 1, 11)  # mixed prompt lengths, one width bucket (16)
NEW = 10
GENERATE = importlib.import_module("enchtable_jax.eval.generate")  # the module, not the function
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 4},  # every layer windowed, window shorter than most prompts
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},  # full then windowed layers
}


def hf_greedy(model, prompts: list[list[int]], new: int, stop: list[int] | None, pad: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt in one left-padded batch, cut after the first stop id."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, torch's 2-thread decoding is ~8x slower than 1 thread
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=0,
                                 do_sample=False, eos_token_id=stop, pad_token_id=pad)
    finally:
        torch.set_num_threads(threads)
    result = []
    for row in out[:, width:].tolist():
        ends = [k for k, t in enumerate(row) if stop and t in stop]
        result.append(row[:ends[0] + 1] if ends else row)
    return result


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(hf_model, family):
    folder, torch_model = hf_model(family, num_hidden_layers=2, **FAMILIES[family])
    torch_model.generation_config.eos_token_id = None
    model = enchtable_jax.load(folder)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 101, n).tolist() for n in LENGTHS]
    # eos ids that greedy decoding actually reaches, so stopping is exercised: tokens the oracle emits mid-way
    free = hf_greedy(torch_model, prompts, NEW, None, pad=0)
    stop = sorted({free[0][3], free[2][5]})
    expected = hf_greedy(torch_model, prompts, NEW, stop, pad=0)
    assert any(len(e) < NEW for e in expected) and any(len(e) == NEW for e in expected)
    batch_size = 4 if family == "llama" else 8  # llama: two batches (4 + 2 rows); others: one, fewer compilations
    got = generate_ids(model, prompts, max_new_tokens=NEW, stop_ids=stop, pad_id=0, batch_size=batch_size,
                       progress=False)
    assert got == expected
    # the stop ids change the answer: without them the rows run to max_new_tokens
    assert generate_ids(model, prompts, max_new_tokens=NEW, batch_size=batch_size, progress=False) == free


def test_cached_forward_matches_forward():
    """Prefill then one token at a time gives forward's logits at every real position (left padding, windows)."""
    config = preset_config("tiny", "qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1)
    params = init_params(config, seed=1, std=0.2)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 250, (3, 10))
    mask = np.ones((3, 10), np.int32)
    mask[1, :4], mask[2, :7] = 0, 0
    full = np.asarray(jax.jit(forward, static_argnums=1)(params, config, ids, mask))
    cached = jax.jit(forward_cached, static_argnames=("config", "last_only"))
    cache = init_cache(config, 3, 12, jnp.float32)
    logits, cache = cached(params, config, ids[:, :6], mask[:, :6], cache, last_only=False)
    steps = [np.asarray(logits)]
    for t in range(6, 10):
        last, cache = cached(params, config, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(np.asarray(last)[:, None])
    got = np.concatenate(steps, axis=1)
    sel = mask.astype(bool)
    np.testing.assert_allclose(got[sel], full[sel], atol=1e-5 * np.abs(full).max())
    assert int(cache.length) == 10 and (np.asarray(cache.mask)[:, :10] == mask).all()


def test_one_compilation_per_bucket(byte_model, monkeypatch):
    """Prompts of different lengths in one width bucket, and a smaller last batch, reuse compiled code."""
    model, _ = byte_model
    # the decoding loop jitted afresh around chex's trace counter: a second trace raises
    monkeypatch.setattr(GENERATE, "_decode", jax.jit(chex.assert_max_traces(GENERATE._decode.__wrapped__, n=1),
                                                     static_argnames=("config", "max_new_tokens", "sample")))
    prompts = [[65 + k] * n for k, n in enumerate((17, 20, 23, 18, 24, 19, 21, 22))]  # widths 17..24 -> bucket 24
    kwargs = {"max_new_tokens": 3, "stop_ids": [256], "batch_size": 4, "progress": False}
    generate_ids(model, prompts[:4], **kwargs)
    generate_ids(model, prompts, **kwargs)  # two batches of 4, new lengths, same buckets
    generate_ids(model, prompts[2:6], **{**kwargs, "stop_ids": [256, 10]})  # another stop set of the same width


def test_buckets():
    assert [width_bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 300, 1000)] == [16, 16, 24, 24, 32, 48, 64, 96,
                                                                                        384, 1024]
    assert [batch_bucket(n, 16) for n in (1, 3, 8, 9, 16)] == [1, 4, 8, 16, 16]
    assert batch_bucket(5, 6) == 6


def test_long_prompts_get_fewer_rows_per_batch(byte_model, monkeypatch):
    """A batch's rows shrink (to a power of two) where rows x heads x width x (width + new tokens) would pass the
    attention-score budget; every prompt is still answered once, with the answer unbatched greedy gives."""
    assert batch_members([5, 3, 9, 1], 2, 4, 8) == [[3, 1], [0, 2]]  # shortest first, batch_size rows
    budget = GENERATE.MAX_ATTENTION_SCORES
    assert batch_members([16] * 5, 8, 1, 0) == [[0, 1, 2, 3, 4]]  # 5 x 16 x 16 is far below it
    rows = budget // (2 * 1024 * (1024 + 16))  # 126 rows of width 1024 fit, heads 2, 16 new tokens
    assert [len(b) for b in batch_members([1000] * 130, 256, 2, 16)] == [64, 64, 2]
    assert rows == 126 and [len(b) for b in batch_members([1000] * 3, 256, 2 * 1024, 16)] == [1, 1, 1]
    model, _ = byte_model
    heads = model.config.num_attention_heads
    monkeypatch.setattr(GENERATE, "MAX_ATTENTION_SCORES", 3 * heads * 32 * (32 + 4))  # 2 rows of width 32
    prompts = [[65 + k] * n for k, n in enumerate((3, 30, 5, 28, 31))]
    calls = []
    decode = GENERATE._decode
    monkeypatch.setattr(GENERATE, "_decode", lambda params, config, ids, *a, **k: (calls.append(ids.shape),
                                                                                   decode(params, config, ids, *a, **k))[1])
    kwargs = {"max_new_tokens": 4, "stop_ids": [256], "progress": False}
    out = generate_ids(model, prompts, batch_size=4, **kwargs)
    assert calls == [(2, 16), (2, 32), (1, 32)]
    assert out == [generate_ids(model, [p], batch_size=1, **kwargs)[0] for p in prompts]


def test_sampling_is_seeded(byte_model):
    model, tokenizer = byte_model
    prompts = ["Tell me a story.", "Say hi to me!", "What is 2 + 2?"]  # one width bucket: fewer compilations
    kwargs = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "batch_size": 2, "progress": False}
    a = generate(model, tokenizer, prompts, seed=0, **kwargs)
    assert a == generate(model, tokenizer, prompts, seed=0, **kwargs)
    assert a != generate(model, tokenizer, prompts, seed=1, **kwargs)
    # a prompt's sample depends on its index, not on its batch companions
    assert generate(model, tokenizer, prompts, seed=0, **{**kwargs, "batch_size": 1}) == a
    # greedy is temperature 0; top_p that keeps only the top token is greedy too
    greedy = generate(model, tokenizer, prompts[:2], max_new_tokens=12, batch_size=2, progress=False)
    assert generate(model, tokenizer, prompts[:2], seed=5, **{**kwargs, "top_p": 1e-6}) == greedy
    assert greedy != a[:2]


def test_generate_renders_chat_template(byte_model):
    """The prompt tokens are the chat-templated user turn: the byte model's continuation equals generate_ids'."""
    model, tokenizer = byte_model
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new = generate_ids(model, [ids], max_new_tokens=8, stop_ids=eos_ids(model, tokenizer), progress=False)[0]
    expected = tokenizer.decode([t for t in new if t not in eos_ids(model, tokenizer)], skip_special_tokens=True)
    assert generate(model, model.source.parent / "tokenizer", ["hi"], max_new_tokens=8, progress=False) == [expected]
    assert eos_ids(model, tokenizer) == (256,)


def test_errors(byte_model):
    model, tokenizer = byte_model
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tokenizer, ["x"], top_p=0)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\]"):
        generate_ids(model, [[1], []])
    with pytest.raises(ValueError, match="neither a built-in"):
        generate(model, tokenizer, ["x"], template="no-such-template")


@pytest.mark.real
def test_smollm2_greedy_matches_transformers(smollm2_dir):
    """SmolLM2-135M-Instruct: our greedy answers to chat prompts equal transformers' token for token."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = enchtable_jax.load(smollm2_dir)
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three colours."]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False) for p in prompts]
    stop = list(eos_ids(model, tokenizer))
    start = time.perf_counter()
    got = generate_ids(model, ids, max_new_tokens=24, stop_ids=stop, pad_id=tokenizer.pad_token_id or 0,
                       progress=False)
    seconds = time.perf_counter() - start
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert got == hf_greedy(torch_model, ids, 24, stop, pad=tokenizer.pad_token_id or 0)
    texts = generate(model, tokenizer, prompts, max_new_tokens=24, progress=False)
    assert "Paris" in texts[0]
    assert seconds < 60
