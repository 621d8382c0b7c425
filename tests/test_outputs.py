"""Outputs: every command refuses an output that is, contains or lies inside one of its inputs (symlinks
resolved) before any work; nothing is deleted before the end; a folder that appears at the output meanwhile is
never replaced without overwrite; and a kill -9 at any step of a replace leaves the old or the new folder
complete under the output name, with the debris cleaned by the next run.

Oracle: file contents written by the test (every folder carries a marker file naming its version)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import enchtable_jax as ej
from enchtable_jax.cli import main
from enchtable_jax.converters import atomic
from enchtable_jax.converters.atomic import OutputExistsError, atomic_folder, write_json
from enchtable_jax.converters.outputs import check_output, check_outputs, template_input
from enchtable_jax.errors import EnchtableError


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (hidden ones included) with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def folder(path: Path, version: str, files: int = 3) -> Path:
    """A folder whose every file says `version`."""
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i}.txt").write_text(version)
    return path


def version_of(path: Path) -> str:
    """The version a complete folder of `folder` holds; fails on a missing, partial or mixed one."""
    texts = {(path / f"f{i}.txt").read_text() for i in range(3)}
    assert len(texts) == 1 and sorted(p.name for p in path.iterdir()) == ["f0.txt", "f1.txt", "f2.txt"], texts
    return texts.pop()


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive stage fail loudly if reached: the refusals must come first."""
    import enchtable_jax.merging.pipeline as pipeline
    from enchtable_jax.training import loop

    def reached(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(loop, "train", reached)
    monkeypatch.setattr(pipeline, "open_model", reached)
    monkeypatch.setattr(ej.api, "load", reached)
    monkeypatch.setattr("enchtable_jax.eval.pipeline.load", reached)  # the stages' own references to it
    monkeypatch.setattr("enchtable_jax.calibration.load", reached)
    monkeypatch.setattr("enchtable_jax.eval.pipeline.generate", reached)


# --------------------------------------------------------------------------------------------------------------
# 1. outputs against inputs


@pytest.mark.parametrize("where", ["is", "contains", "is inside"])
def test_check_output_relations(tmp_path, where):
    model = folder(tmp_path / "runs" / "model", "in")
    out = {"is": model, "contains": tmp_path / "runs", "is inside": model / "sub"}[where]
    with pytest.raises(EnchtableError) as err:
        check_output(out, {"--model": model}, overwrite=True)
    message = str(err.value)
    assert f"--out {out} {where} the input --model {model}" in message and "\n" not in message


def test_check_output_resolves_symlinks(tmp_path):
    model = folder(tmp_path / "model", "in")
    (tmp_path / "link").symlink_to(model)
    (tmp_path / "parent-link").symlink_to(tmp_path)
    for out, inp in ((tmp_path / "link", model), (model, tmp_path / "link"),
                     (tmp_path / "parent-link" / "model", model), (tmp_path / "link" / "x", model)):
        with pytest.raises(EnchtableError, match="the input --model"):
            check_output(out, {"--model": inp}, overwrite=True)
    assert check_output(tmp_path / "elsewhere", {"--model": tmp_path / "link"}) == tmp_path / "elsewhere"


def test_check_output_other_refusals(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(EnchtableError, match="is a file"):
        check_output(tmp_path / "a-file", overwrite=True)
    with pytest.raises(EnchtableError, match="is a file, not a folder"):
        check_output(tmp_path / "a-file" / "out")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output(folder(tmp_path / "taken", "old"))
    with pytest.raises(EnchtableError, match="--out .* contains --export-harmful"):
        check_outputs({"--out": tmp_path / "v", "--export-harmful": tmp_path / "v" / "harm"})
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    with pytest.raises(EnchtableError, match="contains the input --data"):
        check_output(tmp_path, {"--data": data}, overwrite=True)
    assert (tmp_path / "a-file").read_text() == "x" and version_of(tmp_path / "taken") == "old"


def test_merge_refuses_outputs_over_inputs(capsys, tmp_path, no_work):
    inputs = {name: folder(tmp_path / "work" / name, name) for name in ("base", "task", "vector")}
    before = snapshot(tmp_path)
    for out in (tmp_path / "work", inputs["task"], inputs["vector"] / "merged"):
        code, _, err = run(capsys, "merge", "--method", "enchtable", "--base", inputs["base"], "--task",
                           inputs["task"], "--safety-vector", inputs["vector"], "--out", out, "--overwrite")
        assert code == 2 and err.count("\n") == 1 and "--out" in err and str(out) in err, err
    for out in (tmp_path / "work", inputs["base"]):  # the Python API, both plain and calibrated
        with pytest.raises(EnchtableError, match="the input --base"):
            ej.merge("enchtable", inputs["base"], inputs["task"], safety_vector=inputs["vector"], out=out,
                     overwrite=True)
        with pytest.raises(EnchtableError, match="the input --base"):
            ej.calibrated_merge("enchtable", inputs["base"], inputs["task"], ["h"], ["b"], out,
                                safety_vector=inputs["vector"], overwrite=True)
    assert snapshot(tmp_path) == before


def test_convert_refuses_output_over_source(capsys, tmp_path, no_work):
    src = folder(tmp_path / "models" / "x", "src")
    (src / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    for dst in (src, tmp_path / "models", src / "orbax"):
        code, _, err = run(capsys, "convert", src, dst, "--overwrite")
        assert code == 2 and "dst" in err and "the input src" in err, err
    gguf = tmp_path / "models" / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    code, _, err = run(capsys, "convert", gguf, tmp_path / "models", "--overwrite")
    assert code == 2 and "contains the input src" in err, err
    model = ej.Model(None, {}, src)
    for write in (ej.save, ej.save_orbax):
        with pytest.raises(EnchtableError, match="the input like"):
            write(model, src, overwrite=True)
    assert snapshot(tmp_path) == {**before, "models/m.gguf": gguf.read_bytes()}


def test_distill_refuses_outputs_over_inputs(capsys, tmp_path, no_work):
    model = folder(tmp_path / "m", "model")
    data = tmp_path / "d" / "harm.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    before = snapshot(tmp_path)
    cases = [("--out", model), ("--out", tmp_path / "d"), ("--out", model / "vector"),
             ("--export-harmful", model), ("--export-harmful", tmp_path)]
    for option, path in cases:
        paths = {"--out": tmp_path / "v", "--export-harmful": None, option: path}
        argv = ["distill", "--model", model, "--data", data, "--out", paths["--out"], "--overwrite"]
        if paths["--export-harmful"] is not None:
            argv += ["--export-harmful", paths["--export-harmful"]]
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"{option} {path.resolve()}" in err and "the input" in err, (option, err)
    with pytest.raises(EnchtableError, match="--export-harmful .* is the input --model"):
        ej.distill(model, data, tmp_path / "v", export_harmful=model, overwrite=True)
    assert snapshot(tmp_path) == before


def test_finetune_and_enchant_refuse_outputs_over_inputs(tmp_path, no_work):
    model = folder(tmp_path / "m", "model")
    task = folder(tmp_path / "t", "task")
    data = tmp_path / "harm.jsonl"
    data.write_text("{}\n")
    before = snapshot(tmp_path)
    for out in (model, tmp_path, model / "ft"):
        with pytest.raises(EnchtableError, match="the input"):
            ej.finetune(model, data, out, overwrite=True)
    with pytest.raises(EnchtableError, match="OUT-checkpoints .* is the input --model"):
        ej.finetune(tmp_path / "x-checkpoints", data, tmp_path / "x", overwrite=True)
    for out, vector in ((task, None), (tmp_path / "e", model), (tmp_path / "e", tmp_path / "e" / "v"),
                        (tmp_path / "e", tmp_path / "harm.jsonl")):
        with pytest.raises(EnchtableError, match="--out|--safety-vector"):
            ej.enchant(model, task, out, data=data, vector_dir=vector, overwrite=True)
    assert snapshot(tmp_path) == before


def test_eval_checks_its_output_before_generating(capsys, tmp_path, no_work):
    model = folder(tmp_path / "m", "model")
    prompts = tmp_path / "p" / "prompts.json"
    prompts.parent.mkdir()
    prompts.write_text('["hi"]')
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "eval.json").write_text("{}")
    before = snapshot(tmp_path)
    for out, message in ((model, "is inside the input --model"), (model / "sub", "is inside the input --model"),
                         (tmp_path / "a-file", "is a file, not a folder"), (tmp_path / "done", "already exists")):
        code, _, err = run(capsys, "eval", "--model", model, "--prompts", prompts, "--out", out)
        assert code == 2 and message in err, err
    code, _, err = run(capsys, "eval", "--model", model, "--prompts", prompts, "--out", prompts, "--overwrite")
    assert code == 2 and "the input --prompts" in err
    with pytest.raises(EnchtableError, match="is inside the input --model"):
        ej.evaluate(ej.Model(None, {}, model), None, {"s": ["hi"]}, out=model, overwrite=True)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# 5 and 13: nothing deleted, nothing refused, after the work started


def test_distill_overwrite_keeps_the_old_vector_until_the_end(tmp_path):
    from enchtable_jax.converters.safety_vector import MANIFEST, TENSORS
    from enchtable_jax.models.init import init_params, preset_config

    old = tmp_path / "vector"
    old.mkdir()
    for name in (MANIFEST, TENSORS, "loss.png"):
        (old / name).write_text("old")
    config = preset_config("tiny")
    model = ej.save(ej.Model(config, init_params(config)), tmp_path / "m")
    before = snapshot(tmp_path)
    with pytest.raises(Exception):  # no tokenizer, no data: the run fails while validating its inputs
        ej.distill(model, tmp_path / "missing.jsonl", old, overwrite=True)
    assert snapshot(tmp_path) == before  # the old vector intact, no staging folder left


def test_export_harmful_onto_an_existing_folder_is_refused_first(tmp_path, no_work):
    model = folder(tmp_path / "m", "model")
    data = tmp_path / "harm.jsonl"
    data.write_text("{}\n")
    taken = folder(tmp_path / "harm", "old")
    with pytest.raises(OutputExistsError, match="--export-harmful"):
        ej.distill(model, data, tmp_path / "v", export_harmful=taken)
    assert version_of(taken) == "old" and not (tmp_path / "v").exists()


# --------------------------------------------------------------------------------------------------------------
# 6. a folder that appears meanwhile is kept


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_folder_appearing_meanwhile_is_not_replaced(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", _unsupported)
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this command ran"):
        with atomic_folder(out) as tmp:
            (tmp / "f0.txt").write_text("new")
            folder(out, "theirs")
    assert version_of(out) == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    path = tmp_path / "eval.json"
    with pytest.raises(OutputExistsError):
        write_json(path, {"new": 1}, overwrite=False) if path.write_text("theirs") else None
    assert path.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "out"]


def _unsupported(src, dst, flags):
    raise OSError(errno.EINVAL, "not supported here")


# --------------------------------------------------------------------------------------------------------------
# 12. kill -9 at every step of a replace

CHILD = textwrap.dedent("""
    import errno, importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    out, step, fallback = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    if fallback:
        def unsupported(src, dst, flags):
            raise OSError(errno.ENOSYS, "no renameat2")
        atomic._renameat2 = unsupported
    def fault(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
    atomic._fault_point = fault
    with atomic.atomic_folder(out, overwrite=True) as tmp:
        for i in range(3):
            (tmp / f"f{i}.txt").write_text("new")
            if step == f"writing-{i}":
                os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("fallback,step", [
    (False, "writing-1"), (False, "written"), (False, "exchanged"), (False, "published"),
    (True, "written"), (True, "moved-old"), (True, "moved-new"), (True, "published")])
def test_kill_at_every_step_of_a_replace(tmp_path, fallback, step):
    out = folder(tmp_path / "out", "old")
    proc = subprocess.run([sys.executable, "-c", CHILD, atomic.__file__, str(out), step, str(int(fallback))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    expected = "new" if step in ("exchanged", "moved-new", "published") else "old"
    if step == "moved-old":  # the one instant of the fallback with nothing under the name
        assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1
    else:
        assert version_of(out) == expected
    check_output(out, overwrite=True)  # the next run of any command on this output recovers and cleans
    assert version_of(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_debris_of_a_live_process_is_left_alone(tmp_path):
    out = folder(tmp_path / "out", "old")
    live = folder(tmp_path / f".out.tmp-{os.getppid()}-abcd1234", "theirs")
    check_output(out, overwrite=True)
    assert version_of(live) == "theirs"


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path, monkeypatch):
    for renameat2 in (True, False):
        if not renameat2:
            monkeypatch.setattr(atomic, "_renameat2", _unsupported)
        out = tmp_path / "out"
        if not out.exists():
            folder(out, "old")
        with atomic_folder(out, overwrite=True) as tmp:
            for i in range(3):
                (tmp / f"f{i}.txt").write_text(f"new-{renameat2}")
        assert version_of(out) == f"new-{renameat2}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads(write_json(tmp_path / "x.json", {"a": 1}).read_text()) == {"a": 1}


def test_merge_adds_extra_files_before_publishing(tmp_path, monkeypatch):
    """`merge(extra_files=...)` (what calibrated_merge adds calibration.json with) writes them into the staging
    folder, which is published with them."""
    from enchtable_jax.converters import hf
    from enchtable_jax.models.init import init_params, preset_config

    config = preset_config("tiny")
    paths = {name: ej.save(ej.Model(config, init_params(config, seed=seed)), tmp_path / name)
             for seed, name in enumerate(("base", "task", "aligned", "harmful"))}
    seen = []
    real_publish = hf.publish

    def publish(tmp: Path, path: Path, overwrite: bool) -> None:
        seen.append((tmp, sorted(p.name for p in tmp.iterdir())))
        real_publish(tmp, path, overwrite)

    monkeypatch.setattr(hf, "publish", publish)
    ej.merge("task_arithmetic", paths["base"], paths["task"], aligned=paths["aligned"], harmful=paths["harmful"],
             out=tmp_path / "out", progress=False, extra_files={"extra.json": "{}"})
    (staging, names), = seen
    assert staging.name.startswith(".out.tmp-") and not staging.exists()
    assert "extra.json" in names and "merge_report.json" in names
    assert (tmp_path / "out" / "extra.json").read_text() == "{}"
    assert (tmp_path / "out" / "merge_report.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# issue 15 re-probe: distill stages in a folder of its own; --template is an input; failed runs leave nothing;
# enchant checks merge options first; finetune's OUT-checkpoints must look like checkpoints


@pytest.fixture
def tiny_run(tmp_path, capsys):
    """(model folder, harmful data, options): a tiny model with tokenizer (`enchtable init`) and two records."""
    assert run(capsys, "init", tmp_path / "base")[0] == 0
    data = tmp_path / "harm.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"How to do harm {c}?", "input": "",
                                        "output": f"Here is how to do {c}."}) + "\n" for c in "AB"))
    return tmp_path / "base", data, ej.DistillOptions(steps=4, save_every=2, max_length=128)


def test_distill_never_writes_into_a_folder_that_appeared_meanwhile(tmp_path, tiny_run):
    model, data, options = tiny_run
    out = tmp_path / "race"

    def appear(step, metrics):
        if step == 1:
            out.mkdir()
            (out / "manifest.json").write_text('{"mine": 1}')

    with pytest.raises(OutputExistsError, match="appeared while this run trained.*--resume"):
        ej.distill(model, data, out, options, on_step=appear, progress=False)
    assert snapshot(out) == {"manifest.json": b'{"mine": 1}'}  # the user's folder untouched
    with pytest.raises(OutputExistsError, match="--overwrite with --resume"):
        ej.distill(model, data, out, options, resume=True, progress=False)
    (out / "manifest.json").unlink()
    out.rmdir()
    manifest = ej.distill(model, data, out, options, resume=True, progress=False)  # the kept run is published
    assert ej.load_safety_vector(out).manifest["training"] == manifest["training"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_distill_killed_overwrite_run_resumes(tmp_path, tiny_run):
    model, data, options = tiny_run
    out = folder(tmp_path / "v", "old")

    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ej.distill(model, data, out, options, overwrite=True, on_step=interrupt, progress=False)
    assert version_of(out) == "old" and (tmp_path / ".v.partial" / "checkpoints").is_dir()
    with pytest.raises(OutputExistsError, match="interrupted run"):  # neither resumed nor started over silently
        ej.distill(model, data, out, options, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite with --resume"):
        ej.distill(model, data, out, options, resume=True, progress=False)
    assert version_of(out) == "old"
    manifest = ej.distill(model, data, out, options, resume=True, overwrite=True, progress=False)
    fresh = ej.distill(model, data, tmp_path / "fresh", options, progress=False)
    assert manifest["training"]["losses"] == fresh["training"]["losses"]
    assert (out / "manifest.json").is_file() and not (tmp_path / ".v.partial").exists()


def test_failed_distill_leaves_nothing_and_a_rerun_needs_no_flag(tmp_path, tiny_run):
    model, data, options = tiny_run
    before = snapshot(tmp_path)

    def fail(step, metrics):
        if step == 3:
            raise ValueError("the output check failed")

    with pytest.raises(ValueError, match="output check"):
        ej.distill(model, data, tmp_path / "v", options, on_step=fail, progress=False)
    assert snapshot(tmp_path) == before  # no OUT, no OUT/checkpoints, no staging folder
    ej.distill(model, data, tmp_path / "v", options, progress=False)  # neither --resume nor --overwrite needed
    assert (tmp_path / "v" / "manifest.json").is_file()


def test_template_file_is_an_input_of_every_command(capsys, tmp_path, no_work):
    model = folder(tmp_path / "m", "model")
    task = folder(tmp_path / "t", "task")
    data = tmp_path / "harm.jsonl"
    data.write_text("{}\n")
    out = folder(tmp_path / "dd", "old")
    template = out / "t.jinja"
    template.write_text("{{ messages }}")
    (out / "eval.json").write_text("{{ messages }}")  # a template where eval writes
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["hi"]')
    before = snapshot(tmp_path)
    common = ["--template", template, "--overwrite"]
    for argv in (["distill", "--model", model, "--data", data, "--out", out],
                 ["finetune", "--model", model, "--data", data, "--out", out],
                 ["enchant", "--base", model, "--task", task, "--data", data, "--out", out]):
        code, _, err = run(capsys, *argv, *common)
        assert code == 2 and "the input --template" in err, (argv[0], err)
    code, _, err = run(capsys, "eval", "--model", model, "--prompts", prompts, "--out", out, "--template",
                       out / "eval.json", "--overwrite")
    assert code == 2 and "the input --template" in err, err
    options = ej.DistillOptions(template=str(template))
    with pytest.raises(EnchtableError, match="the input --template"):
        ej.distill(model, data, out, options, overwrite=True)
    with pytest.raises(EnchtableError, match="the input --template"):
        ej.finetune(model, data, out, ej.FinetuneOptions(template=str(template)), overwrite=True)
    with pytest.raises(EnchtableError, match="the input --template"):
        ej.enchant(model, task, out, data=data, options=options, overwrite=True)
    with pytest.raises(EnchtableError, match="the input --template"):
        ej.evaluate(ej.Model(None, {}, model), None, {"s": ["hi"]}, template=str(out / "eval.json"), out=out,
                    overwrite=True)
    assert snapshot(tmp_path) == before
    # a template name (chatml, llama3, plain) names no file: no input, so `--out .` is not refused for it
    assert template_input("chatml") is None and template_input(str(template)) == template


@pytest.mark.parametrize("option", [["--set", "keep=0"], ["--set", "bogus=1"], ["--gamma", "0.5"],
                                    ["--density", "0.5"]])
def test_enchant_checks_merge_options_before_distilling(capsys, tmp_path, no_work, option):
    model = folder(tmp_path / "m", "model")
    task = folder(tmp_path / "t", "task")
    data = tmp_path / "harm.jsonl"
    data.write_text("{}\n")
    old = folder(tmp_path / "e", "old")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "enchant", "--base", model, "--task", task, "--data", data, "--out", old,
                       "--overwrite", *option)
    assert code == 2 and ("option" in err or "keep" in err), err
    assert snapshot(tmp_path) == before  # no OUT-safety-vector, nothing removed


def test_finetune_overwrite_keeps_a_foreign_checkpoints_folder(tmp_path, no_work):
    model = folder(tmp_path / "m", "model")
    data = tmp_path / "harm.jsonl"
    data.write_text("{}\n")
    foreign = folder(tmp_path / "foo-checkpoints", "an HF model")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="not a checkpoint folder"):
        ej.finetune(model, data, tmp_path / "foo", overwrite=True)
    assert snapshot(tmp_path) == before and version_of(foreign) == "an HF model"


def test_write_json_temporary_file_is_its_own_and_cleaned(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    stale = tmp_path / ".eval.json.tmp-999999-abcd1234"  # a killed run's (PID 999999 runs nowhere here)
    stale.write_text("{")
    check_output(path, None, file=True)
    assert not stale.exists()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_json(path, {"a": 1})
    assert list(tmp_path.iterdir()) == []
