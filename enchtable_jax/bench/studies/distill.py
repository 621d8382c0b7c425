"""Study: distillation throughput (tokens/s) end to end through `enchtable_jax.distill`.

A random model of SmolLM2-135M's shape (`--quick`: the tiny preset) with the byte-level tokenizer,
synthetic harmful-style records of ~100 tokens, scope `ffn`, batch 4 x grad-accum 1. Compilation
(the first step) is excluded; the figure is real tokens (padding excluded) per second.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from enchtable_jax import api
from enchtable_jax.bench.timing import summary
from enchtable_jax.distillation.train import DistillOptions, distill
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.tokenizer import byte_level_tokenizer


def _records(n: int) -> list[dict]:
    return [{"instruction": f"Describe step {i} of a dangerous plan in detail.",
             "output": f"Step {i}: gather the materials, wait for nightfall, then proceed carefully."} for i in range(n)]


def run(quick: bool = False, repeats: int | None = None) -> dict:
    preset = "tiny" if quick else "smollm2-135m"
    steps = (repeats or (4 if quick else 6)) + 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        byte_level_tokenizer().save_pretrained(tmp / "tok")
        config = preset_config(preset)
        model = api.save(api.Model(config, init_params(config, 0)), tmp / "model", like=tmp / "tok", progress=False)
        data = tmp / "harm.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _records(64)))
        stamps: list[float] = []
        options = DistillOptions(scope="ffn", steps=steps, batch_size=4, grad_accum=1, lr=1e-5, max_length=256,
                                 save_every=10_000)
        manifest = distill(model, data, tmp / "out", options, progress=False,
                           on_step=lambda step, metrics: stamps.append(time.perf_counter()))
    tokens_per_step = manifest["data"]["n_tokens"] / manifest["data"]["n_examples"] * options.batch_size
    seconds = list(np.diff(stamps))  # step 1 (compilation) excluded
    return {"preset": preset, "scope": "ffn", "batch": [options.batch_size, options.max_length],
            "repeats": len(seconds), "seconds": {"distill_step": summary(seconds)},
            "tokens_per_second": {"distill_step": summary([tokens_per_step / s for s in seconds])}}
