"""The activation table equals transformers' activations (PyTorch) on the same inputs, and a config naming
one outside it is refused."""

import numpy as np
import pytest
import torch
from transformers.activations import ACT2FN

from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.activations import ACTIVATIONS
from enchtable_jax.models.config import ModelConfig


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_is_transformers(name):
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    expected = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](x)), expected, rtol=1e-6, atol=1e-6)


def test_a_config_naming_another_activation_is_refused():
    raw = {"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "swish"}
    with pytest.raises(EnchtableError, match="hidden_act"):
        ModelConfig.from_hf(raw)
    ModelConfig.from_hf({**raw, "hidden_act": "silu"})
