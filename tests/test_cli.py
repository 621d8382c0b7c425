"""The `enchtable` command line, called in-process through `enchtable_jax.cli.main` (and once as a module).

Oracles: transformers `from_pretrained` (parameter counts, loadability), the `safetensors` package
(tensor bytes) and torch (dtype casts).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from conftest import make_hf_model
from oracles import raw_tensors, torch_raw

import enchtable_jax
from enchtable_jax.cli import main

COMMANDS = {
    "convert": ["src", "dst", "--like", "--dtype", "--shard-size", "--overwrite"],
    "info": ["path", "--json"],
    "init": ["dst", "--preset", "--arch", "--dtype", "--seed", "--overwrite"],
}
TOKENIZER_FILES = {"tokenizer_config.json": '{"model_max_length": 256}\n', "chat_template.jinja": "{{ messages }}"}


def run(capsys, *argv) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `enchtable ARGV` (argparse's own errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    """A float32 llama HF folder with tokenizer files, and its torch model (do not modify)."""
    folder = tmp_path_factory.mktemp("cli") / "src"
    torch_model = make_hf_model(folder, "llama", "float32", seed=3)
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)
    return folder, torch_model


# --------------------------------------------------------------------------------------------------------------
# help


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: enchtable" in out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: enchtable {command}" in out
    for arg in COMMANDS[command]:
        assert arg in out, (command, arg)


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "enchtable_jax.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: enchtable" in proc.stdout and "convert" in proc.stdout


# --------------------------------------------------------------------------------------------------------------
# init and info


def test_init_then_info(capsys, tmp_path):
    dst = tmp_path / "tiny"
    code, out, err = run(capsys, "init", dst, "--preset", "tiny", "--seed", 1)
    assert code == 0, err
    assert str(dst.resolve()) in out
    oracle = transformers.AutoModelForCausalLM.from_pretrained(dst)
    n = oracle.num_parameters()
    assert type(oracle).__name__ == "LlamaForCausalLM"
    assert oracle.dtype == torch.float32

    code, out, err = run(capsys, "info", dst, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["parameters"] == n
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["tied_head"] is False and info["layers"] == oracle.config.num_hidden_layers
    assert info["vocab_size"] == oracle.config.vocab_size
    assert info["dtypes"] == {"float32": n}
    assert info["format"] == "hf (safetensors)"
    assert info["tensors"] == len(oracle.state_dict())
    assert info["files"] == [{"file": "model.safetensors", "bytes": (dst / "model.safetensors").stat().st_size}]

    code, out, err = run(capsys, "info", dst)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert f"{n:,}" in lines["parameters"]
    assert "LlamaForCausalLM" in lines["architecture"]
    assert "model.safetensors" in lines["files"]
    assert "none" in lines["extra_tensors"]

    # Same seed, same tensors; another seed, other tensors.
    code, _, err = run(capsys, "init", tmp_path / "again", "--seed", 1)
    assert code == 0, err
    assert raw_tensors(tmp_path / "again") == raw_tensors(dst)
    code, _, err = run(capsys, "init", tmp_path / "other", "--seed", 2)
    assert code == 0, err
    assert raw_tensors(tmp_path / "other") != raw_tensors(dst)


def test_init_arch_and_dtype(capsys, tmp_path):
    dst = tmp_path / "qwen"
    code, _, err = run(capsys, "init", dst, "--arch", "qwen2", "--dtype", "bfloat16")
    assert code == 0, err
    oracle = transformers.AutoModelForCausalLM.from_pretrained(dst)
    assert type(oracle).__name__ == "Qwen2ForCausalLM"
    assert {t.dtype for t in safetensors.torch.load_file(dst / "model.safetensors").values()} == {torch.bfloat16}
    info = enchtable_jax.describe(dst)
    assert info["parameters"] == oracle.num_parameters()
    assert info["dtypes"] == {"bfloat16": oracle.num_parameters()}


def test_init_refuses_existing_output(capsys, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, out, err = run(capsys, "init", dst)
    assert code == 2
    assert str(dst.resolve()) in err and "--overwrite" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    code, _, err = run(capsys, "init", dst, "--overwrite")
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()


def test_info_missing_path(capsys, tmp_path):
    code, out, err = run(capsys, "info", tmp_path / "nothing")
    assert code == 2
    assert out == ""
    assert "enchtable info: error:" in err and str(tmp_path / "nothing") in err


# --------------------------------------------------------------------------------------------------------------
# convert


def test_convert_round_trip(capsys, tmp_path, hf_src):
    src, torch_model = hf_src
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    code, out, err = run(capsys, "convert", src, ckpt)
    assert code == 0, err
    assert "orbax checkpoint" in out and str(ckpt.resolve()) in out
    assert enchtable_jax.is_orbax_checkpoint(ckpt)

    code, out, err = run(capsys, "info", ckpt, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "orbax" and info["parameters"] == torch_model.num_parameters()

    code, out, err = run(capsys, "convert", ckpt, back, "--shard-size", "150KB")
    assert code == 0, err
    assert "HF folder" in out
    assert raw_tensors(back) == raw_tensors(src)
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    assert (back / "model.safetensors.index.json").is_file()
    for name, text in TOKENIZER_FILES.items():
        assert (back / name).read_text() == text
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back)
    original = transformers.AutoModelForCausalLM.from_pretrained(src)
    ids = torch.tensor([[1, 2, 3, 50, 100]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_convert_with_dtype_cast_and_like(capsys, tmp_path, hf_src):
    src, torch_model = hf_src
    ckpt = tmp_path / "ckpt"
    code, _, err = run(capsys, "convert", src, ckpt, "--dtype", "bfloat16")
    assert code == 0, err
    like = tmp_path / "like"
    like.mkdir()
    (like / "chat_template.jinja").write_text("other template")
    (like / "model.safetensors").write_bytes(b"junk")
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", ckpt, out, "--like", like)
    assert code == 0, err
    expected = {n: torch_raw(t.to(torch.bfloat16)) for n, t in torch_model.state_dict().items()}
    assert raw_tensors(out) == expected  # torch's float32 -> bfloat16 rounding
    assert (out / "chat_template.jinja").read_text() == "other template"
    assert not (out / "tokenizer_config.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_convert_like_with_hf_source_is_refused(capsys, tmp_path, hf_src):
    src, _ = hf_src
    code, _, err = run(capsys, "convert", src, tmp_path / "out", "--like", src)
    assert code == 2 and "--like" in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_existing_output(capsys, tmp_path, hf_src):
    src, _ = hf_src
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, out, err = run(capsys, "convert", src, dst)
    assert code == 2
    assert out == ""
    assert err.startswith("enchtable convert: error:")
    assert str(dst.resolve()) in err and "--overwrite" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    code, _, err = run(capsys, "convert", src, dst, "--overwrite")
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and enchtable_jax.is_orbax_checkpoint(dst)


def test_convert_folder_without_config(capsys, tmp_path, hf_src):
    src, _ = hf_src
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "config.json").unlink()
    code, out, err = run(capsys, "convert", bad, tmp_path / "out")
    assert code == 2
    assert out == ""
    assert "config.json" in err and str(bad.resolve()) in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_convert_bad_shard_size(capsys, tmp_path, hf_src):
    src, _ = hf_src
    ckpt = tmp_path / "ckpt"
    assert run(capsys, "convert", src, ckpt)[0] == 0
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "out", "--shard-size", "huge")
    assert code == 2
    assert "huge" in err
    assert not (tmp_path / "out").exists()


def test_convert_shard_size_bare_i_unit(capsys, tmp_path, hf_src):
    src, _ = hf_src
    ckpt = tmp_path / "ckpt"
    assert run(capsys, "convert", src, ckpt)[0] == 0
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "out", "--shard-size", "5iB")
    assert code == 2 and "5iB" in err


@pytest.fixture
def fake_gguf(tmp_path):
    """A file that starts with GGUF's magic bytes (nothing else of the format: for dispatch only)."""
    path = tmp_path / "model.Q4.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def gguf_calls(monkeypatch):
    """Replace gguf_to_hf with a recorder that makes the output folder; returns the list of its calls."""
    import enchtable_jax.converters.gguf as gguf_module

    calls = []

    def record(src, dst, **kwargs):
        calls.append((str(src), str(dst), kwargs))
        dst = Path(dst).resolve()
        dst.mkdir(exist_ok=True)
        return dst

    monkeypatch.setattr(gguf_module, "gguf_to_hf", record)
    return calls


