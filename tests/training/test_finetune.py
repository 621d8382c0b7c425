"""Fine-tuning end to end on a tiny model: the loss falls; scope `all` moves every tensor and a narrower scope
only its own (the rest byte-identical); the folder loads in transformers with our logits; two steps equal a
float64 oracle (torch gradients, clipping and AdamW written out in numpy); a killed run resumes to the
bitwise-identical folder; bad options are refused with a clear message; the CLI's flags are the options'."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from oracles import raw_tensors

import enchtable_jax as ej
from enchtable_jax.cli import _distill_options, build_parser, main
from enchtable_jax.converters.atomic import OutputExistsError
from enchtable_jax.models.chat import render
from enchtable_jax.training.data import read_records
from enchtable_jax.kernels.scopes import ScopeError
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.identity import identity
from enchtable_jax.models.tensors import expected_shapes
from enchtable_jax.models.tokenizer import byte_level_tokenizer
from enchtable_jax.training.finetune import RECORD, checkpoint_dir

OPTIONS = dict(steps=6, lr=1e-3, batch_size=2, grad_accum=2, save_every=2, max_length=96)
TOPICS = ["sort a list", "reverse a word", "add two numbers", "count the vowels", "find the largest number"]


def _write_model(folder: Path, dtype: str = "float32", seed: int = 0) -> Path:
    config = preset_config("tiny")
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    byte_level_tokenizer().save_pretrained(tok_dir)
    return ej.save(ej.Model(config, init_params(config, seed=seed, dtype=dtype)), folder, like=tok_dir)


def _write_data(path: Path) -> Path:
    rows = [{"instruction": f"Explain how to {TOPICS[i % 5]}.", "output": f"To {TOPICS[i % 5]}, go step by step."}
            for i in range(10)]
    rows += [{"messages": [{"role": "user", "content": f"Please {t}."}, {"role": "assistant", "content": "Done."}]}
             for t in TOPICS[:2]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model = _write_model(root / "base")
    data = _write_data(root / "train.jsonl")
    out = root / "tuned"
    record = ej.finetune(model, data, out, ej.FinetuneOptions(**OPTIONS))
    return {"root": root, "model": model, "data": data, "out": out, "record": record}


def test_loss_falls_and_every_tensor_moves(world):
    record, out = world["record"], world["out"]
    losses = record["training"]["losses"]
    assert len(losses) == OPTIONS["steps"] and losses[-1] < losses[0]
    base, tuned = ej.load(world["model"]), ej.load(out)
    assert record["scope"]["tensors"] == list(expected_shapes(base.config)) == list(base.params)
    for name, value in base.params.items():  # embeddings, norms and head included
        assert tuned.params[name].dtype == value.dtype, name
        assert np.abs(np.asarray(tuned.params[name]) - np.asarray(value)).max() > 0, name


def test_output_folder_and_record(world):
    record, out = world["record"], world["out"]
    assert json.loads((out / RECORD).read_text()) == json.loads(json.dumps(record))
    assert record["format"] == "enchtable-finetune"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not checkpoint_dir(out).exists()  # removed once the folder is written
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # copied from the source
        assert (out / name).read_bytes() == (world["model"] / name).read_bytes(), name
    base = ej.load(world["model"])
    assert {k: record["base_model"][k] for k in ("model_type", "config_sha256", "weights_blake2b")} == identity(
        base.config, base.params)
    assert record["data"]["sha256"] == hashlib.sha256(world["data"].read_bytes()).hexdigest()
    assert record["data"]["n_records"] == 12 and record["data"]["n_examples"] == 12
    assert record["training"]["lr"] == OPTIONS["lr"] and record["training"]["scope"] == "all"
    assert record["training"]["final_loss"] == record["training"]["losses"][-1]
    assert set(record["versions"]) >= {"jax", "optax", "transformers"}


def test_folder_loads_in_transformers_with_our_logits(world):
    import torch
    import transformers

    out = world["out"]
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                                     dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Please sort a list."}],
                                        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = np.asarray([ids], np.int64)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ej.apply(ej.load(out), ids))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_scope_and_layers_move_only_their_tensors_in_the_stored_dtype(world, tmp_path):
    model = _write_model(tmp_path / "bf16", dtype="bfloat16")
    out = tmp_path / "out"
    options = ej.FinetuneOptions(**{**OPTIONS, "steps": 2, "lr": 1e-2, "warmup_ratio": 0.0}, scope="ffn", layers="1")
    record = ej.finetune(model, world["data"], out, options)
    moved = {n for n in expected_shapes(preset_config("tiny")) if n.startswith("model.layers.1.mlp.")}
    assert set(record["scope"]["tensors"]) == moved
    source, written = raw_tensors(model), raw_tensors(out)  # the safetensors package's view
    assert set(written) == set(source)
    for name, (dtype, shape, raw) in written.items():
        assert (dtype, shape) == source[name][:2] and dtype == "bfloat16", name
        assert (raw != source[name][2]) == (name in moved), name


def test_a_stored_copy_of_a_tied_head_follows_the_trained_embedding(world, tmp_path):
    config = preset_config("tiny", tie_word_embeddings=True)
    params = init_params(config, seed=0)
    params["lm_head.weight"] = params["model.embed_tokens.weight"]  # some tied checkpoints store the head too
    model = ej.save(ej.Model(config, params), tmp_path / "tied", like=world["model"])
    out = tmp_path / "out"
    ej.finetune(model, world["data"], out, ej.FinetuneOptions(**{**OPTIONS, "steps": 2, "warmup_ratio": 0.0}))
    written = raw_tensors(out)
    assert written["lm_head.weight"] == written["model.embed_tokens.weight"] != raw_tensors(model)["lm_head.weight"]


def _oracle_steps(model: Path, data: Path, lr: float, weight_decay: float, max_grad_norm: float,
                  steps: int) -> dict[str, np.ndarray]:
    """Δ after `steps` full-batch steps, in float64: torch gradients of the mean response-token NLL, then
    clipping by global norm and AdamW (decoupled decay on Δ, cosine schedule without warm-up) in numpy."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
    examples, _ = render(read_records(data), tokenizer, OPTIONS["max_length"])
    width = max(len(e) for e in examples)
    ids = np.full((len(examples), width), tokenizer.pad_token_id, np.int64)
    mask, targets = np.zeros_like(ids), np.zeros((len(examples), width))
    for row, e in enumerate(examples):
        ids[row, :len(e)], mask[row, :len(e)], targets[row, :len(e)] = e.input_ids, 1, e.loss_mask
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model, local_files_only=True,
                                                                     dtype=torch.float64)
    params = dict(torch_model.named_parameters())
    theta0 = {n: p.detach().numpy().copy() for n, p in params.items()}
    delta = {n: np.zeros_like(v) for n, v in theta0.items()}
    m, v = ({n: np.zeros_like(x) for n, x in theta0.items()} for _ in range(2))
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(steps):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(torch.from_numpy(theta0[n] + delta[n]))
        torch_model.zero_grad()
        logits = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        logp = torch.log_softmax(logits[:, :-1], -1)
        nll = -torch.gather(logp, -1, torch.from_numpy(ids[:, 1:, None]))[..., 0]
        weight = torch.from_numpy(targets[:, 1:])
        ((nll * weight).sum() / weight.sum()).backward()
        grads = {n: p.grad.numpy().copy() for n, p in params.items()}
        norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
        scale = min(1.0, max_grad_norm / norm)
        step_lr = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
        for n, g in grads.items():
            g = g * scale
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g ** 2
            m_hat, v_hat = m[n] / (1 - b1 ** (t + 1)), v[n] / (1 - b2 ** (t + 1))
            delta[n] = delta[n] - step_lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * delta[n])
    return delta


