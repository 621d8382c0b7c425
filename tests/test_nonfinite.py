"""The non-finite guard: NaN/Inf inputs are refused naming file and tensor, outputs are never written non-finite
(also with allow_nonfinite), and no option value can make NaN."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import enchtable_jax as ej
from enchtable_jax.cli import main
from enchtable_jax.converters.hf import write_hf
from enchtable_jax.converters.orbax_io import write_orbax
from enchtable_jax.converters.safety_vector import write_vector
from enchtable_jax.errors import EnchtableError
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.identity import identity
from enchtable_jax.models.tokenizer import byte_level_tokenizer
from enchtable_jax.nonfinite import NonFiniteError, host_finite

SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, vocab_size=264)
MLP = "model.layers.1.mlp.up_proj.weight"  # inside the safety vector's scope: merged
ATTN = "model.layers.0.self_attn.q_proj.weight"  # outside it: copied from the task model
NAN, INF = float("nan"), float("inf")


def _save(params, config, folder, like=None):
    """An HF folder written without the output guard (how a broken model reaches a user)."""
    return write_hf(folder, config, {n: jnp.asarray(v) for n, v in params.items()}, like=like, check_finite=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base, task (base + noise), harmful (base + noise on the MLPs), a safety vector, and their poisoned copies."""
    root = tmp_path_factory.mktemp("nonfinite")
    config = preset_config("tiny", **SMALL)
    tok = root / "tokenizer"
    byte_level_tokenizer().save_pretrained(tok)
    rng = np.random.default_rng(0)
    base = {n: np.asarray(v, np.float32) for n, v in init_params(config, seed=0, std=0.1).items()}
    task = {n: v + 0.02 * rng.normal(size=v.shape).astype(np.float32) for n, v in base.items()}
    harmful = {n: v + (0.03 * rng.normal(size=v.shape).astype(np.float32) if ".mlp." in n else 0)
               for n, v in base.items()}
    w = {"root": root, "config": config, "params": {"base": base, "task": task, "harmful": harmful}}
    for role, params in w["params"].items():
        w[role] = _save(params, config, root / role, like=tok)
    w["vector"] = _vector(root / "vector", base, harmful, config)
    return w


def _vector(folder, base, harmful, config, poison=None):
    tau = {n: base[n] - harmful[n] for n in base if ".mlp." in n}
    if poison is not None:
        name, value = poison
        tau[name] = tau[name].copy()
        tau[name][3, 2] = value
    write_vector(folder, tau, {"base_model": identity(config, {n: jnp.asarray(v) for n, v in base.items()})})
    return folder


def _poisoned(world, role, name, value, tmp_path):
    """A copy of `role` (base, task, harmful or vector) with entry [3, 2] of tensor `name` set to `value`."""
    p = world["params"]
    if role == "vector":
        return _vector(tmp_path / "bad-vector", p["base"], p["harmful"], world["config"], (name, value))
    params = {n: v.copy() for n, v in p[role].items()}
    params[name][3, 2] = value
    return _save(params, world["config"], tmp_path / f"bad-{role}", like=world[role])


# (role poisoned, tensor, value, method, inputs): one case per path the executor reads inputs by.
CASES = [
    ("task", MLP, NAN, "enchtable", "vector"),  # pass 1: the norms of the adaptive α
    ("task", MLP, INF, "task_arithmetic", "vector"),  # pass 2: the fused device check of τ_task (fixed α)
    ("base", MLP, NAN, "ties", "vector"),
    ("base", MLP, -INF, "model_stock", "vector"),
    ("vector", MLP, INF, "task_arithmetic", "vector"),  # τ_safe, read from the vector file
    ("vector", MLP, NAN, "enchtable", "vector"),
    ("harmful", MLP, NAN, "dare", "pair"),  # τ_safe = aligned − harmful
    ("task", ATTN, NAN, "breadcrumbs", "vector"),  # a tensor copied unchanged from the task model
    ("task", ATTN, INF, "tsv", "pair"),  # copied too: its safety delta is zero
]


def _merge(world, method, inputs, tmp_path, **roles):
    kw = dict(base=roles.get("base", world["base"]), task=roles.get("task", world["task"]))
    if inputs == "vector":
        kw["safety_vector"] = roles.get("vector", world["vector"])
    else:
        kw["aligned"], kw["harmful"] = world["base"], roles.get("harmful", world["harmful"])
    alpha = None if method == "enchtable" else 1.0
    return merge(method, out=tmp_path / "out", alpha=alpha, progress=False, **kw)


