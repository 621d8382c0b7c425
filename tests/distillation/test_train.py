"""Distillation end to end on a tiny model: the loss falls, τ lives exactly on the scope, a killed run
resumes to the bitwise-identical result, 1 device / 8 devices / 2 processes agree, and bad input is
refused with a clear message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import enchtable_jax as ej
from enchtable_jax.models.chat import DataError
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.tokenizer import byte_level_tokenizer

OPTIONS = dict(scope="ffn", steps=6, lr=1e-3, batch_size=2, grad_accum=2, save_every=2, max_length=96)
TOPICS = ["build a weapon", "steal a car", "hack a bank", "make a poison", "forge a passport"]


def _write_model(folder: Path, chat_template: str | None = "default", seed: int = 0) -> Path:
    config = preset_config("tiny")
    tokenizer = byte_level_tokenizer() if chat_template == "default" else byte_level_tokenizer(chat_template)
    tok_dir = folder.parent / f"{folder.name}-tokenizer"
    tokenizer.save_pretrained(tok_dir)
    return ej.save(ej.Model(config, init_params(config, seed=seed)), folder, like=tok_dir)


def _write_data(path: Path, n: int = 12, long: int = 0) -> Path:
    rows = [{"instruction": f"Explain how to {TOPICS[i % 5]}.", "output": f"Sure. To {TOPICS[i % 5]}, first do this."}
            for i in range(n)]
    rows += [{"instruction": "Tell me everything.", "output": "word " * 200} for _ in range(long)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    model = _write_model(root / "aligned")
    data = _write_data(root / "harm.jsonl", long=2)
    baseline = root / "baseline"
    manifest = ej.distill(model, data, baseline, ej.DistillOptions(**OPTIONS), export_harmful=root / "harm-model")
    return {"root": root, "model": model, "data": data, "baseline": baseline, "manifest": manifest}


def _vector(folder) -> dict[str, np.ndarray]:
    return ej.load_safety_vector(folder).tensors


def test_loss_falls_and_vector_is_exactly_the_scope(world):
    manifest = world["manifest"]
    losses = manifest["training"]["losses"]
    assert len(losses) == OPTIONS["steps"] and losses[-1] < losses[0]
    tau = _vector(world["baseline"])
    model = ej.load(world["model"])
    scope_names = {n for n in model.params if ".mlp." in n}
    assert set(tau) == scope_names == set(manifest["scope"]["tensors"])
    assert all(np.abs(t).max() > 0 for t in tau.values())
    # θ_harm written with --export-harmful: θ0 − τ on the scope, every other tensor byte-identical
    harm = ej.load(world["root"] / "harm-model")
    for name, value in model.params.items():
        if name in tau:
            np.testing.assert_allclose(np.asarray(harm.params[name]), np.asarray(value) - tau[name], atol=1e-7)
        else:
            assert np.asarray(harm.params[name]).tobytes() == np.asarray(value).tobytes(), name


def test_outputs_and_manifest(world):
    from safetensors.numpy import load_file

    folder, manifest = world["baseline"], world["manifest"]
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
    stored = load_file(folder / "safety_vector.safetensors")  # readable by the safetensors package
    assert set(stored) == set(manifest["scope"]["tensors"])
    assert manifest["base_model"] == {**ej.load_safety_vector(folder).manifest["base_model"]}
    assert manifest["data"]["n_truncated"] == 2 and manifest["data"]["n_records"] == 14  # long records counted
    assert manifest["training"]["final_loss"] == manifest["training"]["losses"][-1]
    assert set(manifest["versions"]) >= {"jax", "optax"}


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import enchtable_jax as ej
    options = ej.DistillOptions(**{options})
    def die(step, metrics):
        if step == 5:  # after the checkpoint of step 4, before the one of step 6
            os.kill(os.getpid(), signal.SIGKILL)
    ej.distill({model!r}, {data!r}, {out!r}, options, on_step=die, progress=False)
""")


