"""`enchtable` command line: thin wrappers over the Python API, one subcommand per stage."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from enchtable_jax import api
from enchtable_jax.converters.outputs import check_output, template_input
from enchtable_jax.converters.hf import DEFAULT_SHARD_SIZE, parse_size
from enchtable_jax.converters.orbax_io import is_orbax_checkpoint
from enchtable_jax.errors import EnchtableError, storage_error
from enchtable_jax.merging.methods import DEFAULT_BETA, check_strength
from enchtable_jax.merging.report import alpha_text
from enchtable_jax.models.init import PRESETS, init_params, preset_config
from enchtable_jax.nonfinite import ALLOW_HINT, NonFiniteError
from enchtable_jax.options import MAX_SEEDS, SEED, parse_seeds


def _convert(args: argparse.Namespace) -> None:
    src = Path(args.src)
    if src.is_file():
        _convert_gguf(args)
        return
    to_hf = is_orbax_checkpoint(src)
    # refuse bad requests before reading anything
    check_output(args.dst, {"src": src, "--like": args.like}, args.overwrite, "dst")
    parse_size(args.shard_size)
    if args.like is not None and not to_hf:
        raise EnchtableError("--like applies to orbax -> HF conversion; an HF source brings its own files")
    start = time.perf_counter()
    model = api.load(src, dtype=args.dtype)
    if to_hf:
        out = api.save(model, args.dst, like=args.like, shard_size=args.shard_size, overwrite=args.overwrite)
        what = "HF folder"
    else:
        out = api.save_orbax(model, args.dst, overwrite=args.overwrite)
        what = "orbax checkpoint"
    print(f"wrote {what} {out} ({len(model.params)} tensors) in {time.perf_counter() - start:.1f}s")


def _convert_gguf(args: argparse.Namespace) -> None:
    """A GGUF file -> an HF folder, dequantized (to float32 unless --dtype)."""
    from enchtable_jax.converters.gguf import gguf_to_hf, is_gguf_file

    if not is_gguf_file(args.src):
        raise EnchtableError(f"{args.src}: not a GGUF file; a source is an HF folder, an orbax checkpoint or a GGUF "
                             "file")
    if args.like is not None:
        raise EnchtableError("--like applies to orbax -> HF conversion; a GGUF file brings its own tokenizer")
    check_output(args.dst, {"src": args.src}, args.overwrite, "dst")
    parse_size(args.shard_size)
    start = time.perf_counter()
    out = gguf_to_hf(args.src, args.dst, dtype=args.dtype or "float32", overwrite=args.overwrite,
                     shard_size=args.shard_size)
    print(f"wrote HF folder {out} from GGUF in {time.perf_counter() - start:.1f}s")


def _info(args: argparse.Namespace) -> None:
    info = api.describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "files":
            value = ", ".join(f"{f['file']} ({f['bytes'] / 1e6:.1f} MB)" for f in value)
        elif key == "dtypes":
            value = ", ".join(f"{k}: {v:,} params" for k, v in value.items())
        elif key == "parameters":
            value = f"{value:,}"
        elif key == "extra_tensors":
            value = ", ".join(value) if value else "none"
        print(f"{key:<{width}}  {value}")


def _init(args: argparse.Namespace) -> None:
    import tempfile

    from enchtable_jax.models.tokenizer import byte_level_tokenizer

    check_output(args.dst, None, args.overwrite, "dst")
    config = preset_config(args.preset, args.arch)
    model = api.Model(config, init_params(config, seed=args.seed, dtype=args.dtype))
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # a byte-level tokenizer with a ChatML template
        byte_level_tokenizer().save_pretrained(tokenizer_dir)
        out = api.save(model, args.dst, like=tokenizer_dir, overwrite=args.overwrite)
    print(f"wrote a random {args.arch} model of preset {args.preset!r} (byte-level tokenizer, ChatML) to {out}")


def _distill_options(args: argparse.Namespace, options_type: type | None = None):
    """The training options of the flags `_add_training_options` made: DistillOptions, or `options_type`
    (FinetuneOptions, which has no `linearized`)."""
    from enchtable_jax.distillation.train import DistillOptions

    return _options_from(args, options_type or DistillOptions, _TRAINING_DESTS)


def _initialize_distributed(args: argparse.Namespace) -> None:
    """Join a multi-process run (jax.distributed) when --coordinator is given."""
    if args.coordinator:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=args.init_timeout)


def _distill(args: argparse.Namespace) -> None:
    import jax

    from enchtable_jax.distillation.train import distill

    _initialize_distributed(args)
    options = _distill_options(args)
    manifest = distill(args.model, args.data, args.out, options, resume=args.resume, overwrite=args.overwrite,
                       export_harmful=args.export_harmful, allow_nonfinite=args.allow_nonfinite)
    if jax.process_index() != 0:
        return
    print(f"safety vector: {args.out}  (scope {manifest['scope']['name']}, {len(manifest['scope']['tensors'])} "
          f"tensors)\n{_training_summary(manifest)}")


def _training_summary(record: dict) -> str:
    """The data and training lines of a distill or finetune record."""
    data, training = record["data"], record["training"]
    return (f"  data: {data['n_examples']} examples from {data['n_records']} records, {data['n_truncated']} "
            f"truncated to {training['max_length']} tokens, {data['n_dropped']} dropped\n  training: "
            f"{training['total_steps']} steps on {training['devices']} device(s), final loss "
            f"{training['final_loss']:.4f}")


def _finetune(args: argparse.Namespace) -> None:
    import jax

    from enchtable_jax.training.finetune import FinetuneOptions, finetune

    _initialize_distributed(args)
    record = finetune(args.model, args.data, args.out, _distill_options(args, FinetuneOptions), resume=args.resume,
                      overwrite=args.overwrite, shard_size=args.shard_size, allow_nonfinite=args.allow_nonfinite)
    if jax.process_index() != 0:
        return
    print(f"fine-tuned model: {args.out}  (scope {record['scope']['name']}, {len(record['scope']['tensors'])} "
          f"tensors trained)\n{_training_summary(record)}")


def _method_options(args: argparse.Namespace) -> dict:
    """The method options given: --set NAME=VALUE (parsed as JSON values where possible) and the flags that
    `_add_method_flags` made from the registry."""
    from enchtable_jax.merging.methods import flag_options

    options = {}
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise EnchtableError(f"--set expects NAME=VALUE, got {item!r}")
        try:
            options[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[name.replace("-", "_")] = value
    for name in flag_options():  # a flag not given (None, or False for a switch): each method's default
        if getattr(args, name, None) not in (None, False):
            options[name] = getattr(args, name)
    return options


def _list_methods() -> None:
    from enchtable_jax.merging.methods import METHODS

    for method in METHODS.values():
        alpha = (f"adaptive α (β = {DEFAULT_BETA})" if method.adaptive_alpha else "fixed α (default 1)" if method.uses_alpha
                 else "no α")
        print(f"{method.name}: {method.summary}; {alpha}")
        for name, option in method.options.items():
            print(f"    {name} = {option.default!r}: {option.help}")


def _merge(args: argparse.Namespace) -> None:
    import jax

    from enchtable_jax.merging.pipeline import merge

    if args.list:
        _list_methods()
        return
    missing = [f for f in ("method", "base", "task", "out") if getattr(args, f) is None]
    if missing:
        raise EnchtableError(f"merge needs --{', --'.join(missing)} (or --list)")
    if not args.calibrate:  # --calibrate refuses both itself
        check_strength(args.method, args.alpha, args.beta, ("--alpha", "--beta"))
    elif args.no_decomposition_cache or args.adapter_out:
        flag = "--no-decomposition-cache" if args.no_decomposition_cache else "--adapter-out"
        raise EnchtableError(f"{flag} applies to a plain merge, not with --calibrate")
    if (args.safety_vector is None) == (args.aligned is None or args.harmful is None):
        raise EnchtableError("give either --safety-vector, or both --aligned and --harmful")
    check_output(args.out, {f"--{k.replace('_', '-')}": getattr(args, k) for k in
                            ("base", "task", "safety_vector", "aligned", "harmful", "calibrate")}, args.overwrite)
    _initialize_distributed(args)
    if args.calibrate:
        from enchtable_jax.workflow import calibrated_merge

        harmful_val, benign_val, calibration = _calibration(args)
        record, result = calibrated_merge(args.method, args.base, args.task, harmful_val, benign_val, args.out,
                                          safety_vector=args.safety_vector, aligned=args.aligned,
                                          harmful=args.harmful, calibration=calibration, overwrite=args.overwrite,
                                          seed=args.seed, shard_size=args.shard_size, log=print,
                                          **_method_options(args))
        _print_calibration(record)
    else:
        result = merge(args.method, args.base, args.task, aligned=args.aligned, harmful=args.harmful,
                       safety_vector=args.safety_vector, out=args.out, alpha=args.alpha, beta=args.beta,
                       seed=args.seed, overwrite=args.overwrite, shard_size=args.shard_size,
                       allow_nonfinite=args.allow_nonfinite, cache_decomposition=not args.no_decomposition_cache,
                       adapter_out=args.adapter_out, adapter_rank=args.adapter_rank, **_method_options(args))
    if jax.process_index() != 0:  # process 0 writes the folder and reports
        return
    report = result.report
    print(f"merged {report['merged']} tensors with {report['method']} ({alpha_text(report)}), copied "
          f"{report['skipped']} unchanged, in {report['seconds']:.1f}s on {report['devices']} device(s); peak RSS "
          f"{report['peak_rss_bytes'] / 2**30:.2f} GiB -> {args.out}")
    if "adapter" in report:
        captured = report["adapter"]["captured_min"]
        print(f"adapter with rank-{args.adapter_rank} safety corrections -> {report['adapter']['folder']}"
              + ("" if captured is None else f" (each carries >= {captured:.1%} of its correction's energy)"))


def _check_new_tokens(model: str | None, max_new_tokens: int, flag: str) -> None:
    """Refuse more new tokens than the context of `model` (its config.json) holds, before any work."""
    from enchtable_jax.eval.generate import check_max_new_tokens
    from enchtable_jax.models.config import ModelConfig

    config = Path(model or "").expanduser() / "config.json"
    if model is not None and config.is_file():  # a missing config is reported where the model is loaded
        check_max_new_tokens(ModelConfig.from_file(config), max_new_tokens, flag, str(config))


def _calibration(args: argparse.Namespace):
    """(harmful prompts, harmless prompts, CalibrationOptions) from --calibrate and its companions."""
    from enchtable_jax.calibration import CalibrationOptions
    from enchtable_jax.eval.prompts import load_prompts

    if args.alpha is not None or args.beta is not None:
        raise EnchtableError("--calibrate chooses the strength itself; drop --alpha/--beta")
    _check_new_tokens(args.aligned or args.base, args.calibrate_max_new_tokens, "--calibrate-max-new-tokens")
    options = _options_from(args, CalibrationOptions)  # --calibrate-grid, checked at parse time, is parsed here
    harmful_val, benign_val = (load_prompts(path, limit=options.limit) for path in args.calibrate)
    return harmful_val, benign_val, options


def _print_calibration(record: dict) -> None:
    symbol = {"beta": "β", "alpha": "α"}[record["parameter"]]
    print(f"calibrated {symbol} = {record['chosen']:g} ({'target met' if record['met'] else 'TARGET NOT MET'}: "
          f"{record['why']}); calibration.json and calibration.png in the output folder")


def _enchant(args: argparse.Namespace) -> None:
    from enchtable_jax.calibration import CalibrationOptions
    from enchtable_jax.workflow import enchant

    check_output(args.out, {**{f"--{k.replace('_', '-')}": getattr(args, k) for k in
                               ("base", "task", "safety_vector", "aligned", "data", "calibrate")},
                 "--template": template_input(args.template)}, args.overwrite)
    if not args.calibrate:  # --calibrate refuses both itself
        check_strength("enchtable", args.alpha, args.beta, ("--alpha", "--beta"))  # before distilling
    calibrate_on, calibration, strength = None, CalibrationOptions(), {"alpha": args.alpha, "beta": args.beta}
    if args.calibrate:
        harmful_val, benign_val, calibration = _calibration(args)
        calibrate_on, strength = (harmful_val, benign_val), {}
    result = enchant(args.base, args.task, args.out, data=args.data, aligned=args.aligned,
                     vector_dir=args.safety_vector, options=_distill_options(args), overwrite=args.overwrite,
                     seed=args.seed, shard_size=args.shard_size, calibrate_on=calibrate_on, calibration=calibration,
                     log=print, **strength, **_method_options(args))
    if result.calibration is not None:
        _print_calibration(result.calibration)
    report = result.merge.report
    print(f"enchanted {args.task} -> {result.path}: {report['merged']} tensors merged ({alpha_text(report)})")


def _eval_judge(args: argparse.Namespace):
    from enchtable_jax.eval.judge import LLMJudge, RefusalJudge

    if args.judge_model is not None:
        return LLMJudge.from_folder(args.judge_model, args.judge_recipe)
    return RefusalJudge()


def _eval_report(args: argparse.Namespace) -> None:
    from enchtable_jax.eval.judge import refusal_report

    if args.labels is None:
        raise EnchtableError("--judge-report needs --labels CSV: human-labelled responses with columns objective, "
                             "assistant_response, human_score (1 = refusal); e.g. shared/data/refusal_labels.csv")
    report = refusal_report(_eval_judge(args), args.labels)
    c = report["confusion"]
    print(f"judge {report['judge']} on {report['n']} labelled responses ({report['labels']})\n"
          f"  accuracy {report['accuracy']:.3f}  precision {report['precision']:.3f}  recall {report['recall']:.3f}"
          f"  (positive = refusal)\n"
          f"  confusion: refusal->refusal {c['refusal_called_refusal']}, answer->refusal {c['answer_called_refusal']}, "
          f"refusal->answer {c['refusal_called_answer']}, answer->answer {c['answer_called_answer']}")
    for error in report["errors"]:
        label = "refusal" if error["labelled_refusal"] else "answer"
        print(f"  row {error['row']}: labelled {label}, judged otherwise: {error['response'][:90]!r}")


def _set_names(paths: list[str]) -> list[str]:
    """Names of evaluation sets: file stems, made unique with a counter."""
    names: list[str] = []
    for path in paths:
        stem, k = Path(path).stem, 2
        name = stem
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def _safedecoding(args: argparse.Namespace):
    """SafeDecoding's options from --safedecoding-* for --defense safedecoding, else None; --expert and those options
    are refused without it, and it without --expert."""
    from enchtable_jax.options import SafeDecodingOptions

    options = _options_from(args, SafeDecodingOptions)
    if args.defense == "safedecoding":
        if args.expert is None:
            raise EnchtableError("--defense safedecoding needs --expert DIR: a safety expert model with the model's "
                                 "tokenizer")
        return options
    if args.expert is not None:
        raise EnchtableError("--expert is read only with --defense safedecoding; add it, or drop --expert")
    if options != SafeDecodingOptions():
        raise EnchtableError("--safedecoding-* options are read only with --defense safedecoding")
    return None


def _eval(args: argparse.Namespace) -> None:
    from enchtable_jax.eval.jailbreaks import load_templates
    from enchtable_jax.eval.metrics import HUMANEVAL_FIELDS
    from enchtable_jax.eval.pipeline import RESULT_FILE, evaluate, summary_table
    from enchtable_jax.eval.prompts import load_prompts, load_records

    if args.judge_report:
        _eval_report(args)
        return
    if args.labels is not None:
        raise EnchtableError("--labels is read only with --judge-report (it scores the judge against human labels); "
                             "add --judge-report, or drop --labels")
    missing = [f for f in ("model", "out") if getattr(args, f) is None]
    if missing:
        raise EnchtableError(f"eval needs --{', --'.join(missing)} (or --judge-report --labels CSV)")
    if args.suffixes is not None and not args.prompts:
        raise EnchtableError("--suffixes replays attack suffixes on the --prompts sets; give at least one --prompts "
                             "FILE")
    prompts, qa, humaneval = args.prompts or [], args.qa or [], args.humaneval or []
    if not (prompts or qa or humaneval):
        raise EnchtableError("eval needs at least one of --prompts FILE, --qa FILE.jsonl, --humaneval FILE.jsonl")
    if args.jailbreak_templates is not None and not prompts:
        raise EnchtableError("--jailbreak-templates wraps the --prompts sets; give at least one --prompts FILE")
    if args.limit_templates is not None and args.jailbreak_templates is None:
        raise EnchtableError("--limit-templates is read only with --jailbreak-templates PATH; add it, or drop "
                             "--limit-templates")
    _check_new_tokens(args.model, args.max_new_tokens, "--max-new-tokens")
    safedecoding = _safedecoding(args)
    check_output(Path(args.out) / RESULT_FILE, {"--model": args.model, "--tokenizer": args.tokenizer, "--prompts": prompts,
                 "--qa": qa, "--humaneval": humaneval, "--judge-model": args.judge_model,
                 "--template": template_input(args.template), "--jailbreak-templates": args.jailbreak_templates},
                 args.overwrite, file=True)
    jailbreaks = None
    if args.jailbreak_templates is not None:
        jailbreaks = load_templates(args.jailbreak_templates, args.limit_templates)
        print(f"jailbreak templates: {len(jailbreaks.templates)} from {args.jailbreak_templates}, "
              f"{len(jailbreaks.skipped)} skipped (eval.json lists them)")
        for file, reason in jailbreaks.skipped[:3]:
            print(f"  skipped {file}: {reason}")
    names = iter(_set_names([*prompts, *qa, *humaneval]))
    result = evaluate(
        args.model, args.tokenizer,
        {next(names): load_prompts(p, args.limit) for p in prompts},
        qa_sets={next(names): load_records(p, ("question", "answer"), args.limit) for p in qa},
        humaneval_sets={next(names): load_records(p, HUMANEVAL_FIELDS, args.limit) for p in humaneval},
        judge=_eval_judge(args), suffixes=args.suffixes, max_new_tokens=args.max_new_tokens, template=args.template,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
        defense=args.defense, expert=args.expert, safedecoding=safedecoding,
        timeout=args.timeout, out=args.out, overwrite=args.overwrite, jailbreak_templates=jailbreaks)
    print(summary_table(result))
    print(f"wrote {Path(args.out).resolve() / RESULT_FILE}")


def _attack(args: argparse.Namespace) -> None:
    from enchtable_jax.attack import gcg_attack
    from enchtable_jax.eval.prompts import load_prompts
    from enchtable_jax.eval.suffixes import ATTACK_FILE
    from enchtable_jax.options import GCGOptions

    options = _options_from(args, GCGOptions)
    _check_new_tokens(args.model, options.max_new_tokens, "--max-new-tokens")
    check_output(Path(args.out) / ATTACK_FILE, {"--model": args.model, "--tokenizer": args.tokenizer,
                 "--prompts": args.prompts, "--judge-model": args.judge_model,
                 "--template": template_input(args.template)}, args.overwrite, file=True)
    prompts = load_prompts(args.prompts, args.limit)
    result = gcg_attack(args.model, args.tokenizer, prompts, options=options, judge=_eval_judge(args),
                        template=args.template, out=args.out, overwrite=args.overwrite)
    for record in result["prompts"]:
        print(f"{'BROKEN' if record['broken'] else 'held  '}  loss {record['loss_curve'][0]:.3f} -> "
              f"{record['final_loss']:.3f} in {record['steps']} steps ({record['stopped']})  {record['prompt'][:60]!r}")
    print(f"attack success rate {result['broken']}/{result['n']} = {result['attack_success_rate']:.3f} (judge "
          f"{result['judge']}, {result['seconds']:.1f}s)\nwrote {Path(args.out).resolve() / ATTACK_FILE}")


def _demo(args: argparse.Namespace) -> None:
    from enchtable_jax.demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick, overwrite=args.overwrite, seeds=_seeds(args.seeds))


def _seeds(text: str | None) -> list[int] | None:
    """`0-4` or `0,2,7` (or a mix: `0-2,9`) as a list of seeds (options.parse_seeds)."""
    return None if text is None else parse_seeds(text)


def _seeds_type(text: str) -> str:
    """argparse `type=` of --seeds: checked at parse time (exit 2, one line), kept as text for _seeds."""
    try:
        parse_seeds(text)
    except EnchtableError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--seeds ").removeprefix("option --seeds ")) from None
    return text


def _ranged(p: argparse.ArgumentParser, flag: str, range_, help: str | None = None, **kwargs) -> None:
    """A numeric flag parsed and checked by the `Range` declared with the option (options.py): an out-of-range
    value or NaN exits 2 at parse time naming the flag and the range, which --help also shows."""
    p.add_argument(flag, type=range_.arg_type(flag), help=range_.help(help), **kwargs)


def _checked(check: Callable[[str], object]) -> Callable[[str], str]:
    """argparse type of an option checked at parse time by `check` (its ValueError is the message) and passed on
    as written."""
    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse


def _parse_grid(text: str) -> object:
    """The calibration grid's parser, imported late (calibration pulls in evaluation)."""
    from enchtable_jax.calibration import parse_grid

    return parse_grid(text)


