"""The demo: a seeded miniature world that shows safety transfer end to end (`enchtable demo`)."""

from enchtable_jax.demo.run import run_demo

__all__ = ["run_demo"]
