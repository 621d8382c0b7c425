"""Performance studies: `python -m enchtable_jax.bench`. Each study times implementations side by side."""