def test_convert_gguf_goes_through_gguf_to_hf(capsys, tmp_path, fake_gguf, gguf_calls):
    code, out, err = run(capsys, "convert", fake_gguf, tmp_path / "hf")
    assert code == 0, err
    assert "HF folder" in out and str((tmp_path / "hf").resolve()) in out
    assert gguf_calls == [(str(fake_gguf), str(tmp_path / "hf"),
                           dict(dtype="float32", overwrite=False, shard_size="5GB"))]
    code, _, err = run(capsys, "convert", fake_gguf, tmp_path / "hf", "--dtype", "bfloat16", "--shard-size", "1GB",
                       "--overwrite")
    assert code == 0, err
    assert gguf_calls[1][2] == dict(dtype="bfloat16", overwrite=True, shard_size="1GB")


def test_convert_gguf_refusals(capsys, tmp_path, fake_gguf, gguf_calls):
    (tmp_path / "taken").mkdir()
    code, _, err = run(capsys, "convert", fake_gguf, tmp_path / "taken")
    assert code == 2 and "--overwrite" in err
    code, _, err = run(capsys, "convert", fake_gguf, tmp_path / "out", "--like", tmp_path)
    assert code == 2 and "--like" in err
    other = tmp_path / "model.bin"
    other.write_bytes(b"PK\x03\x04" + bytes(60))
    code, _, err = run(capsys, "convert", other, tmp_path / "out")
    assert code == 2 and "not a GGUF file" in err and str(other) in err
    assert gguf_calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["gguf", "accelerate", "torch"])
def test_convert_gguf_without_the_extra_names_it(capsys, monkeypatch, tmp_path, fake_gguf, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    code, out, err = run(capsys, "convert", fake_gguf, tmp_path / "hf")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("enchtable convert: error:")
    assert f"missing: {module}" in err and "pip install 'enchtable-jax[gguf]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [fake_gguf.name]


def test_convert_help_mentions_gguf(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "GGUF file" in capsys.readouterr().out


def test_import_and_parser_leave_jax_uninitialised():
    """`--coordinator` calls jax.distributed.initialize, which must precede any backend use: importing the
    package and building the parser may not create a JAX array."""
    code = ("import enchtable_jax, enchtable_jax.cli as c; c.build_parser(); "
            "from jax._src import xla_bridge as xb; assert not xb.backends_are_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
