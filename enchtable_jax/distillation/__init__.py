"""Distillation of the safety vector: NTK-linearized fine-tuning of the aligned model on harmful records
(through the shared training loop), written as a safety-vector folder (converters/safety_vector.py)."""
