"""`reuse_freed_memory`: freed large blocks stay in the process inside the block and go back to the system after it,
seen in the process's resident memory (glibc only)."""

from __future__ import annotations

import numpy as np
import pytest

from enchtable_jax.kernels import host_memory

SIZE = 256 * 2**20


def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def touched_then_freed() -> None:
    block = np.ones(SIZE, np.uint8)  # every page written
    assert block[-1] == 1
    del block


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's allocator only")
def test_freed_blocks_stay_for_reuse_inside_and_are_returned_after():
    before = rss()
    touched_then_freed()
    assert rss() - before < SIZE // 4  # by default a block this large is unmapped on free
    with host_memory.reuse_freed_memory() as changed:
        assert changed
        touched_then_freed()
        kept = rss() - before
        assert kept > SIZE * 3 // 4  # still resident: the next block of this size reuses these pages
        again = np.ones(SIZE, np.uint8)
        assert rss() - before < kept + SIZE // 4  # served from them, not from fresh pages
        del again
    assert rss() - before < SIZE // 4  # trimmed on the way out
    touched_then_freed()
    assert rss() - before < SIZE // 4  # and the thresholds are back to unmapping large blocks