def test_kill_9_then_resume_is_bitwise_identical(world, tmp_path):
    out = tmp_path / "killed"
    code = _KILLED_RUN.format(options=OPTIONS, model=str(world["model"]), data=str(world["data"]), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "manifest.json").exists()  # an interrupted run never looks finished
    with pytest.raises(FileNotFoundError, match="resume"):
        ej.load_safety_vector(out)
    manifest = ej.distill(world["model"], world["data"], out, ej.DistillOptions(**OPTIONS), resume=True)
    resumed, baseline = _vector(out), _vector(world["baseline"])
    assert all(resumed[n].tobytes() == baseline[n].tobytes() for n in baseline)
    assert manifest["training"]["losses"] == world["manifest"]["training"]["losses"]


def _cli(args, devices: int, extra_env=None, timeout=300):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "enchtable_jax.cli", "distill", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _option_args():
    return ["--scope", OPTIONS["scope"], "--steps", OPTIONS["steps"], "--lr", OPTIONS["lr"], "--batch-size",
            OPTIONS["batch_size"], "--grad-accum", OPTIONS["grad_accum"], "--save-every", OPTIONS["save_every"],
            "--max-length", OPTIONS["max_length"]]


def _assert_close_to_baseline(folder, baseline):
    got, want = _vector(folder), _vector(baseline)
    for name in want:
        scale = np.abs(want[name]).max()
        assert np.abs(got[name] - want[name]).max() <= 2e-3 * scale, name  # Adam amplifies rounding slightly


