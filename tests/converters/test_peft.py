"""PEFT LoRA adapters read as base-tensor deltas, against PEFT's own merge_and_unload (the oracle): for every
tensor, our base + scale·B·A equals the merged model PEFT produces, for plain LoRA, rsLoRA, rank/alpha patterns
and embeddings; every unsupported adapter is refused naming its file and field or tensor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch

from enchtable_jax.converters import peft as lora
from enchtable_jax.converters.hf import index_weights
from enchtable_jax.errors import EnchtableError
from lora_models import CONFIGS, make_adapter


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def peft_case(request, tmp_path_factory):
    return (request.param, *make_adapter(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param]))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("plain"), **CONFIGS["plain"])


def shapes(folder) -> dict[str, tuple[int, ...]]:
    return {n: s.shape for n, s in index_weights(folder).tensors.items()}


def test_base_plus_delta_equals_merge_and_unload(peft_case):
    kind, base, adapter, _, merged = peft_case
    stored = safetensors.numpy.load_file(base / "model.safetensors")
    opened = lora.open_adapter(adapter, shapes(base))
    expected_targets = {n for n in stored if n.removesuffix(".weight").rsplit(".", 1)[-1]
                        in CONFIGS[kind]["target_modules"]}
    assert set(opened.targets) == expected_targets
    for name, weight in stored.items():
        ours = weight + opened.delta(name) if name in opened.targets else weight
        np.testing.assert_allclose(ours, merged[name], rtol=1e-6, atol=1e-6, err_msg=name)
        if name in opened.targets:  # the delta is not lost in rounding: it is a real change of the tensor
            assert np.abs(merged[name] - weight).max() > 1e-3, name


def test_ranks_and_scales_follow_the_config(peft_case):
    kind, base, adapter, _, _ = peft_case
    targets = lora.open_adapter(adapter).targets
    config = CONFIGS[kind]
    for name, t in targets.items():
        if kind == "patterns" and (name.endswith("down_proj.weight") or "layers.1.self_attn.q_proj" in name):
            rank = 3 if "down_proj" in name else 2
        else:
            rank = config["r"]
        alpha = 5 if kind == "patterns" and ("layers.0.mlp.up_proj" in name or "layers.2.mlp.up_proj" in name) \
            else config["lora_alpha"]
        b, a = lora.open_adapter(adapter).factors(name)
        assert (t.rank, b.shape[1], a.shape[0]) == (rank, rank, rank), name
        assert t.scale == pytest.approx(alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)), name
        assert b.dtype == a.dtype == np.float32


def test_legacy_bin_adapter_reads_the_same_factors(plain, tmp_path):
    base, adapter, _, _ = plain
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(adapter / lora.CONFIG, legacy / lora.CONFIG)
    tensors = safetensors.numpy.load_file(adapter / lora.WEIGHTS)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, legacy / "adapter_model.bin")
    ours, theirs = lora.open_adapter(legacy, shapes(base)), lora.open_adapter(adapter, shapes(base))
    name = next(iter(ours.targets))
    for x, y in zip(ours.factors(name), theirs.factors(name)):
        np.testing.assert_array_equal(x, y)


def edited(adapter, tmp_path, config: dict | None = None, tensors=None):
    """A copy of `adapter` with config fields replaced and/or its tensors replaced by `tensors(dict) -> dict`."""
    out = tmp_path / "edited"
    shutil.copytree(adapter, out)
    if config is not None:
        data = json.loads((out / lora.CONFIG).read_text())
        (out / lora.CONFIG).write_text(json.dumps({**data, **config}))
    if tensors is not None:
        stored = safetensors.numpy.load_file(out / lora.WEIGHTS)
        safetensors.numpy.save_file(tensors(stored), out / lora.WEIGHTS)
    return out


@pytest.mark.parametrize("field, value", [("peft_type", "IA3"), ("use_dora", True), ("fan_in_fan_out", True),
                                          ("bias", "all"), ("lora_bias", True), ("modules_to_save", ["lm_head"]),
                                          ("r", 0), ("lora_alpha", "8"), ("rank_pattern", ["q_proj"])])
def test_unsupported_config_refused_naming_the_field(plain, tmp_path, field, value):
    _, adapter, _, _ = plain
    folder = edited(adapter, tmp_path, {field: value})
    with pytest.raises(EnchtableError, match=rf"adapter_config.json: field {field}"):
        lora.open_adapter(folder)


def test_factor_shapes_that_do_not_fit_refused(plain, tmp_path):
    base, adapter, _, _ = plain
    key = "base_model.model.model.layers.0.mlp.down_proj"
    with pytest.raises(EnchtableError, match=r"down_proj.lora_B.weight .* base tensor model.layers.0.mlp.down_proj"):
        lora.open_adapter(adapter, {**shapes(base), "model.layers.0.mlp.down_proj.weight": (63, 96)})
    with pytest.raises(EnchtableError, match=r"adapts model.layers.0.mlp.down_proj.weight, which the base model"):
        lora.open_adapter(adapter, {n: s for n, s in shapes(base).items() if "layers.0.mlp.down_proj" not in n})
    a, b = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
    wrong_rank = edited(adapter, tmp_path, tensors=lambda t: {**t, a: t[a][:3], b: t[b][:, :3]})
    with pytest.raises(EnchtableError, match=r"adapter_model.safetensors: tensor .*down_proj.lora_A.weight .* rank 4"):
        lora.open_adapter(wrong_rank)


@pytest.mark.parametrize("change, message", [
    (lambda t: {k: v for k, v in t.items() if not k.endswith("layers.0.mlp.down_proj.lora_B.weight")},
     r"module model.layers.0.mlp.down_proj has no lora_B factor"),
    (lambda t: {**t, "base_model.model.lm_head.base_layer.weight": np.zeros((101, 64), np.float32)},
     r"tensor base_model.model.lm_head.base_layer.weight is a whole base tensor"),
    (lambda t: {**t, "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector": np.ones(64, np.float32)},
     r"tensor .*lora_magnitude_vector is not a LoRA factor"),
])
def test_unknown_or_incomplete_tensors_refused(plain, tmp_path, change, message):
    _, adapter, _, _ = plain
    with pytest.raises(EnchtableError, match=message):
        lora.open_adapter(edited(adapter, tmp_path, tensors=change))


def test_missing_weights_and_escaping_symlink_refused(plain, tmp_path):
    _, adapter, _, _ = plain
    folder = edited(adapter, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / lora.WEIGHTS).rename(outside)
    with pytest.raises(EnchtableError, match=r"without adapter_model.safetensors or adapter_model.bin"):
        lora.open_adapter(folder)
    (folder / lora.WEIGHTS).symlink_to(outside)
    with pytest.raises(EnchtableError, match=r"outside the folder"):
        lora.open_adapter(folder)
    assert lora.is_adapter(folder) and not lora.is_adapter(tmp_path)


def test_synthetic_adapter_is_one_peft_loads(tmp_path):
    """bench.synthetic's adapter (the speed studies' LoRA task) is a valid PEFT adapter: PEFT loads it over the
    synthetic base, and its merge_and_unload equals base + our delta."""
    import peft
    import transformers

    from enchtable_jax.bench.synthetic import write_lora_adapter, write_model
    from enchtable_jax.models.init import preset_config

    config = preset_config("tiny")
    base = write_model(tmp_path / "base", config)
    adapter = write_lora_adapter(tmp_path / "adapter", config, rank=3, seed=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    stored = safetensors.numpy.load_file(base / "model.safetensors")
    opened = lora.open_adapter(adapter, shapes(base))
    assert {n for n in stored if ".layers." in n and stored[n].ndim == 2} == set(opened.targets)
    for name in opened.targets:
        np.testing.assert_allclose(stored[name] + opened.delta(name), merged[name].numpy(), rtol=1e-6, atol=1e-7,
                                   err_msg=name)
