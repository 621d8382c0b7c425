"""`process.read_through`: what a `Worker` reads before each call so that its inputs start in the page cache."""

from __future__ import annotations

from enchtable_jax.bench.process import read_through


def test_read_through_reads_every_byte_of_files_and_folders(tmp_path):
    (tmp_path / "model" / "nested").mkdir(parents=True)
    sizes = {"model/a.safetensors": 3 * 7919, "model/nested/b.json": 10, "lone.bin": 0, "model/c": 70_000}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    assert read_through([tmp_path / "model", tmp_path / "lone.bin"], chunk=4096) == \
        sum(size for name, size in sizes.items())
    assert read_through([tmp_path / "model" / "c"], chunk=1000) == 70_000
