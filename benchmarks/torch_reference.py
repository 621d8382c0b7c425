"""A plain PyTorch reference of the linearized training step, for side-by-side speed comparisons.

Written from the same formulas as `models.transformer.forward`, `kernels.linearize` and
`kernels.train_step` (not from transformers' modules), with the same `unit(name, fn, params)` seam
and unit names, so the two frameworks do the same arithmetic: float32 throughout, RMSNorm and
softmax in float32, rotate-half RoPE on the same inverse frequencies, grouped-query attention,
masked scores at finfo.min, positions that skip padding. Each linearized unit is one
`torch.func.jvp` at θ0 with tangent Δ = θ − θ0 (primal and tangent in one pass), returning
primal + tangent; autograd differentiates through it to Δ. Nothing here is deliberately slow: it
runs eagerly on all of torch's intra-op threads (no `torch.compile`).

torch is imported by this module only; the bench imports it when the torch study runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from enchtable_jax.kernels.scopes import Scope, unit_params
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.tensors import layer_prefix
from enchtable_jax.models.transformer import rope_inv_freq

TorchParams = Mapping[str, torch.Tensor]
TorchUnit = Callable[[str, Callable[[TorchParams], torch.Tensor], TorchParams], torch.Tensor]

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def to_torch(params: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """JAX or numpy arrays -> contiguous CPU torch tensors of `dtype` (float32 by default), copied."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return {n: torch.from_numpy(np.array(v, dtype=np_dtype, copy=True, order="C")) for n, v in params.items()}


def call_unit(name: str, fn: Callable[[TorchParams], torch.Tensor], params: TorchParams) -> torch.Tensor:
    """The identity wrapper: evaluate the unit as it is."""
    return fn(params)


