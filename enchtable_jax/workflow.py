"""One-call workflows composed of the stages: a merge at a calibrated strength, and `enchant` (distil or reuse
a safety vector, then merge it with EnchTable, optionally calibrated). What `enchtable merge --calibrate` and
`enchtable enchant` run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from enchtable_jax.calibration import CalibrationOptions, calibrate, calibration_files
from enchtable_jax.converters.outputs import check_output, template_input
from enchtable_jax.converters.hf import DEFAULT_SHARD_SIZE
from enchtable_jax.converters.safety_vector import MANIFEST
from enchtable_jax.distillation.train import DistillOptions, distill, resumable
from enchtable_jax.errors import EnchtableError
from enchtable_jax.eval.judge import Judge
from enchtable_jax.merging.methods import MERGE_OPTIONS, check_strength, method_options
from enchtable_jax.merging.pipeline import MergeResult, ModelLike, merge
from enchtable_jax.merging.sources import open_model
from enchtable_jax.models.identity import WeightsDigest, config_digest
from enchtable_jax.models.model import Model
from enchtable_jax.options import check_values


def calibrated_merge(method: str, base: ModelLike, task: ModelLike, harmful_prompts: Sequence[str],
                     benign_prompts: Sequence[str], out: str | Path, *, safety_vector: str | Path | None = None,
                     aligned: ModelLike | None = None, harmful: ModelLike | None = None,
                     reference: ModelLike | None = None, calibration: CalibrationOptions = CalibrationOptions(),
                     judge: Judge | None = None, overwrite: bool = False, seed: int = 0, shard_size: int | str = DEFAULT_SHARD_SIZE,
                     progress: bool | None = None, log: Callable[[str], None] = lambda _: None,
                     **method_options: Any) -> tuple[dict[str, Any], MergeResult]:
    """Calibrate `method`'s strength on the two validation prompt sets (see `calibration`), merge at the chosen
    strength into the HF folder `out`, and add `calibration.json` and `calibration.png` to it; returns the
    calibration record and the merge's `MergeResult`. `out` is checked against the inputs before any work, and the
    calibration files are written into it before it is published."""
    out = check_output(out, {"--base": base, "--task": task, "--safety-vector": safety_vector, "--aligned": aligned,
                             "--harmful": harmful, "reference": reference,
                             "--judge-model": getattr(judge, "model", None)}, overwrite)
    record = calibrate(method, base, task, harmful_prompts, benign_prompts, safety_vector=safety_vector,
                       aligned=aligned, harmful=harmful, reference=reference, options=calibration, judge=judge, seed=seed,
                       progress=progress, log=log, **method_options)
    strength = {record["parameter"]: record["chosen"]}
    result = merge(method, base, task, aligned=aligned, harmful=harmful, safety_vector=safety_vector, out=out,
                   seed=seed, overwrite=overwrite, shard_size=shard_size, progress=progress,
                   extra_files=calibration_files(record), **strength, **method_options)
    return record, result


@dataclasses.dataclass(frozen=True)
class EnchantResult:
    """What `enchant` made: the merge (its folder and report), the safety vector's folder, and the calibration
    record when β was calibrated (else None)."""

    merge: MergeResult
    safety_vector: Path
    calibration: dict[str, Any] | None = None

    @property
    def path(self) -> Path | None:
        return self.merge.path


def enchant(base: str | Path, task: ModelLike, out: str | Path, data: str | Path | None = None,
            aligned: str | Path | None = None, vector_dir: str | Path | None = None,
            options: DistillOptions | None = None, overwrite: bool = False, progress: bool | None = None,
            calibrate_on: tuple[Sequence[str], Sequence[str]] | None = None,
            calibration: CalibrationOptions = CalibrationOptions(), log: Callable[[str], None] = lambda _: None,
            **merge_options: Any) -> EnchantResult:
    """Distil a safety vector from `aligned` (another copy of `base`, e.g. an HF folder with the tokenizer when
    `base` is an orbax checkpoint; default: `base`) on harmful `data`, or reuse the finished one
    in `vector_dir` (default: OUT-safety-vector), then merge it into `task` with `enchtable`: at β from
    `merge_options` (default 0.1), or at the β calibrated on `calibrate_on` = (harmful prompts, harmless
    prompts) against the aligned model's refusal rates; returns what it made (`EnchantResult`). Both outputs
    (`out`, and `vector_dir` when it is distilled) are checked against the inputs and each other before any work."""
    check_merge_options("enchtable", merge_options)  # before any work: a bad option must not cost a distillation
    resolved = Path(out).expanduser().resolve()
    vector_dir = Path(vector_dir) if vector_dir is not None else resolved.with_name(resolved.name + "-safety-vector")
    inputs = {"--base": base, "--task": task, "--aligned": aligned, "--data": data,
              "--template": template_input(options.template if options is not None else None)}
    out = check_output(out, {**inputs, "--safety-vector": vector_dir}, overwrite)
    if not (vector_dir / MANIFEST).is_file():
        check_output(vector_dir, inputs, False, "--safety-vector", exists_ok=True)
    if aligned is not None:  # before distilling: the merge refuses a vector distilled from another model
        check_same_model(aligned, base)
    if not (vector_dir / MANIFEST).is_file():
        if data is None:
            raise EnchtableError(f"{vector_dir} holds no finished safety vector; pass harmful data (--data) to "
                                 "distil one")
        resume = resumable(vector_dir)
        distill(aligned if aligned is not None else base, data, vector_dir, options or DistillOptions(),
                resume=resume, progress=progress)
    if calibrate_on is not None:
        record, result = calibrated_merge("enchtable", base, task, *calibrate_on, out, safety_vector=vector_dir,
                                          reference=aligned if aligned is not None else base,
                                          calibration=calibration, overwrite=overwrite, progress=progress, log=log,
                                          **merge_options)
        return EnchantResult(result, vector_dir, record)
    result = merge("enchtable", base, task, safety_vector=vector_dir, out=out, overwrite=overwrite,
                   progress=progress, **merge_options)
    return EnchantResult(result, vector_dir)


def check_merge_options(method: str, merge_options: dict[str, Any]) -> None:
    """Refuse an unknown `method`, an option it does not have and a value out of range, as `merge` would (its
    own keyword arguments, α, β and seed included), without reading any model."""
    import inspect

    own = set(inspect.signature(merge).parameters)
    method_options(method, {k: v for k, v in merge_options.items() if k not in own})
    check_values(MERGE_OPTIONS, **{k: merge_options[k] for k in ("alpha", "beta", "seed") if k in merge_options})
    check_strength(method, merge_options.get("alpha"), merge_options.get("beta"))


def check_same_model(aligned: ModelLike, base: ModelLike) -> None:
    """Refuse an `aligned` model that is not `base` (same config and weights; another copy or format is fine).

    In EnchTable the aligned model is the one the task model was fine-tuned from: the safety vector distilled
    from it is merged onto that base, and the merge refuses a vector made from another model. So `enchant`
    checks this before distilling. Reads both models once (hashing, as the merge's own check does).
    """
    if not isinstance(aligned, Model) and not isinstance(base, Model) and \
            Path(aligned).expanduser().resolve() == Path(base).expanduser().resolve():
        return
    a, b = open_model(aligned, "aligned"), open_model(base, "base")
    differs = None
    if a.config.model_type != b.config.model_type or config_digest(a.config) != config_digest(b.config):
        differs = "their config.json differ"
    elif a.specs != b.specs:
        differs = "their tensors differ in names, shapes or dtypes"
    else:
        digests = WeightsDigest(), WeightsDigest()
        for name in sorted(a.specs):
            digests[0].update(name, a.read(name))
            digests[1].update(name, b.read(name))
        if digests[0].hexdigest() != digests[1].hexdigest():
            differs = "their weights differ"
    if differs is not None:
        raise EnchtableError(
            f"--aligned {a.folder} is not the model --base {b.folder} ({differs}): EnchTable distils the safety "
            "vector from the aligned model the task model was fine-tuned from and merges it onto that same model, "
            "so that model is --base; --aligned may only name another copy of it (e.g. an HF folder with its "
            "tokenizer when --base is an orbax checkpoint). To use a different aligned model as the safety "
            "source, distil it with `enchtable distill --model A --export-harmful H` and merge with "
            "`enchtable merge --aligned A --harmful H`")
