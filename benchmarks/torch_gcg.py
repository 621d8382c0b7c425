"""A plain PyTorch GCG step (Zou et al. 2023, arXiv:2307.15043), for side-by-side speed comparisons with ours
(`enchtable_jax.attack.gcg`; the bench study `python -m enchtable_jax.bench --suite gcg`).

The same algorithm and shapes as ours, written the obvious way with transformers:

1. the gradient of the target's mean cross-entropy with respect to the suffix as one-hot rows [n, vocab]: the rows
   times the embedding matrix replace the suffix's embeddings in `model(inputs_embeds=...)`, one backward pass;
2. per position, the top-k allowed tokens by negative gradient;
3. B candidates, each the suffix with one uniformly drawn position set to a uniformly drawn top-k token;
4. a round-trip filter as plain GCG implementations have it: a candidate is kept when its suffix, decoded and
   encoded again, gives the same ids;
5. every kept candidate's loss in one batched forward under `torch.no_grad()`, the head only on the target's
   positions (`logits_to_keep`, as ours computes only those); the best candidate becomes the suffix.

The rendered prompt is given as token ids (prefix, suffix, after, target), the ones our attack renders with the
model's chat template; `render` gives transformers' own rendering to check they agree. Nothing is deliberately
slow: torch uses its intra-op threads (set by the caller), the model its default attention; on CUDA float32
matmuls may use TF32, as XLA's default precision does there. It is deliberately plain too: no prefix cache, one
batch for all candidates.

This module imports only torch, transformers, numpy and the standard library (the bench runs it in a process of
its own, without JAX).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers

_DECODE = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}


def load(folder: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """(model in float32, eval mode, on `device`; tokenizer) from an HF folder, offline, no remote code."""
    offline = {"local_files_only": True, "trust_remote_code": False}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **offline)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **offline)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device), tokenizer


def render(tokenizer, content: str) -> list[int]:
    """transformers' rendering of one user turn with the generation prompt (the model's chat template)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


