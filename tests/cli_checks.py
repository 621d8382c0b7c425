"""Shared by the error tests: the CLI's one-line error contract, and the shortest training flags that train."""

from __future__ import annotations

from enchtable_jax.cli import main

TRAIN = ["--steps", "1", "--warmup-ratio", "0", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64",
         "--save-every", "1"]  # no warm-up: the one step has a non-zero learning rate


def fails_in_one_line(capsys, *argv, needles=()) -> str:
    """Run the CLI; assert exit 2 with exactly one 'enchtable CMD: error:' line (containing every needle) and no
    traceback; return that line."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith(f"enchtable {argv[0]}: error: ")]
    assert code == 2, (out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]
