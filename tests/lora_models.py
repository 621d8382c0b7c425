"""PEFT LoRA adapters over tiny transformers models, with PEFT's own merge as the oracle (shared by the adapter
reader's tests and the LoRA merge tests)."""

from __future__ import annotations

import torch

from conftest import make_hf_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS),
    "rslora": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=PROJECTIONS,
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
                     alpha_pattern={r"layers\.[02]\.mlp\.up_proj": 5}),
    "embeddings": dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "lm_head", "v_proj"]),
}


def make_adapter(root, seed: int = 0, **config) -> tuple:
    """(base folder, adapter folder, merged folder, merged state dict): a tiny Llama wrapped by PEFT, its lora_B
    randomised (PEFT starts it at zero), the adapter saved, and the model merged by PEFT's merge_and_unload saved as
    an HF folder (float32)."""
    import peft

    base, adapter, merged_folder = root / "base", root / "adapter", root / "merged"
    model = make_hf_model(base, seed=seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the factor PEFT initialises to zero
                p.normal_(0.0, 0.2)
    wrapped.save_pretrained(adapter, save_embedding_layers=False)
    merged_model = wrapped.merge_and_unload()
    merged_model.save_pretrained(merged_folder)
    merged = {n: t.detach().numpy().copy() for n, t in merged_model.state_dict().items()}
    return base, adapter, merged_folder, merged
