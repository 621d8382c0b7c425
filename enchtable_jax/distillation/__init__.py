"""Distillation of the safety vector: data (records -> chat-templated token batches with response-only
targets), then NTK-linearized fine-tuning of the aligned model on them."""