def test_two_steps_equal_a_float64_adamw_oracle(world, tmp_path):
    """Every step sees all 12 examples (2 micro-batches of 6), so the oracle can take full-batch steps. The decay
    is large so that its term (on Δ, i.e. towards θ0; about 5% of lr in step 2) stands above float32 noise."""
    lr, weight_decay, max_grad_norm = 1e-3, 100.0, 0.5
    options = ej.FinetuneOptions(steps=2, lr=lr, batch_size=6, grad_accum=2, warmup_ratio=0.0,
                                 weight_decay=weight_decay, max_grad_norm=max_grad_norm, max_length=96)
    out = tmp_path / "out"
    record = ej.finetune(world["model"], world["data"], out, options)
    assert record["training"]["total_steps"] == 2
    want = _oracle_steps(world["model"], world["data"], lr, weight_decay, max_grad_norm, steps=2)
    base, tuned = ej.load(world["model"]), ej.load(out)
    for name, expected in want.items():
        got = np.asarray(tuned.params[name], np.float64) - np.asarray(base.params[name], np.float64)
        # Adam's first steps are ~ lr·sign(g): float32 rounding of tiny gradients moves entries by < 1% of lr
        np.testing.assert_allclose(got, expected, atol=1e-2 * lr, err_msg=name)
        assert np.abs(expected).max() > 0.5 * lr, name  # every tensor really moved in the oracle too


