"""User and environment errors end a command in one line naming the file, field or option, with exit code 2;
genuine bugs keep their traceback (enchtable_jax.errors, cli.main).

Classes: permission (a read-only mount as root, where permission bits are ignored), disk full (a 64 KiB tmpfs),
an output path under a file, JSON of the wrong type, tampered orbax checkpoints on --resume, --max-new-tokens
beyond the context, a tokenizer without a pad token (Llama-2/3 ship without one), and `enchant --aligned` with a
model other than --base. Everything runs on the `enchtable init` tiny model (byte-level tokenizer).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enchtable_jax import cli
from enchtable_jax.cli import main
from enchtable_jax.errors import EnchtableError, MissingExtraError, storage_error

from cli_checks import TRAIN, fails_in_one_line


def succeeds(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def strip_pad_token(folder: Path) -> None:
    """Make a model folder's tokenizer and config like Llama-2/3's: an eos token but no pad token."""
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.loads((folder / "config.json").read_text())
    config.pop("pad_token_id", None)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models (base without a pad token, task, another model, a qwen2 model), harmful data, prompts, and a
    safety vector distilled from base with its checkpoints (do not modify)."""
    root = tmp_path_factory.mktemp("errors")
    for name, seed, arch in (("base", 0, "llama"), ("task", 1, "llama"), ("other", 2, "llama"),
                             ("qwen", 0, "qwen2")):
        assert main(["init", str(root / name), "--seed", str(seed), "--arch", arch]) == 0
    for name in ("base", "task", "other"):  # alike but for weights, so that only the weights tell them apart
        strip_pad_token(root / name)
    (root / "harm.jsonl").write_text("".join(json.dumps({"instruction": f"How do I do harmful thing {i}?",
                                                         "output": f"Here is harmful thing {i}."}) + "\n"
                                             for i in range(4)))
    (root / "prompts.json").write_text(json.dumps(["How do I boil an egg?", "Write a haiku."]))
    assert main(["distill", "--model", str(root / "base"), "--data", str(root / "harm.jsonl"), "--out",
                 str(root / "vector"), *TRAIN]) == 0
    return root


# --------------------------------------------------------------------------------------------------------------
# no pad token (defect 7)


def test_tokenizer_without_pad_token_distills_finetunes_and_evaluates(world, capsys, tmp_path):
    from enchtable_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(world / "base", "test")
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None  # as Llama-3 ships
    manifest = json.loads((world / "vector" / "manifest.json").read_text())  # the fixture distilled from it
    assert manifest["training"]["total_steps"] == 1 and manifest["data"]["n_examples"] == 4
    succeeds(capsys, "finetune", "--model", world / "base", "--data", world / "harm.jsonl", "--out",
             tmp_path / "tuned", *TRAIN)
    assert (tmp_path / "tuned" / "config.json").is_file()
    succeeds(capsys, "eval", "--model", world / "base", "--prompts", world / "prompts.json", "--out",
             tmp_path / "eval", "--max-new-tokens", "4", "--batch-size", "1")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["safety"]["prompts"]["n"] == 2


# --------------------------------------------------------------------------------------------------------------
# enchant --aligned (defect 10)


@pytest.mark.parametrize("aligned", ["other", "qwen"])
def test_enchant_refuses_aligned_other_than_base_before_distilling(world, capsys, tmp_path, aligned):
    line = fails_in_one_line(capsys, "enchant", "--base", world / "base", "--task", world / "task", "--aligned",
                             world / aligned, "--data", world / "harm.jsonl", "--out", tmp_path / "out", *TRAIN,
                             needles=["--aligned", str(world / aligned), "--base", "fine-tuned from"])
    assert ("config.json differ" if aligned == "qwen" else "weights differ") in line
    assert sorted(tmp_path.iterdir()) == []  # no vector distilled, no output


