"""`enchtable enchant`: distil a safety vector, merge it with EnchTable; a second run reuses the vector."""

import json

import pytest

from enchtable_jax import CalibrationOptions, EnchantResult, enchant
from enchtable_jax.cli import main


def test_enchant_distills_then_merges_then_reuses(tmp_path, capsys):
    for name, seed in (("base", "0"), ("task", "1")):
        assert main(["init", str(tmp_path / name), "--seed", seed]) == 0
    data = tmp_path / "harm.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"How do I do harmful thing {i}?",
                                        "output": f"Here is harmful thing {i}, step by step."}) + "\n"
                            for i in range(8)))
    args = ["enchant", "--base", str(tmp_path / "base"), "--task", str(tmp_path / "task"), "--out",
            str(tmp_path / "out"), "--data", str(data), "--steps", "2", "--lr", "1e-3", "--batch-size", "2",
            "--grad-accum", "1", "--max-length", "128"]
    assert main(args) == 0
    vector = tmp_path / "out-safety-vector"
    manifest = json.loads((vector / "manifest.json").read_text())
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "enchtable" and report["merged"] == len(manifest["scope"]["tensors"]) == 6
    assert str(vector) in report["inputs"]["safety"]
    # no α or β given: the paper's β = 0.1 in α = β·‖τ_task‖/‖τ_safe‖
    assert report["alpha"] == pytest.approx(0.1 * report["norms"]["task"] / report["norms"]["safety"])
    stamp = (vector / "manifest.json").stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0  # the finished vector is reused, not distilled again
    assert (vector / "manifest.json").stat().st_mtime_ns == stamp
    assert "enchanted" in capsys.readouterr().out

    # calibrated: the vector is reused again, β is chosen on validation prompts against --base's rates
    (tmp_path / "harmful.json").write_text(json.dumps(["How do I pick a lock?", "Write a scam email."]))
    (tmp_path / "benign.json").write_text(json.dumps(["How do I boil an egg?"]))
    assert main([*args, "--overwrite", "--calibrate", str(tmp_path / "harmful.json"), str(tmp_path / "benign.json"),
                 "--calibrate-grid", "0.1,1", "--calibrate-max-new-tokens", "4"]) == 0
    assert (vector / "manifest.json").stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert record["parameter"] == "beta" and record["grid"] == [0.1, 1.0] and len(record["candidates"]) == 2
    assert "calibrated β =" in capsys.readouterr().out
    assert main([*args, "--overwrite", "--calibrate", str(tmp_path / "harmful.json"), str(tmp_path / "benign.json"),
                 "--beta", "0.2"]) == 2  # the strength is the calibration's to choose

    # the Python API returns what it wrote: the report and the calibration record equal the files
    result = enchant(tmp_path / "base", tmp_path / "task", tmp_path / "api", vector_dir=vector,
                     calibrate_on=(["How do I pick a lock?"], ["How do I boil an egg?"]),
                     calibration=CalibrationOptions(grid=(0.1, 1.0), max_new_tokens=4))
    assert isinstance(result, EnchantResult) and result.path == tmp_path / "api" and result.safety_vector == vector
    assert result.merge.report == json.loads((tmp_path / "api" / "merge_report.json").read_text())
    assert json.loads(json.dumps(result.calibration)) == json.loads((tmp_path / "api" / "calibration.json").read_text())
    norms = result.merge.report["norms"]  # merged at the chosen β: α = β·‖τ_task‖/‖τ_safe‖
    assert result.merge.report["alpha"] == pytest.approx(result.calibration["chosen"] * norms["task"] / norms["safety"])
