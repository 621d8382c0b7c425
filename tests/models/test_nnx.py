"""The flax.nnx face (models/nnx.py): its logits are `apply`'s, its Params are the HF tensors under their HF
names with the tensor table's logical axes, a folder goes HF -> nnx -> HF unchanged to the byte, and an
`nnx.Optimizer` step is the optax step on the flat dict."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import enchtable_jax as ej
from enchtable_jax.models.init import init_params, preset_config

# One decoder layer keeps compilation short; Mistral's sliding window and Qwen2's q/k/v biases are in play.
FAMILIES = {"llama": {}, "mistral": {"sliding_window": 3}, "qwen2": {}}


def tiny(model_type: str = "llama", dtype=jnp.float32, seed: int = 0, **overrides) -> ej.Model:
    config = preset_config("tiny", model_type, num_hidden_layers=1, **{**FAMILIES[model_type], **overrides})
    params = init_params(config, seed=seed, dtype=dtype)
    # Norms and biases start at 1 and 0; move them so that a forward skipping one differs.
    params = {n: v + 0.1 * jax.random.normal(jax.random.key(i), v.shape, v.dtype) if v.ndim == 1 else v
              for i, (n, v) in enumerate(params.items())}
    return ej.Model(config, params)


def batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab, (2, 7))
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # left padding: the module must pass the mask on
    return ids, mask


def rel(a, ref) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_logits_equal_apply(model_type):
    model = tiny(model_type)
    module = model.to_nnx()
    ids, mask = batch(model.config.vocab_size)
    assert rel(module(ids, mask), ej.apply(model, ids, mask)) <= 1e-6


def test_params_are_the_hf_tensors_by_name_not_copies():
    model = tiny("qwen2", tie_word_embeddings=True)
    module = model.to_nnx()
    assert list(module.params) == list(model.params)
    for name, value in model.params.items():
        assert isinstance(module.params[name], nnx.Param)
        assert module.params[name].get_value() is value
    back = ej.from_nnx(module)
    assert back.config == model.config and all(back.params[n] is v for n, v in model.params.items())
    with pytest.raises(TypeError, match="from_nnx expects"):
        ej.from_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_partition_specs_are_the_declared_axes_and_place_on_a_mesh():
    model = tiny("qwen2", tie_word_embeddings=True)
    # A tied checkpoint may also store lm_head.weight; the table does not declare it, so it is replicated.
    model = ej.Model(model.config, {**model.params, "lm_head.weight": model.params["model.embed_tokens.weight"]})
    module = model.to_nnx()
    c = model.config
    sizes = {"vocab": c.vocab_size, "hidden": c.hidden_size, "ffn": c.intermediate_size,
             "q": c.num_attention_heads * c.head_dim, "kv": c.num_key_value_heads * c.head_dim}
    specs = nnx.get_partition_spec(nnx.state(module))["params"]
    for name, value in model.params.items():
        spec = specs[name].get_value()
        if name == "lm_head.weight":
            assert spec == P()
        else:  # each named axis has the size the config gives that name
            assert tuple(sizes[axis] for axis in spec) == value.shape, name
    assert specs["model.embed_tokens.weight"].get_value() == P("vocab", "hidden")
    assert specs["model.layers.0.mlp.down_proj.weight"].get_value() == P("hidden", "ffn")
    assert specs["model.layers.0.self_attn.k_proj.weight"].get_value() == P("kv", "hidden")
    assert specs["model.layers.0.self_attn.q_proj.bias"].get_value() == P("q")

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    rules = (("vocab", "fsdp"), ("ffn", "fsdp"), ("q", "fsdp"), ("hidden", None), ("kv", None))
    with nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(nnx.state(module), mesh)
    nnx.update(module, jax.device_put(nnx.state(module), shardings))
    down = module.params["model.layers.0.mlp.down_proj.weight"].get_value()
    assert down.sharding.spec == P(None, "fsdp") and down.addressable_shards[0].data.shape == (c.hidden_size, 16)
    head = module.params["lm_head.weight"].get_value()
    assert head.sharding.is_fully_replicated and np.array_equal(head, model.params["lm_head.weight"])


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("model_type, dtype, shard_size", [("llama", jnp.float32, "5GB"),
                                                            ("qwen2", jnp.bfloat16, 40_000)])
def test_hf_to_nnx_to_hf_is_byte_identical(tmp_path, model_type, dtype, shard_size):
    src = ej.save(tiny(model_type, dtype=dtype), tmp_path / "src", shard_size=shard_size)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    before = snapshot(src)
    assert shard_size == "5GB" or "model.safetensors.index.json" in before  # several shards and their index

    module = ej.load_nnx(src)
    out = ej.save(module, tmp_path / "out", shard_size=shard_size)
    assert snapshot(out) == before
    assert snapshot(src) == before


def test_optimizer_step_is_the_optax_step_on_the_flat_dict():
    model = tiny("llama")
    ids, mask = batch(model.config.vocab_size)
    tx = optax.adamw(1e-2, weight_decay=0.1)

    def loss(logits):  # next-token cross-entropy over real tokens
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        return (losses * mask[:, 1:]).sum() / mask[:, 1:].sum()

    @jax.jit
    def flat_step(params, state):
        grads = jax.grad(lambda p: loss(ej.apply(ej.Model(model.config, p), ids, mask)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    @nnx.jit
    def nnx_step(module, optimizer):
        optimizer.update(module, nnx.grad(lambda m: loss(m(ids, mask)))(module))

    params, state = model.params, tx.init(model.params)
    module = model.to_nnx()
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)
    for _ in range(2):  # the second step uses the moments the first one stored
        params, state = flat_step(params, state)
        nnx_step(module, optimizer)
    trained = ej.from_nnx(module).params
    assert not [n for n, v in params.items() if np.array_equal(v, model.params[n])]  # every tensor was trained
    chex.assert_trees_all_close(trained, params, rtol=1e-6, atol=1e-7)


@pytest.mark.real
def test_smollm2_logits_equal_apply(smollm2_dir):
    module = ej.load_nnx(smollm2_dir)
    ids, mask = batch(module.config.vocab_size)
    expected = ej.apply(ej.from_nnx(module), ids, mask)
    assert rel(nnx.jit(lambda m, i, a: m(i, a))(module, ids, mask), expected) <= 1e-6


def test_orbax_checkpoint_of_the_module_holds_its_values(tmp_path):
    module = tiny("llama").to_nnx()
    module.params["model.norm.weight"].set_value(jnp.full((module.config.hidden_size,), 2.0))
    restored = ej.load(ej.save_orbax(module, tmp_path / "ckpt"))
    assert restored.params.keys() == module.params.keys()
    for name, param in module.params.items():
        assert np.array_equal(restored.params[name], param.get_value()), name
