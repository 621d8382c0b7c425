"""Merging the safety vector into a downstream model: the method registry, the streaming and sharded
executor, and the report."""