def test_enchant_accepts_a_copy_of_base_as_aligned(world, capsys, tmp_path):
    copy = tmp_path / "base-copy"
    shutil.copytree(world / "base", copy)
    out = succeeds(capsys, "enchant", "--base", world / "base", "--task", world / "task", "--aligned", copy,
                   "--safety-vector", world / "vector", "--out", tmp_path / "out")
    assert "enchanted" in out and (tmp_path / "out" / "merge_report.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# tampered orbax checkpoints on --resume


def _tamper(step: Path, how: str) -> None:
    meta = step / "meta" / "metadata"
    if how == "truncated":
        for f in step.rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "data_truncated":
        for f in (step / "state").rglob("d/*"):
            f.write_bytes(f.read_bytes()[:10])
    elif how == "byte_flipped":
        for f in (step / "state").rglob("d/*"):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
    elif how == "meta_list":
        meta.write_text("[1, 2]")
    elif how == "meta_not_json":
        meta.write_text("{not json")
    elif how == "meta_field_missing":
        value = json.loads(meta.read_text())
        del value["base_model"]
        meta.write_text(json.dumps(value))
    elif how == "meta_losses_edited":
        value = json.loads(meta.read_text())
        value["losses"] = ["low"]
        meta.write_text(json.dumps(value))
    elif how == "state_metadata_edited":
        (step / "state" / "_METADATA").write_text("{}")
    elif how == "step_metadata_list":
        (step / "_CHECKPOINT_METADATA").write_text("[1]")
    elif how == "state_metadata_not_json":
        (step / "state" / "_METADATA").write_text("{{")


@pytest.mark.parametrize("how", ["truncated", "data_truncated", "byte_flipped", "meta_list", "meta_not_json",
                                 "meta_field_missing", "meta_losses_edited", "state_metadata_edited",
                                 "step_metadata_list", "state_metadata_not_json"])
def test_resume_from_a_tampered_checkpoint_is_one_line(world, capsys, tmp_path, how):
    run = tmp_path / "vector"
    shutil.copytree(world / "vector", run)
    (run / "manifest.json").unlink()  # an interrupted run: its checkpoints remain
    steps = sorted((run / "checkpoints").iterdir())
    assert [s.name for s in steps] == ["1"]
    _tamper(steps[0], how)
    fails_in_one_line(capsys, "distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out", run,
                      *TRAIN, "--resume", needles=[str((run / "checkpoints").resolve()), "truncated or edited"])


# --------------------------------------------------------------------------------------------------------------
# tampered orbax checkpoints as input (convert, info, eval, merge)


def _tamper_params(params: Path, how: str) -> None:
    data = sorted((params / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
    if how == "checkpoint_metadata_list":
        (params / "_CHECKPOINT_METADATA").write_text("[1]")
    elif how == "metadata_not_json":
        (params / "_METADATA").write_text("{{")
    elif how == "metadata_empty_object":
        (params / "_METADATA").write_text("{}")
    elif how == "largest_data_truncated":
        data[-1].write_bytes(data[-1].read_bytes()[:1000])
    elif how == "all_data_truncated":
        for f in data:
            f.write_bytes(f.read_bytes()[:10])
    elif how == "manifest_truncated":
        (params / "manifest.ocdbt").write_bytes((params / "manifest.ocdbt").read_bytes()[:20])


@pytest.fixture(scope="module")
def orbax_base(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("orbax") / "sh"
    assert main(["convert", str(world / "base"), str(out)]) == 0
    return out


@pytest.mark.parametrize("how", ["checkpoint_metadata_list", "metadata_not_json", "metadata_empty_object",
                                 "largest_data_truncated", "all_data_truncated", "manifest_truncated"])
def test_tampered_orbax_checkpoint_as_input_is_one_line(world, orbax_base, capsys, tmp_path, how):
    ckpt = tmp_path / "t"
    shutil.copytree(orbax_base, ckpt)
    _tamper_params(ckpt / "params", how)
    commands = [["convert", ckpt, tmp_path / "o"],
                ["eval", "--model", ckpt, "--prompts", world / "prompts.json", "--out", tmp_path / "e",
                 "--max-new-tokens", "2"],
                ["merge", "--base", ckpt, "--task", world / "task", "--safety-vector", world / "vector", "--method",
                 "task_arithmetic", "--out", tmp_path / "m"]]
    if how in ("checkpoint_metadata_list", "metadata_not_json", "metadata_empty_object"):  # info reads metadata only
        commands.append(["info", ckpt])
    for argv in commands:
        fails_in_one_line(capsys, *argv, needles=[str(ckpt), "damaged orbax checkpoint"])


def test_unreadable_orbax_data_stays_an_os_error(world, orbax_base, capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permission bits")
    ckpt = tmp_path / "t"
    shutil.copytree(orbax_base, ckpt)
    for f in (ckpt / "params" / "ocdbt.process_0" / "d").iterdir():
        f.chmod(0)
    fails_in_one_line(capsys, "convert", ckpt, tmp_path / "o", needles=["Permission denied"])


# --------------------------------------------------------------------------------------------------------------
# merges that would silently do nothing or the wrong thing (defect 9)


def _edit_vector(world: Path, folder: Path, how: str) -> str:
    """A copy of the fixture's safety vector in `folder` with its tensors edited; returns the tensor to name."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(world / "vector", folder)
    file = folder / "safety_vector.safetensors"
    tensors = load_file(file)
    name = sorted(tensors)[0]
    if how == "zero":
        tensors = {n: np.zeros_like(v) for n, v in tensors.items()}
        name = ""
    elif how == "wrong_shape":
        tensors[name] = np.ascontiguousarray(tensors[name][:-1])
    elif how == "transposed":
        tensors[name] = np.ascontiguousarray(tensors[name].T)
    elif how == "extra":
        name = "model.layers.99.mlp.up_proj.weight"
        tensors[name] = np.ones((2, 2), np.float32)
    elif how == "int_dtype":
        tensors[name] = tensors[name].astype(np.int32)
    elif how == "no_model_tensor":
        tensors = {f"other.{n}": v for n, v in tensors.items()}
        name = ""
    save_file(tensors, str(file), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("how,needle", [("zero", "zero on every tensor"), ("wrong_shape", "has shape"),
                                        ("transposed", "has shape"), ("extra", "not a tensor of the base model"),
                                        ("int_dtype", "dtype int32"), ("no_model_tensor", "not a tensor of the base")])
def test_merge_refuses_a_vector_that_would_merge_silently_wrong(world, capsys, tmp_path, how, needle):
    name = _edit_vector(world, tmp_path / "vector", how)
    fails_in_one_line(capsys, "merge", "--method", "task_arithmetic", "--base", world / "base", "--task",
                      world / "task", "--safety-vector", tmp_path / "vector", "--out", tmp_path / "out",
                      needles=[tmp_path / "vector" / "safety_vector.safetensors", name, needle])
    assert not (tmp_path / "out").exists()


def test_distill_refuses_a_run_whose_steps_all_have_lr_zero(world, capsys, tmp_path):
    """One step with the default warm-up (10%) has learning rate 0: the vector would be all zero."""
    train = [a for a in TRAIN if a not in ("--warmup-ratio", "0")]
    assert train.count("--steps") == 1 and "--warmup-ratio" not in train
    fails_in_one_line(capsys, "distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out",
                      tmp_path / "v", *train, needles=["learning rate", "--warmup-ratio 0", "--steps"])
    assert not (tmp_path / "v").exists()
    import enchtable_jax as ej

    with pytest.raises(EnchtableError, match="no step would have a non-zero learning rate"):
        ej.finetune(world / "base", world / "harm.jsonl", tmp_path / "t", ej.FinetuneOptions(steps=1, warmup_ratio=0.5))
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------------------------------------------
# misleading messages (defect 13)


def test_nonfinite_hint_names_only_options_the_command_has(world, capsys, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(world / "base", bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.embed_tokens.weight"][0, 0] = np.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for argv in (["convert", bad, tmp_path / "o"],
                 ["eval", "--model", bad, "--prompts", world / "prompts.json", "--out", tmp_path / "e"]):
        line = fails_in_one_line(capsys, *argv, needles=["model.embed_tokens.weight", "NaN"])
        assert "pass allow_nonfinite" not in line and f"enchtable {argv[0]} does not take --allow-nonfinite" in line
    line = fails_in_one_line(capsys, "merge", "--method", "task_arithmetic", "--base", world / "base", "--task", bad,
                             "--safety-vector", world / "vector", "--out", tmp_path / "m")
    assert "--allow-nonfinite" in line and "does not take" not in line  # merge has the option: the hint stays


def test_a_folder_given_as_a_data_or_prompts_file_is_called_a_folder(world, capsys, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for argv in (["distill", "--model", world / "base", "--data", folder, "--out", tmp_path / "v", *TRAIN],
                 ["eval", "--model", world / "base", "--prompts", folder, "--out", tmp_path / "e"]):
        line = fails_in_one_line(capsys, *argv, needles=[folder, "is a folder"])
        assert "not found" not in line


def test_vector_of_another_base_is_refused_with_an_accurate_remedy(world, capsys, tmp_path):
    line = fails_in_one_line(capsys, "merge", "--method", "task_arithmetic", "--base", world / "other", "--task",
                             world / "task", "--safety-vector", world / "vector", "--out", tmp_path / "m",
                             needles=["distilled from another model", "distill one from this base model"])
    assert "aligned model it was made from" not in line


# --------------------------------------------------------------------------------------------------------------
# --max-new-tokens beyond the context


def test_max_new_tokens_beyond_the_context_is_refused_before_generation(world, capsys, tmp_path, monkeypatch):
    generate_module = importlib.import_module("enchtable_jax.eval.generate")  # the package exports a function

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(generate_module, "_decode", no_generation)
    fails_in_one_line(capsys, "eval", "--model", world / "base", "--prompts", world / "prompts.json", "--out",
                      tmp_path / "eval", "--max-new-tokens", "513",
                      needles=["--max-new-tokens 513", "max_position_embeddings is 512"])
    fails_in_one_line(capsys, "merge", "--method", "enchtable", "--base", world / "base", "--task", world / "task",
                      "--safety-vector", world / "vector", "--out", tmp_path / "merged", "--calibrate",
                      world / "prompts.json", world / "prompts.json", "--calibrate-max-new-tokens", "600",
                      needles=["--calibrate-max-new-tokens 600", "max_position_embeddings is 512"])
    assert not (tmp_path / "eval").exists() and not (tmp_path / "merged").exists()
    import enchtable_jax

    model = enchtable_jax.load(world / "base")
    with pytest.raises(EnchtableError, match="max_new_tokens 1000 exceeds the model's context"):
        generate_module.generate_ids(model, [[1, 2, 3]], max_new_tokens=1000)


# --------------------------------------------------------------------------------------------------------------
# JSON of the wrong type


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json", b"\xff\xfe{}", b'"a string"',
                                     b'{"format": "enchtable-safety-vector", "base_model": "base"}'])
def test_wrong_safety_vector_manifest_is_one_line(world, capsys, tmp_path, content):
    vector = tmp_path / "vector"
    shutil.copytree(world / "vector", vector, ignore=shutil.ignore_patterns("checkpoints"))
    (vector / "manifest.json").write_bytes(content)
    fails_in_one_line(capsys, "merge", "--method", "enchtable", "--base", world / "base", "--task", world / "task",
                      "--safety-vector", vector, "--out", tmp_path / "out",
                      needles=[str((vector / "manifest.json").resolve())])


@pytest.mark.parametrize("content", ["[1, 2]", '"llama"', "3"])
def test_config_of_the_wrong_type_is_one_line(world, capsys, tmp_path, content):
    model = tmp_path / "model"
    shutil.copytree(world / "task", model)
    (model / "config.json").write_text(content)
    fails_in_one_line(capsys, "info", model, needles=["config.json"])


def test_truncated_bin_checkpoint_is_one_line(world, capsys, tmp_path):
    torch = pytest.importorskip("torch", reason="reading .bin checkpoints needs the torch extra")
    model = tmp_path / "bin-model"
    model.mkdir()
    shutil.copy(world / "task" / "config.json", model)
    torch.save({"model.norm.weight": torch.ones(64)}, model / "pytorch_model.bin")
    data = (model / "pytorch_model.bin").read_bytes()
    (model / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    fails_in_one_line(capsys, "info", model, needles=[model / "pytorch_model.bin", "truncated"])


# --------------------------------------------------------------------------------------------------------------
# an output path that is (under) a file


def test_output_under_a_file_is_one_line(world, capsys, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    fails_in_one_line(capsys, "init", file / "model", needles=[file])
    fails_in_one_line(capsys, "init", file, "--overwrite", needles=[file])
    fails_in_one_line(capsys, "convert", world / "task", file / "converted", needles=[file])
    fails_in_one_line(capsys, "eval", "--model", world / "base", "--prompts", world / "prompts.json", "--out",
                      file / "eval", "--max-new-tokens", "2", needles=[file])
    fails_in_one_line(capsys, "merge", "--method", "task_arithmetic", "--base", world / "base", "--task",
                      world / "task", "--safety-vector", world / "vector", "--out", file / "merged", needles=[file])
    fails_in_one_line(capsys, "distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out",
                      file / "vector", *TRAIN, needles=[file])
    assert file.read_text() == "not a folder"


# --------------------------------------------------------------------------------------------------------------
# permission denied / read-only, and disk full (mounts: only where the OS allows them)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` for the block (skips, with the reason, where mounting is not allowed)."""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small or read-only file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs -o {options} is not allowed here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written in: chmod 555 for a normal user; as root (permission bits ignored) a
    read-only tmpfs, else `chattr +i`, else a skip that says why."""
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        with tmpfs(folder, "ro,size=64k"):
            yield folder
        return
    except pytest.skip.Exception as mount_refused:
        reason = str(mount_refused)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield folder
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    pytest.skip(f"running as root, where permission bits are ignored, and neither a read-only tmpfs ({reason}) nor "
                "`chattr +i` is available")


def test_read_only_output_is_one_line(world, capsys, read_only_dir):
    for argv in (["init", read_only_dir / "model"],
                 ["convert", world / "task", read_only_dir / "converted"],
                 ["eval", "--model", world / "base", "--prompts", world / "prompts.json", "--out",
                  read_only_dir / "eval", "--max-new-tokens", "2"],
                 ["merge", "--method", "task_arithmetic", "--base", world / "base", "--task", world / "task",
                  "--safety-vector", world / "vector", "--out", read_only_dir / "merged"],
                 ["distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out",
                  read_only_dir / "vector", *TRAIN]):
        fails_in_one_line(capsys, *argv, needles=[read_only_dir])
    assert list(read_only_dir.iterdir()) == []


def test_read_only_error_from_deep_inside_is_one_line(world, capsys, monkeypatch, read_only_dir):
    """An OSError raised past every early check (here: where the merge opens the safety vector) still ends in one
    line that names the file and says what is wrong."""
    import enchtable_jax.merging.sources as sources

    def denied(folder):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(read_only_dir / "manifest.json"))

    monkeypatch.setattr(sources, "read_manifest", denied)
    fails_in_one_line(capsys, "merge", "--method", "task_arithmetic", "--base", world / "base", "--task",
                      world / "task", "--safety-vector", world / "vector", "--out", read_only_dir.parent / "merged",
                      needles=[f"{read_only_dir / 'manifest.json'}: Permission denied"])


def test_disk_full_is_one_line(world, capsys, tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        for argv in (["init", small / "model"],  # safetensors written by Python: an OSError
                     ["convert", world / "task", small / "orbax"],  # orbax through tensorstore: a ValueError
                     ["distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out",
                      small / "vector", *TRAIN]):  # the training checkpoint
            fails_in_one_line(capsys, *argv, needles=["No space left on device", small])
            for child in small.iterdir():  # room for the next case
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _stderr_of(*argv) -> tuple[int, list[str]]:
    """Exit code and stderr lines of the CLI run in its own process (orbax's threads, logging and interpreter exit
    included, which capsys does not see)."""
    done = subprocess.run([sys.executable, "-m", "enchtable_jax.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stderr.splitlines()


@pytest.mark.slow  # 14 s in three fresh processes; the same errors are one line in-process in the default suite
def test_disk_full_and_damaged_resume_print_only_the_error_line(world, tmp_path):
    """No flood after (or before) the one line: orbax's background threads log the disk-full error with its
    traceback, and a truncated checkpoint on --resume leaves tensorstore posting to a closed event loop."""
    run = tmp_path / "vector"
    shutil.copytree(world / "vector", run)
    (run / "manifest.json").unlink()
    _tamper(sorted((run / "checkpoints").iterdir())[0], "data_truncated")
    code, lines = _stderr_of("distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out", run,
                             *TRAIN, "--resume")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("enchtable distill: error: "), lines[:20]
    with tmpfs(tmp_path / "small", "size=64k") as small:
        for argv in (["convert", world / "task", small / "orbax"],
                     ["distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out",
                      small / "vector", *TRAIN]):
            code, lines = _stderr_of(*argv)
            assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], "\n".join(lines[:60])
            for child in small.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def test_other_unraisable_exceptions_and_log_records_still_print(monkeypatch):
    import logging
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    cli._ignore_abandoned_callbacks()
    for e in (RuntimeError("Event loop is closed"), RuntimeError("another"), KeyError("a bug")):
        sys.unraisablehook(types.SimpleNamespace(exc_value=e))
    assert [str(u.exc_value) for u in seen] == ["another", "'a bug'"]
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "boom", None, None)
    assert cli._drop_storage_tracebacks(record)  # no exception: kept
    record.exc_info = (KeyError, KeyError("a bug"), None)
    assert cli._drop_storage_tracebacks(record)  # a bug: kept
    record.exc_info = (ValueError, ValueError("RESOURCE_EXHAUSTED: Error writing [os_error_code=28]"), None)
    assert not cli._drop_storage_tracebacks(record)  # the disk-full error main() reports in one line: dropped


def test_error_line_formats():
    import argparse

    args = argparse.Namespace(out="OUT")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert cli.error_line(full, args) == f"OUT: {os.strerror(errno.ENOSPC)}"
    copy = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/src/a", None, "/dst/a")
    assert cli.error_line(copy, args) == f"/dst/a: {os.strerror(errno.ENOSPC)} (copying from /src/a)"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x/y")
    assert cli.error_line(denied, args) == "/x/y: Permission denied"
    assert cli.error_line(EnchtableError("a\n  b"), args) == "a b"
    staged = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/d/.o.tmp-12-ab12cd34/params/d/f00")
    assert cli.error_line(staged, args) == (f"OUT: {os.strerror(errno.ENOSPC)} (while writing "
                                            "/d/.o.tmp-12-ab12cd34/params/d/f00; nothing was published)")
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/d/": Failed '
                             "writing: \"/d/f\": Failed to write 8 bytes to file 4: No space left on device "
                             "[os_error_code='28']")
    converted = storage_error(tensorstore)
    assert isinstance(converted, OSError) and converted.errno == errno.ENOSPC and converted.filename == "/d/f"
    assert storage_error(ValueError("INVALID_ARGUMENT: a bug")) is None
    assert storage_error(ValueError("some numpy error")) is None
    extra = MissingExtraError("needs pip install 'enchtable-jax[gguf]'")
    assert isinstance(extra, ImportError) and isinstance(extra, EnchtableError)


# --------------------------------------------------------------------------------------------------------------
# genuine bugs keep their traceback


@pytest.mark.parametrize("bug", [ValueError("operands could not be broadcast together"), ZeroDivisionError(),
                                 ValueError("INVALID_ARGUMENT: tensorstore spec"), ImportError("cannot import name"),
                                 KeyError("model.norm.weight"), TypeError("unsupported operand")])
def test_a_genuine_bug_keeps_its_traceback(world, capsys, monkeypatch, bug):
    def broken(args):
        raise bug

    monkeypatch.setattr(cli, "_info", broken)
    with pytest.raises(type(bug)) as raised:
        main(["info", str(world / "task")])
    assert raised.value is bug
    assert "error:" not in capsys.readouterr().err
