"""Supervised training on chat records: the loop that `distill` and `finetune` share (loop.py), its data
(records -> batches, data.py) and resumable checkpoints (checkpoint.py), and plain fine-tuning of a model
folder into a new one (finetune.py)."""
