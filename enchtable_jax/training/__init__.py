"""Supervised training on chat records: the loop that `distill` runs (loop.py)."""