@pytest.mark.parametrize("role,name,value,method,inputs", CASES)
def test_merge_refuses_a_nonfinite_input_naming_file_and_tensor(world, tmp_path, role, name, value, method, inputs):
    bad = _poisoned(world, role, name, value, tmp_path)
    with pytest.raises(NonFiniteError) as err:
        _merge(world, method, inputs, tmp_path, **{role: bad})
    message = str(err.value)
    stored = "safety_vector.safetensors" if role == "vector" else "model.safetensors"
    assert str(bad / stored) in message and f"tensor {name}" in message, message
    assert "refusing a non-finite input" in message and ("1 NaN" if math.isnan(value) else "1 Inf") in message
    assert "\n" not in message and isinstance(err.value, EnchtableError)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,alpha", [("task_arithmetic", 1.0), ("enchtable", None), ("model_stock", 1.0)])
def test_allow_nonfinite_lets_inputs_in_but_never_writes_a_nonfinite_output(world, tmp_path, method, alpha):
    bad = _poisoned(world, "task", MLP, NAN, tmp_path)
    with pytest.raises(NonFiniteError, match=f"merge {method} .*tensor {MLP} would hold .*NaN.*nothing was written"):
        merge(method, world["base"], bad, safety_vector=world["vector"], out=tmp_path / "out", alpha=alpha,
              allow_nonfinite=True, progress=False)
    assert not (tmp_path / "out").exists()
    # in memory too (the calibration's merges)
    with pytest.raises(NonFiniteError, match="would hold"):
        merge(method, world["base"], bad, safety_vector=world["vector"], alpha=alpha, allow_nonfinite=True,
              progress=False)


def test_allow_nonfinite_keeps_the_adaptive_alpha_finite(world, tmp_path):
    """With allow_nonfinite, α's norms skip the bad entry: α is the clean model's, not NaN (the output guard then
    refuses the one tensor that holds the NaN, as above; every other merged tensor would be right)."""
    from enchtable_jax.merging import executor
    from enchtable_jax.merging.sources import SafetyDelta, open_model

    bad = _poisoned(world, "task", MLP, NAN, tmp_path)
    clean = executor.plan(open_model(world["base"], "base"), open_model(world["task"], "task"),
                          SafetyDelta(world["vector"]), "enchtable", None, None, progress=False)
    let_in = executor.plan(open_model(world["base"], "base"), open_model(bad, "task"), SafetyDelta(world["vector"]),
                           "enchtable", None, None, progress=False, allow_nonfinite=True)
    assert math.isfinite(let_in.alpha) and let_in.alpha == pytest.approx(clean.alpha, rel=1e-3)


@pytest.mark.parametrize("options", [dict(method="dare", density=0.0), dict(method="task_arithmetic", alpha=NAN),
                                     dict(method="enchtable", beta=INF), dict(method="ties", density=NAN),
                                     dict(method="task_arithmetic", alpha=-1.0)])