class TorchGCG:
    """One prompt's GCG state: `loss_and_grad(suffix)`, `candidates(suffix, grad)`, `keep(candidates)`,
    `candidate_losses(candidates)`, and `step(suffix)` doing all of them; `run(steps)` times `steps` steps."""

    def __init__(self, model: torch.nn.Module, tokenizer, prefix: Sequence[int], suffix: Sequence[int],
                 after: Sequence[int], target: Sequence[int], allowed: np.ndarray, topk: int, batch: int,
                 seed: int = 0):
        self.model, self.tokenizer, self.topk, self.batch = model, tokenizer, topk, batch
        self.device = next(model.parameters()).device
        ids = lambda xs: torch.as_tensor(list(xs), dtype=torch.long, device=self.device)  # noqa: E731
        self.prefix, self.after, self.target = ids(prefix), ids(after), ids(target)
        self.suffix = ids(suffix)
        self.embedding = model.get_input_embeddings().weight  # [vocab, hidden]
        with torch.no_grad():
            self.before_rows = self.embedding[self.prefix]
            self.after_rows = self.embedding[torch.cat([self.after, self.target])]
        self.allowed = torch.as_tensor(np.asarray(allowed, bool), device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def _nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy [B] of the target under logits [B, T + 1, vocab] of the last T + 1 positions."""
        logits = logits[:, :-1].float()
        targets = self.target.expand(logits.shape[0], -1)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)

    def loss_and_grad(self, suffix: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The loss at `suffix` [n] and its gradient with respect to the suffix's one-hot rows [n, vocab]."""
        onehot = torch.nn.functional.one_hot(suffix, self.embedding.shape[0]).to(self.embedding.dtype)
        onehot.requires_grad_(True)
        rows = torch.cat([self.before_rows, onehot @ self.embedding, self.after_rows])[None]
        logits = self.model(inputs_embeds=rows, logits_to_keep=len(self.target) + 1).logits
        loss = self._nll(logits)[0]
        (grad,) = torch.autograd.grad(loss, onehot)
        return float(loss.detach()), grad

    def candidates(self, suffix: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """[batch, n]: the suffix with one uniform position set to a uniform pick of its top-k allowed tokens."""
        top = torch.where(self.allowed, -grad, -torch.inf).topk(self.topk, dim=1).indices  # [n, topk]
        n = suffix.shape[0]
        position = torch.randint(0, n, (self.batch,), generator=self.generator, device=self.device)
        pick = torch.randint(0, self.topk, (self.batch,), generator=self.generator, device=self.device)
        rows = suffix.repeat(self.batch, 1)
        rows[torch.arange(self.batch, device=self.device), position] = top[position, pick]
        return rows

    def keep(self, candidates: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: candidates whose decoded suffix encodes back to the same ids."""
        ids = candidates.tolist()
        texts = self.tokenizer.batch_decode(ids, **_DECODE)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return torch.as_tensor([list(e) == row for e, row in zip(encoded, ids)], device=self.device)

    @torch.no_grad()
    def candidate_losses(self, candidates: torch.Tensor) -> torch.Tensor:
        """Loss [B] of the prompt with each candidate suffix, in one batched forward."""
        b = candidates.shape[0]
        rows = torch.cat([self.prefix.expand(b, -1), candidates, self.after.expand(b, -1),
                          self.target.expand(b, -1)], dim=1)
        return self._nll(self.model(input_ids=rows, logits_to_keep=len(self.target) + 1).logits)

    def step(self, suffix: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One GCG step from `suffix`: (the best kept candidate, its loss); the suffix itself if none is kept."""
        _, grad = self.loss_and_grad(suffix)
        candidates = self.candidates(suffix, grad)
        candidates = candidates[self.keep(candidates)]
        if candidates.shape[0] == 0:
            return suffix, float("nan")
        losses = self.candidate_losses(candidates)
        best = int(torch.argmin(losses))
        return candidates[best], float(losses[best])

    def run(self, steps: int) -> dict:
        """`steps` steps from the current suffix (which then moves on): seconds and the losses."""
        losses = []
        start = time.perf_counter()
        for _ in range(steps):
            self.suffix, loss = self.step(self.suffix)
            losses.append(loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "losses": losses}


REPLY = "@@gcg "  # the prefix of the server's answer lines (anything else on stdout is a library's)


def _answer(reply: dict) -> None:
    print(REPLY + json.dumps(reply), flush=True)


def serve(args: dict) -> None:
    """Answer JSON commands, one per line of stdin, with one `REPLY` line each (the bench study's protocol):
    {"op": "steps", "steps": k} -> {"seconds", "losses"}; {"op": "check", "candidates": FILE.npy, "grad": FILE.npy}
    -> {"loss", "candidate_losses"} (the gradient at the initial suffix written to the grad file); {"op": "quit"}.
    `args`: folder, prefix, suffix, after, target (ids), allowed (an .npy file), topk, batch, seed, content (the
    user turn with the initial suffix, rendered here to check the ids), threads."""
    torch.set_num_threads(int(args.get("threads") or len(os.sched_getaffinity(0))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as XLA's default precision on the same GPU
    model, tokenizer = load(args["folder"], device)
    try:
        rendered = render(tokenizer, args["content"])
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the ids given are what both sides run
        rendered = f"{type(e).__name__}: {e}"
    gcg = TorchGCG(model, tokenizer, args["prefix"], args["suffix"], args["after"], args["target"],
                   np.load(args["allowed"]), args["topk"], args["batch"], args.get("seed", 0))
    initial = gcg.suffix.clone()
    _answer({"ready": True, "device": device, "threads": torch.get_num_threads(), "rendered": rendered,
             "torch": torch.__version__, "transformers": transformers.__version__})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        if command["op"] == "steps":
            _answer(gcg.run(command["steps"]))
        elif command["op"] == "check":
            loss, grad = gcg.loss_and_grad(initial)
            np.save(command["grad"], grad.float().cpu().numpy())
            candidates = torch.as_tensor(np.load(command["candidates"]), dtype=torch.long, device=gcg.device)
            losses = gcg.candidate_losses(candidates).float().cpu().numpy()
            _answer({"loss": loss, "candidate_losses": losses.tolist()})
        else:
            _answer({"error": f"unknown op {command['op']!r}"})


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