_shard_size = _checked(parse_size)  # --shard-size
_calibrate_grid = _checked(_parse_grid)  # --calibrate-grid: positive finite strengths


def _add_nonfinite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept input tensors holding NaN or Inf (refused by default, naming file and tensor); the "
                        "output is still checked, and a NaN or Inf in it is an error")


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    from enchtable_jax.merging.methods import MERGE_OPTIONS

    _ranged(p, "--alpha", MERGE_OPTIONS["alpha"], "fixed scale of the safety delta")
    _ranged(p, "--beta", MERGE_OPTIONS["beta"],
            f"adaptive scale: α = β·‖τ_task‖/‖τ_safe‖ (enchtable default {DEFAULT_BETA})")
    _add_method_flags(p)
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="any other method option (repeatable; checked against the method's declared ranges)")
    _ranged(p, "--seed", MERGE_OPTIONS["seed"], "seed of random methods (dare)", default=0)
    p.add_argument("--shard-size", type=_shard_size, default=DEFAULT_SHARD_SIZE,
                   help="largest safetensors shard of the output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per method option declared with a flag (merging.methods), shared by the methods declaring it.
    Not given, it is None (a switch: False) and every method takes its own declared default, which the help
    names; given, it parses with the declared range or choices."""
    from enchtable_jax.merging.methods import flag_options

    for name, by_method in flag_options().items():
        flag, option = "--" + name.replace("_", "-"), next(iter(by_method.values()))
        text = "; ".join(f"{method}: {o.help}{_default_note(o.default)}" for method, o in by_method.items())
        if option.type is bool:
            if any(o.default for o in by_method.values()):
                raise AssertionError(f"method option {name} defaults to True: a --{name} switch could not turn it off")
            p.add_argument(flag, action="store_true", help=text)
        elif option.range is not None:
            _ranged(p, flag, option.range, text)
        else:
            p.add_argument(flag, choices=option.choices, help=text)


def _default_note(default: object) -> str:
    """' (default D)' for --help; nothing for a switch that is off or an option that is unset by default."""
    if default is None or isinstance(default, bool):
        return ""
    return f" (default {default:g})" if isinstance(default, (int, float)) else f" (default {default})"


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    from enchtable_jax.calibration import CalibrationOptions

    p.add_argument("--calibrate", nargs=2, metavar=("HARMFUL_VAL", "BENIGN_VAL"),
                   help="choose the strength (β for enchtable, else α) on these validation prompt files: the "
                        "smallest on the grid whose unsafe rate and over-refusal are within the tolerances of the "
                        "aligned model's (--aligned, else --base); writes calibration.json and calibration.png")
    _add_fields(p, CalibrationOptions(), types={"grid": _calibrate_grid})


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    from enchtable_jax.options import DISTRIBUTED_OPTIONS as r

    p.add_argument("--coordinator", help="multi-host: coordinator address HOST:PORT for jax.distributed")
    _ranged(p, "--num-processes", r["num_processes"], "multi-host: number of processes")
    _ranged(p, "--process-id", r["process_id"], "multi-host: this process's index")
    _ranged(p, "--init-timeout", r["init_timeout"], "multi-host: seconds to wait for all processes", default=300)


# Training fields whose namespace name is not the field's: enchant also has merge's --seed.
_TRAINING_DESTS = {"seed": "distill_seed"}


def _add_training_options(p: argparse.ArgumentParser, options_type: type, seed_flag: str = "--seed") -> None:
    """One flag per field of `options_type` (DistillOptions or FinetuneOptions), as declared beside the field."""
    _add_fields(p, options_type(), flags={"seed": seed_flag}, dests=_TRAINING_DESTS)


def _cli_fields(options) -> list[dataclasses.Field]:
    """The fields of an options dataclass that have a flag; each must be declared with its help (options.option)."""
    fields = [f for f in dataclasses.fields(options) if f.metadata.get("cli", True)]
    for f in fields:
        if "help" not in f.metadata:
            raise AssertionError(f"{type(options).__name__}.{f.name} is not declared with options.option: no help "
                                 "for its flag (or cli=False)")
    return fields


def _field_dest(f: dataclasses.Field, dests: dict[str, str] | None) -> str:
    """Where the flag of field `f` puts its value: `dests[name]`, else what argparse derives from its flag."""
    if dests and f.name in dests:
        return dests[f.name]
    return (f.metadata["flag"] or f.name).lstrip("-").replace("-", "_")


def _add_fields(p: argparse.ArgumentParser, options, flags: dict[str, str] | None = None,
                dests: dict[str, str] | None = None, types: dict[str, Callable] | None = None) -> None:
    """A flag for each field of the options dataclass instance `options` (its values are the defaults), made from
    the field's declaration: --FIELD-NAME or its declared flag (a command's own in `flags`), its range or choices,
    default and help; a bool field is a switch that flips its default. `types`: the parser of a field that is
    neither a number nor a choice (checked at parse time, converted by the dataclass)."""
    for f in _cli_fields(options):
        default, declared = getattr(options, f.name), f.metadata
        flag = (flags or {}).get(f.name) or declared["flag"] or "--" + f.name.replace("_", "-")
        kwargs = {"dest": _field_dest(f, dests)}
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=declared["help"], **kwargs)
        elif "range" in declared:
            _ranged(p, flag, declared["range"], declared["help"] + _default_note(default), default=default, **kwargs)
        else:
            p.add_argument(flag, default=default, choices=declared["choices"], metavar=declared["metavar"],
                           type=(types or {}).get(f.name), help=declared["help"] + _default_note(default), **kwargs)


def _options_from(args: argparse.Namespace, options_type: type, dests: dict[str, str] | None = None):
    """`options_type` from the flags `_add_fields` made for it (a switch given flips the field's default)."""
    defaults = options_type()
    values = {}
    for f in _cli_fields(defaults):
        value, default = getattr(args, _field_dest(f, dests)), getattr(defaults, f.name)
        values[f.name] = (not default if value else default) if isinstance(default, bool) else value
    return options_type(**values)


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line, `enchtable CMD: error: ...` and exit 2, like every other refusal (the
    full usage is what --help is for). Subparsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    """The `enchtable` parser: one subcommand per stage, each built by its own function below."""
    parser = _Parser(
        prog="enchtable",
        description="EnchTable in JAX: transfer safety alignment into fine-tuned LLMs. "
                    "Models are Hugging Face folders or enchtable orbax checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_convert, _add_info, _add_init, _add_distill, _add_finetune, _add_merge, _add_enchant, _add_eval,
                _add_attack, _add_demo):
        add(sub)
    return parser


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF folder <-> orbax checkpoint, or GGUF file -> HF folder",
                       description="Convert between an HF model folder (safetensors or .bin) and an orbax "
                                   "checkpoint, or a GGUF file into an HF folder (dequantized, with its tokenizer "
                                   "and chat template; needs pip install 'enchtable-jax[gguf]'). The direction "
                                   "follows the source.")
    p.add_argument("src", help="HF model folder, enchtable orbax checkpoint or GGUF file")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--like", help="orbax -> HF: folder whose tokenizer/chat-template files to copy "
                                  "(default: those stored in the checkpoint)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast floating tensors (default: keep; GGUF: float32)")
    p.add_argument("--shard-size", type=_shard_size, default=DEFAULT_SHARD_SIZE,
                   help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_convert)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameter count, dtypes and shards of a model",
                       description="Describe a model folder or checkpoint from its headers, without loading weights.")
    p.add_argument("path", help="HF model folder or enchtable orbax checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)


def _add_init(sub) -> None:
    from enchtable_jax.options import INIT_OPTIONS

    p = sub.add_parser("init", help="write a randomly initialised model of a built-in shape (demos, tests, speed)",
                       description="Write an HF folder holding a random model of a preset shape, with a byte-level "
                                   "tokenizer and a ChatML chat template.")
    p.add_argument("dst", help="output folder")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    _ranged(p, "--seed", INIT_OPTIONS["seed"], default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_init)


def _add_distill(sub) -> None:
    from enchtable_jax.distillation.train import DistillOptions

    p = sub.add_parser("distill", help="distil a safety vector: NTK-linearized fine-tuning on harmful data",
                       description="Fine-tune the aligned model's scope on harmful instruction->response data in the "
                                   "NTK-linearized regime and write the safety vector tau = theta_aligned - theta_harm.")
    p.add_argument("--model", required=True, help="aligned model: HF folder or orbax checkpoint (with tokenizer)")
    p.add_argument("--data", required=True, help="harmful data: JSON/JSONL, alpaca (instruction/input/output) or "
                                                 "chat (messages)")
    p.add_argument("--out", required=True, help="safety-vector folder")
    _add_training_options(p, DistillOptions)
    p.add_argument("--resume", action="store_true", help="continue a killed run of --out from its newest "
                   "checkpoint (it trains in the hidden .OUT.partial beside OUT, or OUT/checkpoints once "
                   "published); a run killed while replacing OUT: --resume --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (at the end) and discard an "
                   "interrupted run of it")
    p.add_argument("--export-harmful", metavar="DIR", help="also write theta_harm as an HF folder")
    _add_nonfinite_option(p)
    _add_distributed_options(p)
    p.set_defaults(func=_distill)


def _add_finetune(sub) -> None:
    from enchtable_jax.training.finetune import FinetuneOptions

    p = sub.add_parser("finetune", help="plain supervised fine-tuning into a new model folder (task models, harmful "
                                        "surrogates)",
                       description="Fine-tune a model on instruction->response data (the chat template, loss on the "
                                   "responses; every tensor unless --scope/--layers) and write the result as an HF "
                                   "folder with finetune.json and loss.png. Checkpoints go to OUT-checkpoints until "
                                   "the folder is written; --resume continues a killed run.")
    p.add_argument("--model", required=True, help="HF folder or orbax checkpoint (with tokenizer)")
    p.add_argument("--data", required=True, help="training data: JSON/JSONL, alpaca (instruction/input/output) or "
                                                 "chat (messages)")
    p.add_argument("--out", required=True, help="output HF folder")
    _add_training_options(p, FinetuneOptions)
    _add_nonfinite_option(p)
    p.add_argument("--resume", action="store_true", help="continue the run from OUT-checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and discard unfinished "
                                                             "checkpoints")
    p.add_argument("--shard-size", type=_shard_size, default=DEFAULT_SHARD_SIZE,
                   help="largest safetensors shard of the output")
    _add_distributed_options(p)
    p.set_defaults(func=_finetune)


def _add_merge(sub) -> None:
    from enchtable_jax.merging.adapter_out import ADAPTER_RANK, DEFAULT_ADAPTER_RANK

    p = sub.add_parser("merge", help="merge a safety vector into a fine-tuned model (EnchTable or a baseline)",
                       description="Merge tau_safe (a safety vector, or aligned - harmful) into the task model. "
                                   "`enchtable merge --list` shows the methods and their options.")
    p.add_argument("--list", action="store_true", help="list the merge methods and their options")
    p.add_argument("--method", help="merge method (see --list)")
    p.add_argument("--base", help="the model the task model was fine-tuned from")
    p.add_argument("--task", help="the fine-tuned (downstream) model, or a PEFT LoRA adapter folder trained on --base")
    p.add_argument("--safety-vector", help="safety-vector folder from `enchtable distill`")
    p.add_argument("--aligned", help="aligned model (with --harmful, instead of --safety-vector)")
    p.add_argument("--harmful", help="the aligned model after harmful fine-tuning")
    p.add_argument("--out", help="output HF folder")
    p.add_argument("--no-decomposition-cache", action="store_true",
                   help="do not store the safety vector's singular triplets beside it (by default the first "
                        "enchtable or tsv merge does, and later merges read them instead of decomposing again)")
    p.add_argument("--adapter-out", help="with a LoRA adapter as --task and enchtable: also write the merge as a PEFT "
                                         "adapter folder here (the task's factors beside a low-rank safety "
                                         "correction per matrix)")
    _ranged(p, "--adapter-rank", ADAPTER_RANK, "rank of each matrix's safety correction in --adapter-out",
            default=DEFAULT_ADAPTER_RANK)
    _add_merge_options(p)
    _add_nonfinite_option(p)
    _add_calibration_options(p)
    _add_distributed_options(p)
    p.set_defaults(func=_merge)


def _add_enchant(sub) -> None:
    from enchtable_jax.distillation.train import DistillOptions

    p = sub.add_parser("enchant", help="distil (or reuse) a safety vector, then merge it with EnchTable: one command",
                       description="Distil a safety vector from the aligned model on harmful data (or reuse a "
                                   "finished one), then merge it into the task model with the enchtable method.")
    p.add_argument("--base", required=True, help="the model the task model was fine-tuned from")
    p.add_argument("--task", required=True, help="the fine-tuned (downstream) model")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--aligned", help="model to distil from (default: --base)")
    p.add_argument("--data", help="harmful data for distillation (not needed when the vector exists)")
    p.add_argument("--safety-vector", help="where the safety vector is, or is written (default: OUT-safety-vector)")
    _add_training_options(p, DistillOptions, seed_flag="--distill-seed")
    _add_merge_options(p)
    _add_calibration_options(p)
    p.set_defaults(func=_enchant)


def _add_eval(sub) -> None:
    from enchtable_jax.eval.defenses import DEFENSES
    from enchtable_jax.options import EVAL_OPTIONS, SafeDecodingOptions

    p = sub.add_parser("eval", help="unsafe rate and utility of a model: generate, judge, score; or a judge's accuracy",
                       description="Generate answers (JAX, greedy by default, the model's chat template) to safety "
                                   "prompt sets and utility sets, judge and score them, write OUT/eval.json and print "
                                   "a summary. With --judge-report, measure the judge against human labels instead.")
    p.add_argument("--model", help="HF folder or orbax checkpoint (with tokenizer files)")
    p.add_argument("--prompts", action="append", metavar="FILE",
                   help="safety prompt set: JSON/JSONL list of strings or of objects with prompt/question/goal, or "
                        "nested {category: {sub: [...]}} (repeatable)")
    p.add_argument("--qa", action="append", metavar="FILE", help="question/answer JSONL (exact match; repeatable)")
    p.add_argument("--humaneval", action="append", metavar="FILE",
                   help="HumanEval-format JSONL: task_id, prompt, test, entry_point (pass@1; repeatable)")
    p.add_argument("--out", help="output folder for eval.json")
    _ranged(p, "--max-new-tokens", EVAL_OPTIONS["max_new_tokens"], default=128)
    _ranged(p, "--limit", EVAL_OPTIONS["limit"], "use the first N items of every set")
    _add_chat_inputs(p)
    _ranged(p, "--batch-size", EVAL_OPTIONS["batch_size"], "prompts per generation batch", default=16)
    _ranged(p, "--temperature", EVAL_OPTIONS["temperature"], "0: greedy decoding", default=0.0)
    _ranged(p, "--top-p", EVAL_OPTIONS["top_p"], "nucleus sampling mass (with --temperature > 0)", default=1.0)
    _ranged(p, "--seed", EVAL_OPTIONS["seed"], "sampling seed", default=0)
    _ranged(p, "--timeout", EVAL_OPTIONS["timeout"], "seconds per HumanEval program", default=10.0)
    p.add_argument("--defense", choices=DEFENSES,
                   help="inference-time defense for every generation: self-reminder (Xie et al. 2023: a system prompt "
                        "and a reminder after each query) or safedecoding (Xu et al. 2024: the first tokens steered "
                        "by --expert)")
    p.add_argument("--expert", metavar="DIR", help="SafeDecoding's safety expert: a model folder with the model's "
                                                   "tokenizer")
    _add_fields(p, SafeDecodingOptions())
    p.add_argument("--jailbreak-templates", metavar="PATH",
                   help="also answer every --prompts set with each prompt wrapped in each jailbreak template of a "
                        "YAML/JSON file or folder (PyRIT's format, {{ prompt }}); reports per-template unsafe rates "
                        "and the attack success rate")
    _ranged(p, "--limit-templates", EVAL_OPTIONS["limit_templates"], "use the first N jailbreak templates")
    _add_judge(p)
    p.add_argument("--judge-report", action="store_true",
                   help="print the judge's accuracy/precision/recall against --labels and exit")
    p.add_argument("--labels", metavar="CSV", help="human refusal labels for --judge-report "
                                                   "(objective, assistant_response, human_score)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/eval.json")
    p.add_argument("--suffixes", metavar="ATTACK_JSON",
                   help="also answer each --prompts prompt that has a suffix in this attack.json (`enchtable attack`, "
                        "on this or another model) with the suffix appended; prompts without one are skipped")
    p.set_defaults(func=_eval)


def _add_chat_inputs(p: argparse.ArgumentParser) -> None:
    """--template and --tokenizer: how a command that generates renders its prompts (eval, attack)."""
    p.add_argument("--template",
                   help="chat template instead of the tokenizer's: chatml, llama3, plain, or a .jinja file")
    p.add_argument("--tokenizer", help="folder with the tokenizer (default: the model's)")


def _add_judge(p: argparse.ArgumentParser) -> None:
    """--judge-model and --judge-recipe: who decides that an answer is unsafe (eval, attack)."""
    from enchtable_jax.eval.judge import RECIPES

    p.add_argument("--judge-model", metavar="DIR",
                   help="judge with a local LLM (HF folder) instead of refusal patterns")
    p.add_argument("--judge-recipe", default="llama-guard", choices=list(RECIPES),
                   help="prompt and parse rule of --judge-model")


def _add_attack(sub) -> None:
    from enchtable_jax.options import EVAL_OPTIONS, GCGOptions

    p = sub.add_parser("attack", help="white-box jailbreak: search an adversarial suffix per harmful prompt (GCG)",
                       description="Greedy coordinate gradient (Zou et al. 2023): per prompt, optimise a suffix that "
                                   "makes the model open its answer with --target, then answer prompt + suffix and "
                                   "judge it. Writes OUT/attack.json (suffixes, loss curves, answers, the attack "
                                   "success rate), which `enchtable eval --suffixes` replays on any model.")
    p.add_argument("--model", required=True, help="HF folder or orbax checkpoint (with tokenizer files)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="harmful prompts, in any shape `eval --prompts` "
                                                                    "reads")
    p.add_argument("--method", default="gcg", choices=["gcg"], help="the attack (default gcg)")
    p.add_argument("--out", required=True, help="output folder for attack.json")
    _add_fields(p, GCGOptions())
    _ranged(p, "--limit", EVAL_OPTIONS["limit"], "attack the first N prompts")
    _add_chat_inputs(p)
    _add_judge(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/attack.json")
    p.set_defaults(func=_attack)


def _add_demo(sub) -> None:
    from enchtable_jax.options import DEMO_OPTIONS

    p = sub.add_parser("demo", help="a seeded miniature world that shows safety transfer end to end (minutes, CPU)",
                       description="Build a word-level tokenizer and a tiny Llama, train base, aligned and task "
                                   "models, distil a safety vector, merge it back with every method, evaluate all of "
                                   "them on held-out prompts; writes the model folders, results.json and results.png "
                                   "into OUT and prints the table.")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    _ranged(p, "--seed", DEMO_OPTIONS["seed"], "seed of the world, the initialisation and the data order", default=0)
    p.add_argument("--seeds", metavar="0-4", type=_seeds_type,
                   help="run the world once per seed (ranges and lists: 0-4, 0,2,7) into OUT/seed-N and report the "
                        f"mean and spread of every score in OUT/seeds.json (at most {MAX_SEEDS} seeds, each "
                        f"{SEED.short()})")
    p.add_argument("--quick", action="store_true", help="a smaller model and shorter training (tests, a first look)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_demo)


def _ignore_abandoned_callbacks() -> None:
    """After a failed orbax/tensorstore read or write, tensorstore's threads still post completions to an asyncio
    loop orbax has closed; each prints an 'Event loop is closed' traceback (hundreds for a truncated checkpoint)
    after the one error line. Those and only those are dropped; every other unraisable exception still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "_enchtable", False):
        return

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._enchtable = True
    sys.unraisablehook = hook
    # orbax's background save/restore threads (and asyncio, for its abandoned tasks) log the disk-full, permission or damaged-file error they met (the one
    # main() then reports in one line) with its traceback, once per thread; a record whose exception is anything
    # else, or that carries no exception, still prints.
    for name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved" of an abandoned write
        logging.getLogger(name).addFilter(_drop_storage_tracebacks)
    warnings.filterwarnings("ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning)


def _drop_storage_tracebacks(record: logging.LogRecord) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    return e is None or (storage_error(e) is None and not isinstance(e, OSError))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _ignore_abandoned_callbacks()
    try:
        args.func(args)
    except (EnchtableError, OSError) as e:  # the user's input or environment; anything else is a bug: traceback
        line = error_line(e, args)
        if isinstance(e, NonFiniteError) and not hasattr(args, "allow_nonfinite"):  # a hint this command cannot take
            line = line.replace(ALLOW_HINT, f"enchtable {args.command} does not take --allow-nonfinite: a model with NaN or "
                                            "Inf weights is refused here; repair or re-export it")
        print(f"enchtable {args.command}: error: {line}", file=sys.stderr)
        return 2
    except ValueError as e:  # tensorstore's report of a failed file operation (disk full, damaged file)
        storage = storage_error(e)
        if storage is None:
            raise
        print(f"enchtable {args.command}: error: {error_line(storage, args)}", file=sys.stderr)
        return 2
    return 0


# errnos of a failed write: the output is the likely place when the error names no file
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


_STAGING = re.compile(r"/\.[^/]+\.(tmp|partial)")  # a hidden staging sibling of an output (converters.atomic)


def error_line(e: BaseException, args: argparse.Namespace | None = None) -> str:
    """One line for a user or environment error: an OSError as 'FILE: strerror', anything else its message."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror:
        filename, other = e.filename, e.filename2  # (source, destination) of a copy or rename
        if other is not None and e.errno in _WRITE_ERRNOS:
            filename, other = other, filename
        out = next((getattr(args, k) for k in ("out", "dst") if getattr(args, k, None)), None) if args else None
        if filename is None and e.errno in _WRITE_ERRNOS:
            filename = out
        text = e.strerror if filename is None else f"{os.fsdecode(filename)}: {e.strerror}"
        if filename is not None and out is not None and _STAGING.search(os.fsdecode(filename)):
            text = f"{out}: {e.strerror} (while writing {os.fsdecode(filename)}; nothing was published)"
        if other is not None:
            text += f" ({'copying from' if e.errno in _WRITE_ERRNOS else 'and'} {os.fsdecode(other)})"
    return " ".join(text.split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