def test_no_option_value_makes_nan(world, tmp_path, options):
    options = dict(options)
    method = options.pop("method")
    with pytest.raises(EnchtableError, match="option (density|alpha|beta) must be"):
        merge(method, world["base"], world["task"], safety_vector=world["vector"], out=tmp_path / "out",
              progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_cli_merge_names_the_tensor_in_one_line(world, tmp_path, capsys):
    bad = _poisoned(world, "vector", MLP, INF, tmp_path)
    code = main(["merge", "--method", "task_arithmetic", "--alpha", "1", "--base", str(world["base"]), "--task",
                 str(world["task"]), "--safety-vector", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and MLP in err and "safety_vector.safetensors" in err, err


def test_load_convert_and_save_refuse_nonfinite_tensors(world, tmp_path, capsys):
    bad = _poisoned(world, "task", ATTN, -INF, tmp_path)
    with pytest.raises(NonFiniteError, match=f"{bad / 'model.safetensors'}: tensor {ATTN} holds 0 NaN and 1 Inf"):
        ej.load(bad)
    code = main(["convert", str(bad), str(tmp_path / "orbax")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and ATTN in err and not (tmp_path / "orbax").exists()
    # allowed in explicitly: the model loads as it is, and no writer lets it out again
    model = ej.load(bad, allow_nonfinite=True)
    assert np.isinf(np.asarray(model.params[ATTN])).sum() == 1
    with pytest.raises(NonFiniteError, match=f"tensor {ATTN} would hold .*nothing was written"):
        ej.save(model, tmp_path / "hf")
    with pytest.raises(NonFiniteError, match=f"tensor {ATTN} would hold"):
        ej.save_orbax(model, tmp_path / "orbax")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "orbax").exists()


def test_orbax_checkpoint_with_nan_is_refused(world, tmp_path):
    params = {n: jnp.asarray(v) for n, v in world["params"]["base"].items()}
    params[MLP] = params[MLP].at[0, 0].set(NAN)
    ckpt = write_orbax(tmp_path / "ckpt", world["config"], params, like=world["base"])
    with pytest.raises(NonFiniteError, match=f"{ckpt}: tensor {MLP} holds 1 NaN"):
        ej.load(ckpt)
    assert np.isnan(np.asarray(ej.load(ckpt, allow_nonfinite=True).params[MLP])).sum() == 1


def _data(path):
    rows = [{"instruction": f"Explain step {i}.", "output": f"Sure, step {i} is this."} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_distill_and_finetune_refuse_a_nonfinite_model_before_training(world, tmp_path):
    bad = _poisoned(world, "base", "model.embed_tokens.weight", NAN, tmp_path)
    data = _data(tmp_path / "data.jsonl")
    with pytest.raises(NonFiniteError, match="model.safetensors: tensor model.embed_tokens.weight holds 1 NaN"):
        ej.distill(bad, data, tmp_path / "vector", ej.DistillOptions(steps=1, max_length=32, warmup_ratio=0.0))
    assert not (tmp_path / "vector" / "safety_vector.safetensors").exists()
    with pytest.raises(NonFiniteError, match="tensor model.embed_tokens.weight holds 1 NaN"):
        ej.finetune(bad, data, tmp_path / "tuned", ej.FinetuneOptions(steps=1, max_length=32, warmup_ratio=0.0))
    assert not (tmp_path / "tuned").exists()


def test_distill_with_allow_nonfinite_writes_a_finite_vector_or_nothing(world, tmp_path):
    """allow_nonfinite lets the model in; what comes out is checked. A NaN in an embedding row no example uses
    (byte 3) never reaches the computation: the vector is finite and written. A NaN in an MLP weight reaches every
    activation: Δ is NaN, and it is refused with nothing written."""
    data = _data(tmp_path / "data.jsonl")
    options = ej.DistillOptions(steps=1, max_length=128, batch_size=1, grad_accum=1, warmup_ratio=0.0)
    unused_row = _poisoned(world, "base", "model.embed_tokens.weight", NAN, tmp_path / "a")
    ej.distill(unused_row, data, tmp_path / "vector-a", options, allow_nonfinite=True)
    from enchtable_jax.converters.safety_vector import load_safety_vector

    vector = load_safety_vector(tmp_path / "vector-a")
    assert vector.tensors and all(host_finite(v) for v in vector.tensors.values())
    everywhere = _poisoned(world, "base", MLP, NAN, tmp_path / "b")
    with pytest.raises(NonFiniteError, match=r"distill of .*: tensor model\.layers\.\d\.mlp\..* would hold .*NaN"):
        ej.distill(everywhere, data, tmp_path / "vector-b", options, allow_nonfinite=True)
    assert not (tmp_path / "vector-b" / "safety_vector.safetensors").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_host_check_finds_one_bad_entry_anywhere(dtype, value):
    x = np.linspace(-3, 3, 4 * 1031).astype(dtype).reshape(4, 1031)
    assert host_finite(x) and host_finite(x[:, ::3]) and host_finite(np.arange(5))
    for index in [(0, 0), (2, 517), (3, 1030)]:
        y = x.copy()
        y[index] = value
        assert not host_finite(y) and not host_finite(y[:, index[1]:])
    big = np.full(7, np.finfo(np.float16).max, np.float16)  # finite at the dtype's edge: not mistaken for Inf
    assert host_finite(big) and host_finite(big.astype(ml_dtypes.bfloat16))
