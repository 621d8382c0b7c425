"""enchtable-jax: EnchTable safety-alignment transfer in JAX.

Python API (what the CLI calls): `load`, `save`, `save_orbax`, `apply`, `describe`, `Model`;
`load_nnx`, `Model.to_nnx` and `from_nnx`: the same model as a flax.nnx `CausalLM` and back;
`distill` (with `DistillOptions`) and `load_safety_vector`; `merge` (methods in `METHODS`; returns a `MergeResult`);
`finetune` (with `FinetuneOptions`): plain supervised fine-tuning into a new model folder;
`calibrate` (with `CalibrationOptions`) and `calibrated_merge`: the merge strength chosen on validation prompts;
`enchant`: distil or reuse a safety vector, then merge it (optionally calibrated; returns an `EnchantResult`);
`generate` and `evaluate` (more in `enchtable_jax.eval`); `gcg_attack`, the white-box jailbreak search;
`run_demo`, the miniature world end to end.

Importing the package asks JAX for one CPU device per core (`jax_num_cpu_devices`) when JAX has not started and
no count was chosen (XLA_FLAGS, JAX_NUM_CPU_DEVICES), so that `merge` from Python uses every core as the CLI does,
and, where the TPU runtime is installed, turns on JAX's persistent compilation cache in a user cache folder
(`use_compilation_cache` does it elsewhere, when called before the first computation).
"""

from enchtable_jax.kernels.compile_cache import use_compilation_cache, use_compilation_cache_on_tpu
from enchtable_jax.kernels.cpu_threads import use_every_core

use_every_core()  # one CPU device per core for the merge's decompositions, before anything starts JAX's backend
use_compilation_cache_on_tpu()  # TPU SVDs compile for minutes: once per machine and shape

from enchtable_jax.api import CausalLM, Model, apply, describe, from_nnx, load, load_nnx, save, save_orbax
from enchtable_jax.distillation.train import DistillOptions, distill
from enchtable_jax.converters.safety_vector import SafetyVector, load_safety_vector
from enchtable_jax.eval import evaluate, generate
from enchtable_jax.merging.methods import METHODS
from enchtable_jax.merging.pipeline import MergeResult, merge
from enchtable_jax.training.finetune import FinetuneOptions, finetune
from enchtable_jax.calibration import CalibrationOptions, calibrate
from enchtable_jax.attack import gcg_attack
from enchtable_jax.workflow import EnchantResult, calibrated_merge, enchant
from enchtable_jax.converters.orbax_io import is_orbax_checkpoint
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.demo import run_demo

__version__ = "0.1.0"

__all__ = ["CalibrationOptions", "CausalLM", "DistillOptions", "EnchantResult", "FinetuneOptions", "METHODS",
           "MergeResult", "Model", "ModelConfig", "SafetyVector", "apply", "calibrate", "calibrated_merge",
           "describe", "distill", "enchant", "evaluate", "finetune", "from_nnx", "gcg_attack", "generate",
           "is_orbax_checkpoint", "load", "load_nnx", "load_safety_vector", "merge", "run_demo", "save", "save_orbax",
           "use_compilation_cache", "__version__"]