_KILLED_RUN = textwrap.dedent("""
    import os, signal
    import enchtable_jax as ej
    def die(step, metrics):
        if step == 5:  # after the checkpoint of step 4, before the one of step 6
            os.kill(os.getpid(), signal.SIGKILL)
    ej.finetune({model!r}, {data!r}, {out!r}, ej.FinetuneOptions(**{options}), on_step=die, progress=False)
""")


@pytest.mark.slow  # 10 s; the loop's kill -9 resume is also checked through distill in the default suite
def test_kill_9_then_resume_is_bitwise_identical(world, tmp_path):
    out = tmp_path / "killed"
    code = _KILLED_RUN.format(options=OPTIONS, model=str(world["model"]), data=str(world["data"]), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and checkpoint_dir(out).is_dir()  # an interrupted run never looks finished
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        ej.finetune(world["model"], world["data"], out, ej.FinetuneOptions(**OPTIONS))
    with pytest.raises(ValueError, match="options differ.*lr was 0.001, now 0.002"):
        ej.finetune(world["model"], world["data"], out, ej.FinetuneOptions(**{**OPTIONS, "lr": 2e-3}), resume=True)
    record = ej.finetune(world["model"], world["data"], out, ej.FinetuneOptions(**OPTIONS), resume=True)
    assert raw_tensors(out) == raw_tensors(world["out"])
    assert record["training"]["losses"] == world["record"]["training"]["losses"]
    assert not checkpoint_dir(out).exists()


@pytest.mark.parametrize("change,fragment", [
    ({"lr": 0.0}, "option lr must be positive"),
    ({"grad_accum": 0}, "option grad_accum must be positive"),
    ({"steps": -1}, "option steps must be positive"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"compute_dtype": "int8"}, "compute_dtype must be float32, bfloat16 or float16"),
])
def test_bad_options_are_refused(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        ej.FinetuneOptions(**change)


def test_bad_requests_are_refused_before_training(world, tmp_path):
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite"):
        ej.finetune(world["model"], world["data"], world["out"], ej.FinetuneOptions(**OPTIONS))
    assert not checkpoint_dir(world["out"]).exists()  # refused before training
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ej.finetune(world["model"], world["data"], tmp_path / "new", ej.FinetuneOptions(**OPTIONS), resume=True)
    with pytest.raises(ScopeError, match="unknown scope 'everything'.*all: every tensor"):
        ej.finetune(world["model"], world["data"], tmp_path / "a", ej.FinetuneOptions(scope="everything"))
    with pytest.raises(ScopeError, match="not understood"):
        ej.finetune(world["model"], world["data"], tmp_path / "b", ej.FinetuneOptions(layers="x:y"))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even checkpoints


def test_cli_flags_are_the_options(world, tmp_path, capsys):
    required = ["--model", "m", "--data", "d", "--out", "o"]
    args = build_parser().parse_args(["finetune", *required])
    assert _distill_options(args, ej.FinetuneOptions) == ej.FinetuneOptions()
    assert _distill_options(build_parser().parse_args(["distill", *required])) == ej.DistillOptions()
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: enchtable finetune" in text and "--plain" not in text  # finetune is never linearized
    for field in dataclasses.fields(ej.FinetuneOptions):
        flag = {"seed": "--seed", "group_by_length": "--no-group-by-length"}.get(field.name,
                                                                                 "--" + field.name.replace("_", "-"))
        assert flag in text, field.name
    with pytest.raises(SystemExit) as exc:  # refused at parse time, by the range declared with the default
        main(["finetune", *required[:4], "--out", str(tmp_path / "x"), "--lr", "0"])
    assert exc.value.code == 2 and "argument --lr: must be positive, got '0'" in capsys.readouterr().err


def test_cli_fine_tunes_an_orbax_checkpoint(world, tmp_path, capsys):
    orbax = ej.save_orbax(ej.load(world["model"]), tmp_path / "orbax")  # tokenizer files travel with it
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(orbax), "--data", str(world["data"]), "--out", str(out), "--steps", "2",
                 "--lr", "1e-2", "--warmup-ratio", "0", "--scope", "attn", "--batch-size", "4", "--grad-accum", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "fine-tuned model:" in text and "2 steps" in text
    tuned, base = ej.load(out), ej.load(world["model"])
    assert (out / "tokenizer.json").is_file() and (out / RECORD).is_file()
    changed = {n for n in base.params if not np.array_equal(np.asarray(tuned.params[n]), np.asarray(base.params[n]))}
    assert changed == {n for n in base.params if ".self_attn." in n}
