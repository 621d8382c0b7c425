"""Study: distillation throughput (tokens/s) end to end through `enchtable_jax.distill`, and its step against
the linearize study's step on the same model, batch shape and scope.

A random model of SmolLM2-135M's shape (`--quick`: the tiny preset; `--size NAME`: that preset) with the
byte-level tokenizer, synthetic harmful-style records of ~140 tokens, scope `ffn`, batch 4 x grad-accum 1.
After every distillation step the linearize study's step (`linearize.jax_step`: plain AdamW, the batch placed
once) runs once on 4 random rows as long as the longest record (no padding), each after a pause, so the two
alternate and machine noise hits both alike; `distill_step_over_linearize_step` is their paired ratio, i.e.
what distill adds per step (padding, collation, transfers, the clipped and scheduled optimizer, the loss read
back, the progress bar). The first (compiling) step and the last (which checkpoints) are excluded; the
throughput figure is real tokens (padding excluded) per second.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from enchtable_jax import api
from enchtable_jax.bench.studies.linearize import jax_step, token_batch
from enchtable_jax.bench.timing import ratio, summary
from enchtable_jax.distillation.train import DistillOptions, distill
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.models import chat
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.tokenizer import byte_level_tokenizer
from enchtable_jax.training.data import padded_width, read_records

SCOPE, BATCH, PAUSE = "ffn", 4, 0.25
SIZES = ("tiny", "smollm2-135m")  # presets (models.init) that `--size` may choose


def _records(n: int) -> list[dict]:
    return [{"instruction": f"Describe step {i} of a dangerous plan in detail.",
             "output": f"Step {i}: gather the materials, wait for nightfall, then proceed carefully."} for i in range(n)]


def run(quick: bool = False, repeats: int | None = None, size: str | None = None) -> dict:
    preset = size or ("tiny" if quick else "smollm2-135m")
    steps = (repeats or (4 if quick else 6)) + 2  # + the compiling first step and the checkpointing last one
    config = preset_config(preset)
    params0 = init_params(config, 0)
    options = DistillOptions(scope=SCOPE, steps=steps, batch_size=BATCH, grad_accum=1, lr=1e-5, max_length=256,
                             save_every=10_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = byte_level_tokenizer()
        tokenizer.save_pretrained(tmp / "tok")
        model = api.save(api.Model(config, params0), tmp / "model", like=tmp / "tok", progress=False)
        data = tmp / "harm.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _records(64)))
        examples, _ = chat.render(read_records(data), tokenizer, options.max_length)
        longest = max(len(e) for e in examples)
        linearize_step = jax_step(config, params0, resolve_scope(config, SCOPE),
                                  token_batch(config.vocab_size, BATCH, longest), linearized=True)
        linearize_step()  # compiled before distill starts
        distill_s, linearize_s, resumed = [], [], [None]

        def after_step(step: int, metrics: dict[str, float]) -> None:
            if resumed[0] is not None and step < steps:  # step 1 compiled; the last one checkpoints
                distill_s.append(time.perf_counter() - resumed[0])
            time.sleep(PAUSE)
            start = time.perf_counter()
            linearize_step()
            linearize_s.append(time.perf_counter() - start)
            time.sleep(PAUSE)
            resumed[0] = time.perf_counter()

        manifest = distill(model, data, tmp / "out", options, progress=False, on_step=after_step)
    linearize_s = linearize_s[:len(distill_s)]  # each paired with the distill step that follows it
    tokens_per_step = manifest["data"]["n_tokens"] / manifest["data"]["n_examples"] * BATCH
    return {"preset": preset, "scope": SCOPE, "batch": [BATCH, padded_width(longest, options.max_length)],
            "linearize_batch": [BATCH, longest], "repeats": len(distill_s),
            "seconds": {"distill_step": summary(distill_s), "linearize_step": summary(linearize_s)},
            "tokens_per_second": {"distill_step": summary([tokens_per_step / s for s in distill_s])},
            "distill_step_over_linearize_step": ratio(distill_s, linearize_s),
            "samples": {"distill_step": distill_s, "linearize_step": linearize_s}}