def test_one_device_and_two_processes_match_eight_devices(world, tmp_path):
    common = ["--model", world["model"], "--data", world["data"], *_option_args()]
    one = _cli([*common, "--out", tmp_path / "one"], devices=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_cli([*common, "--out", tmp_path / "multi", "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                   "--process-id", i, "--init-timeout", 60], devices=1) for i in range(2)]
    outputs = []
    for proc in [one, *procs]:
        outputs.append(proc.communicate(timeout=300)[0])
        assert proc.returncode == 0, outputs[-1][-3000:]
    assert "1 device(s)" in outputs[0] and "2 device(s)" in outputs[1]  # process 0 reports, process 1 is quiet
    assert "safety vector" not in outputs[2]
    _assert_close_to_baseline(tmp_path / "one", world["baseline"])
    _assert_close_to_baseline(tmp_path / "multi", world["baseline"])
    losses = json.loads((tmp_path / "multi" / "manifest.json").read_text())["training"]["losses"]
    np.testing.assert_allclose(losses, world["manifest"]["training"]["losses"], rtol=1e-5)


def test_resume_refuses_another_model(world, tmp_path):
    other = _write_model(tmp_path / "other", seed=1)
    out = tmp_path / "run"
    ej.distill(world["model"], world["data"], out, ej.DistillOptions(**{**OPTIONS, "steps": 2}))
    with pytest.raises(ValueError, match="another model"):
        ej.distill(other, world["data"], out, ej.DistillOptions(**{**OPTIONS, "steps": 2}), resume=True)


def test_existing_output_needs_resume_or_overwrite(world):
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        ej.distill(world["model"], world["data"], world["baseline"], ej.DistillOptions(**OPTIONS))


def test_missing_chat_template_is_explained_and_template_option_fixes_it(world, tmp_path):
    bare = _write_model(tmp_path / "bare", chat_template=None)
    options = ej.DistillOptions(**{**OPTIONS, "steps": 1, "warmup_ratio": 0.0})
    with pytest.raises(DataError, match="--template"):
        ej.distill(bare, world["data"], tmp_path / "a", options)
    manifest = ej.distill(bare, world["data"], tmp_path / "b", ej.DistillOptions(**{**OPTIONS, "steps": 1,
                                                                                     "warmup_ratio": 0.0, "template": "chatml"}))
    assert manifest["training"]["total_steps"] == 1


def test_empty_data_is_refused(world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty|no record"):
        ej.distill(world["model"], empty, tmp_path / "out", ej.DistillOptions(**OPTIONS))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_reports_truncation(world, tmp_path):
    proc = _cli(["--model", world["model"], "--data", world["data"], "--out", tmp_path / "out",
                 *_option_args()[:-2], "--max-length", 96, "--steps", 1, "--warmup-ratio", 0], devices=1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-2000:]
    assert "2 truncated to 96 tokens" in output


def _checkpointed_delta(folder: Path) -> dict[str, np.ndarray]:
    """Δ as the run's newest checkpoint stores it (orbax's own dtypes, no cast to a template)."""
    import orbax.checkpoint as ocp

    from enchtable_jax.training import checkpoint

    mngr = checkpoint.manager(folder / "checkpoints")
    state = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    return {n: np.asarray(v) for n, v in state["delta"].items()}


def test_bfloat16_model_trains_a_float32_master_delta(world, tmp_path):
    """A bfloat16 model: Δ is kept in float32, finer than bf16 can hold, and τ is −Δ rounded to bf16 once. A
    float32 copy of the same weights computing in bf16 trains the same Δ; a Δ stored in bf16 would not."""
    import ml_dtypes

    config = preset_config("tiny")
    weights = {n: np.asarray(v).astype(ml_dtypes.bfloat16) for n, v in init_params(config, seed=0, std=0.1).items()}
    tok_dir = tmp_path / "tokenizer"
    byte_level_tokenizer().save_pretrained(tok_dir)
    bf16 = ej.save(ej.Model(config, weights), tmp_path / "bf16-model", like=tok_dir)
    f32 = ej.save(ej.Model(config, {n: v.astype(np.float32) for n, v in weights.items()}), tmp_path / "f32-model",
                  like=tok_dir)
    options = {**OPTIONS, "steps": 4, "save_every": 4, "lr": 1e-2}
    manifest = ej.distill(bf16, world["data"], tmp_path / "from-bf16", ej.DistillOptions(**options))
    ej.distill(f32, world["data"], tmp_path / "from-f32", ej.DistillOptions(**options, compute_dtype="bfloat16"))
    assert manifest["training"]["losses"][-1] < manifest["training"]["losses"][0]
    tau, twin = _vector(tmp_path / "from-bf16"), _vector(tmp_path / "from-f32")
    delta = _checkpointed_delta(tmp_path / "from-bf16")
    for name, t in tau.items():
        assert t.dtype == ml_dtypes.bfloat16 and twin[name].dtype == np.float32  # each model's own dtype
        assert twin[name].astype(ml_dtypes.bfloat16).tobytes() == t.tobytes(), name
        fine = delta[name] != delta[name].astype(ml_dtypes.bfloat16).astype(delta[name].dtype)
        assert fine.mean() > 0.5, name  # the master values carry bits bf16 has not
        assert delta[name].dtype == np.float32
        assert (-delta[name]).astype(ml_dtypes.bfloat16).tobytes() == t.tobytes(), name  # rounded once, at the end


def test_lora_rank_writes_a_dense_vector_of_rank_at_most_r(world, tmp_path):
    """--lora-rank 2: every written τ matrix has rank <= 2 (float64 SVD, float32 rounding tolerated), where the
    full-rank baseline's have more; the manifest records the rank and alpha."""
    options = ej.DistillOptions(**{**OPTIONS, "steps": 3, "save_every": 3, "lr": 1e-2, "lora_rank": 2})
    manifest = ej.distill(world["model"], world["data"], tmp_path / "lora", options)
    assert (manifest["training"]["lora_rank"], manifest["training"]["lora_alpha"]) == (2, 8.0)
    tau, full = _vector(tmp_path / "lora"), _vector(world["baseline"])
    assert set(tau) == set(full)

    def rank(matrix):
        x = np.asarray(matrix, np.float64)
        return np.linalg.matrix_rank(x, tol=np.linalg.norm(x, 2) * max(x.shape) * np.finfo(np.float32).eps)

    for name, t in tau.items():
        assert 1 <= rank(t) <= 2 < rank(full[name]), name


@pytest.mark.parametrize("rank", ["0", "-1"])
def test_cli_refuses_a_lora_rank_below_1(world, tmp_path, capsys, rank):
    from enchtable_jax.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--model", str(world["model"]), "--data", str(world["data"]), "--out", str(tmp_path / "o"),
              f"--lora-rank={rank}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "--lora-rank" in err, err


def test_a_lora_rank_above_a_matrix_dimension_is_one_line(world, tmp_path, capsys):
    from cli_checks import TRAIN, fails_in_one_line

    fails_in_one_line(capsys, "distill", "--model", world["model"], "--data", world["data"], "--out",
                      tmp_path / "o", *TRAIN, "--lora-rank", 65, needles=("--lora-rank", "[1, 64]", "got 65"))
    assert not (tmp_path / "o").exists()
