"""White-box attacks that search adversarial inputs against a model: `gcg_attack` (greedy coordinate gradient).

The attack layer sits beside calibration: it uses the evaluation stage (rendering, generation, judges and the
attack.json format in `eval.suffixes`) and the models, and `enchtable attack`, the demo and the benchmarks use it.
"""

from enchtable_jax.attack.gcg import gcg_attack

__all__ = ["gcg_attack"]
