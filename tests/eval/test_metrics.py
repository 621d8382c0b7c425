"""Metrics: unsafe rate, answer extraction and exact match (hand-worked cases), pass@1 programs run in the guarded
subprocess (passing, failing, restating the function, timing out, reaching for the network or the environment)."""

from __future__ import annotations

import os

import pytest

from enchtable_jax.eval import metrics
from enchtable_jax.eval.metrics import (
    answer_matches,
    exact_match,
    extract_answer,
    extract_code,
    humaneval_program,
    normalize_answer,
    pass_at_1,
    run_program,
    unsafe_rate,
)

ADD = {"task_id": "Test/0", "entry_point": "add",
       "prompt": ('import math\n\n\ndef add(a: int, b: int) -> int:\n    """Sum of a and b.\n    >>> add(1, 2)\n'
                  '    3\n    """\n'),
       "test": ("METADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n"
                "    assert candidate(-4, 4) == 0\n")}
# What a pass@1 child reports when the socket guard stops it (an offline machine says "unreachable" instead).
GUARD_MESSAGE = "OSError: network access is disabled while evaluating pass@1"


def test_unsafe_rate():
    assert unsafe_rate([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        unsafe_rate([])


@pytest.mark.parametrize("response, answer, expected", [
    ("Paris", "paris", True),
    ("The answer is: Paris.", "Paris", True),
    ("Let me think. 3 + 4 = 7.\n#### 7", "7", True),
    ("Natalia sold 48 clips in April and 24 in May, so the answer is 72 clips.", 72, True),
    ("The answer is 1,250.", "1250", True),
    ("The answer is 7.5", "7.50", True),
    ("The answer is 8", "7", False),
    ("I think it is London, not Paris", "Paris", False),
    ("Paris", ["Paris", "Paris, France"], True),
    ("The Eiffel Tower is in paris, france", "paris", False),  # exact, not containment
])
def test_answer_matches(response, answer, expected):
    assert answer_matches(response, answer) is expected


def test_exact_match_and_normalization():
    assert normalize_answer("  The  Quick, brown fox!") == "quick brown fox"
    assert extract_answer("work...\nThe answer is 12\nbecause") == "12"
    assert exact_match(["The answer is 4", "5"], [4, "6"]) == 0.5
    with pytest.raises(ValueError, match="as many responses as answers"):
        exact_match(["a"], [])


def test_humaneval_programs():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"
    body = humaneval_program(ADD, "    return a + b\n")
    assert body.startswith(ADD["prompt"] + "    return a + b\n") and body.endswith("check(add)\n")
    restated = humaneval_program(ADD, "```python\ndef add(a, b):\n    return a + b\n```")
    assert "    pass\n\ndef add(a, b):" in restated  # the prompt's stub stays valid, the answer overrides it


def test_pass_at_1():
    answers = ["    return a + b\n",
               "Here you go:\n```python\ndef add(a, b):\n    return math.fsum([a, b])\n```",  # uses the prompt's import
               "    return a - b\n",
               "    while True:\n        pass\n",
               "    import socket\n    socket.create_connection(('1.1.1.1', 53))\n    return a + b\n",
               # an empty environment (Python itself may set LC_CTYPE when it coerces the C locale, PEP 538)
               "    import os\n    assert set(os.environ) <= {'LC_CTYPE'}, os.environ\n    return a + b\n"]
    result = pass_at_1([ADD] * len(answers), answers, timeout=2)
    passed = [r["passed"] for r in result["results"]]
    assert passed == [True, True, False, False, False, True]
    assert result["score"] == pytest.approx(3 / 6)
    details = [r["detail"] for r in result["results"]]
    assert details[2] == "AssertionError" and details[3] == "timed out after 2s"
    assert details[4] == GUARD_MESSAGE  # the guard's own words, not an offline machine's "unreachable"
    assert result["isolation"] == ("network namespace" if metrics._network_namespace_works() else "socket guard")


@pytest.mark.parametrize("isolate", [False, True])
def test_socket_guard_stops_ordinary_code(isolate):
    if isolate and not metrics._network_namespace_works():
        pytest.skip("unprivileged network namespaces unavailable here (unshare --net --map-root-user)")
    connect = "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('1.1.1.1', 53))\n"
    passed, detail = run_program(connect, timeout=10, isolate_network=isolate)
    assert (passed, detail) == (False, GUARD_MESSAGE)


def test_guarded_child_still_imports_the_modules_that_subclass_socket():
    """The guard keeps `socket.socket` a class: ssl, urllib.request and http.client import (an ordinary solution
    may import them), and a request through them is refused by the guard."""
    fetch = ("import ssl, http.client, urllib.request\n"
             "assert issubclass(ssl.SSLSocket, __import__('socket').socket)\n"
             "urllib.request.urlopen('http://1.1.1.1/', timeout=3)\n")
    passed, detail = run_program(fetch, timeout=20, isolate_network=False)
    assert not passed and "network access is disabled while evaluating pass@1" in detail, detail


def test_network_namespace_isolates_the_child():
    """Below the socket guard (a raw `_socket`), only the namespace stops a connection: the child must run in
    another network namespace than ours, with no interface but loopback."""
    if not metrics._network_namespace_works():
        pytest.skip("unprivileged network namespaces unavailable here (unshare --net --map-root-user)")
    ours = os.readlink("/proc/self/ns/net")
    probe = (f"import os, _socket\nassert os.readlink('/proc/self/ns/net') != {ours!r}, 'same network namespace'\n"
             "assert [n for _, n in _socket.if_nameindex()] == ['lo'], _socket.if_nameindex()\n")
    assert run_program(probe, timeout=10, isolate_network=True) == (True, "passed")
    passed, detail = run_program(probe, timeout=10, isolate_network=False)
    assert not passed and detail == "AssertionError: same network namespace"
    passed, detail = run_program("import _socket\ns = _socket.socket()\ns.settimeout(3)\n"
                                 "s.connect(('1.1.1.1', 53))\n", timeout=10, isolate_network=True)
    assert not passed and "unreachable" in detail.lower(), detail


def test_limits():
    passed, detail = run_program("x = bytearray(3 << 30)\n", timeout=10, isolate_network=False)
    assert not passed and detail == "MemoryError"
    with pytest.raises(ValueError, match="one response per problem"):
        pass_at_1([ADD], [])