def _as_long(x) -> torch.Tensor:
    return x.long() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.long)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_tables(positions: torch.Tensor, config: ModelConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = torch.from_numpy(rope_inv_freq(config.head_dim, config.rope_theta, config.rope))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.cos(emb).to(dtype), torch.sin(emb).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def linear(x: torch.Tensor, params: TorchParams, name: str) -> torch.Tensor:
    """y = x Wᵀ (+ b) with W stored (out, in) under `name.weight`."""
    return F.linear(x, params[name + ".weight"], params.get(name + ".bias"))


def attention_masks(attention_mask: torch.Tensor, config: ModelConfig) -> dict[int | None, torch.Tensor]:
    """Boolean [B, 1, T, T] masks (query, key) for each distinct window size among the layers."""
    t = attention_mask.shape[1]
    q_idx = torch.arange(t)[:, None]
    k_idx = torch.arange(t)[None, :]
    base = (k_idx <= q_idx)[None, None] & attention_mask[:, None, None, :].bool()
    return {w: base if w is None else base & (k_idx > q_idx - w)[None, None] for w in set(config.sliding_windows)}


def attention(x: torch.Tensor, params: TorchParams, prefix: str, config: ModelConfig, cos: torch.Tensor,
              sin: torch.Tensor, mask: torch.Tensor, unit: TorchUnit = call_unit) -> torch.Tensor:
    """Grouped-query self-attention of one layer; x [B, T, hidden] -> [B, T, hidden]."""
    b, t, _ = x.shape
    h, k, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:
        return unit(prefix + name, lambda p: linear(inp, p, prefix + name), params)

    q = apply_rope(proj("q_proj", x).reshape(b, t, h, d), cos, sin)
    key = apply_rope(proj("k_proj", x).reshape(b, t, k, d), cos, sin)
    value = proj("v_proj", x).reshape(b, t, k, d)
    q = q.reshape(b, t, k, h // k, d)  # query heads grouped by the key/value head they share
    acc = torch.promote_types(x.dtype, torch.float32)
    scores = torch.einsum("bqkgd,bskd->bkgqs", q.to(acc), key.to(acc)) * (d ** -0.5)
    scores = scores.masked_fill(~mask[:, :, None], torch.finfo(acc).min)
    probs = torch.softmax(scores, dim=-1).to(x.dtype)
    out = torch.einsum("bkgqs,bskd->bqkgd", probs, value).reshape(b, t, h * d)
    return proj("o_proj", out)


def mlp(x: torch.Tensor, params: TorchParams, prefix: str, config: ModelConfig) -> torch.Tensor:
    act = _ACTIVATIONS[config.hidden_act]
    return linear(act(linear(x, params, prefix + "gate_proj")) * linear(x, params, prefix + "up_proj"),
                  params, prefix + "down_proj")


def decoder_layer(x: torch.Tensor, params: TorchParams, i: int, config: ModelConfig, cos: torch.Tensor,
                  sin: torch.Tensor, mask: torch.Tensor, unit: TorchUnit = call_unit) -> torch.Tensor:
    p = layer_prefix(i)
    h = rms_norm(x, params[p + "input_layernorm.weight"], config.rms_norm_eps)
    x = x + unit(p + "self_attn", lambda q: attention(h, q, p + "self_attn.", config, cos, sin, mask, unit), params)
    h = rms_norm(x, params[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    return x + unit(p + "mlp", lambda q: mlp(h, q, p + "mlp.", config), params)


def torch_forward(params: TorchParams, config: ModelConfig, input_ids, attention_mask=None,
                  unit: TorchUnit | None = None) -> torch.Tensor:
    """Logits [B, T, vocab], the PyTorch twin of `models.transformer.forward` (same `unit` seam and names)."""
    unit = call_unit if unit is None else unit
    input_ids = _as_long(input_ids)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else _as_long(attention_mask)
    position_ids = torch.clamp(torch.cumsum(attention_mask, dim=-1) - 1, min=0)
    embed = params["model.embed_tokens.weight"]
    x = F.embedding(input_ids, embed)
    cos, sin = rope_tables(position_ids, config, x.dtype)
    masks = attention_masks(attention_mask, config)
    for i in range(config.num_hidden_layers):
        x = decoder_layer(x, params, i, config, cos, sin, masks[config.sliding_windows[i]], unit)
    x = rms_norm(x, params["model.norm.weight"], config.rms_norm_eps)
    head = embed if config.tie_word_embeddings else params["lm_head.weight"]
    return x @ head.T


def linearized_unit(params0: TorchParams, delta: TorchParams, owned: Mapping[str, tuple[str, ...]]) -> TorchUnit:
    """A unit wrapper replacing each unit in `owned` by its first-order expansion around `params0`, tangent Δ."""

    def unit(name: str, fn: Callable[[TorchParams], torch.Tensor], current: TorchParams) -> torch.Tensor:
        names = owned.get(name)
        if not names:
            return fn(current)
        primal = {n: params0[n] for n in names}
        tangent = {n: delta[n].to(params0[n].dtype) for n in names}
        out, dout = torch.func.jvp(lambda sub: fn({**current, **sub}), (primal,), (tangent,))
        return out + dout

    return unit


def torch_linearized_forward(params0: TorchParams, delta: TorchParams, config: ModelConfig, scope: Scope,
                             input_ids, attention_mask=None) -> torch.Tensor:
    """f(θ0) + J(θ0)Δ over `scope`, per unit (or for the whole model): `kernels.linearize` in torch."""
    if scope.whole_model:
        primal = {n: params0[n] for n in scope.params}
        tangent = {n: delta[n].to(params0[n].dtype) for n in scope.params}
        out, dout = torch.func.jvp(lambda sub: torch_forward({**params0, **sub}, config, input_ids, attention_mask),
                                   (primal,), (tangent,))
        return out + dout
    unit = linearized_unit(params0, delta, unit_params(scope))
    return torch_forward(params0, config, input_ids, attention_mask, unit=unit)


def torch_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens (`loss_mask[:, 1:]`), in float32."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
    weight = loss_mask[:, 1:].reshape(-1).to(nll.dtype)
    return torch.sum(nll * weight) / torch.clamp(torch.sum(weight), min=1.0)


class TorchTrainStep:
    """Δ = θ − θ0 on the scope's tensors (zero leaf tensors) and an AdamW over them; `step(batch)` -> loss.

    The same parametrisation as `kernels.train_step` (the jvp tangent is trained directly).

    `params0` is the full θ0 (never trained). `batch` holds numpy (or torch) [B, T] arrays `input_ids`,
    `attention_mask` and `loss_mask`; the loss is `kernels.train_step.loss_fn`'s.
    """

    def __init__(self, config: ModelConfig, scope: Scope, params0: Mapping[str, Any], lr: float = 1e-4,
                 linearized: bool = True, weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, num_threads: int | None = None):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.config, self.scope, self.linearized = config, scope, linearized
        self.params0 = {n: (v if isinstance(v, torch.Tensor) else to_torch({n: v})[n]).detach()
                        for n, v in params0.items()}
        self.delta = {n: torch.zeros_like(self.params0[n]).requires_grad_(True) for n in scope.params}
        self.optimizer = torch.optim.AdamW(list(self.delta.values()), lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)

    def logits(self, input_ids, attention_mask) -> torch.Tensor:
        if self.linearized:
            return torch_linearized_forward(self.params0, self.delta, self.config, self.scope, input_ids,
                                            attention_mask)
        moved = {n: self.params0[n] + d for n, d in self.delta.items()}
        return torch_forward({**self.params0, **moved}, self.config, input_ids, attention_mask)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        input_ids = _as_long(batch["input_ids"])
        return torch_loss(self.logits(input_ids, _as_long(batch["attention_mask"])), input_ids,
                          _as_long(batch["loss_mask"]))

    def step(self, batch: Mapping[str, Any]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    __call__ = step

    def numpy_delta(self) -> dict[str, np.ndarray]:
        """Δ as numpy arrays (copies)."""
        return {n: v.detach().numpy().copy() for n, v in self.delta.items()}


def make_torch_train_step(config: ModelConfig, scope: Scope, params0: Mapping[str, Any], lr: float = 1e-4,
                          linearized: bool = True, weight_decay: float = 1e-4,
                          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                          num_threads: int | None = None) -> TorchTrainStep:
    """A `TorchTrainStep` over `scope` starting at θ0 = `params0` (JAX, numpy or torch arrays).

    Defaults equal `optax.adamw(lr)`'s (weight decay 1e-4, not torch's 1e-2), so both sides train alike.
    `num_threads` sets torch's intra-op threads (default: torch's own, one per physical core).
    """
    return TorchTrainStep(config, scope, params0, lr=lr, linearized=linearized, weight_decay=weight_decay,
                          betas=betas, eps=eps, num_threads=num_threads)


__all__ = ["TorchTrainStep", "make_torch_train_step", "to_torch", "torch_forward", "torch_linearized_forward",
           "torch_loss"]
